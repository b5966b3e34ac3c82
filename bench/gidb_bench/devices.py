"""Finding and releasing the loop devices and mounts the benchmark made.

Everything the benchmark makes lives under its scratch directory: the disk
files (so its loop devices are those backed by a file there, or by such a
loop device) and the reference's mount points; the scripts' own mount points
may be elsewhere (/tmp), but their source is one of those loop devices.
Other people's devices on the same machine are never touched.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_DELETED = " (deleted)"
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, and what is mounted there."""

    point: str
    source: str


def loop_backing_files() -> dict[str, str]:
    """Every attached loop device and its backing file, from sysfs."""
    found = {}
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        name = path.split("/")[3]
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                backing = f.read().rstrip("\n")
        except OSError:  # detached meanwhile
            continue
        if backing.endswith(_DELETED):
            backing = backing[:-len(_DELETED)]
        found[f"/dev/{name}"] = backing
    return found


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in /proc/self/mountinfo's format (proc(5))."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), _unescape(tail[1])))
    return mounts


def current_mounts() -> list[Mount]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return parse_mountinfo(f.read())


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def our_loops(backing: Mapping[str, str], roots: Sequence[str]) -> set[str]:
    """Loop devices backed by a file under ``roots``, or by such a loop device."""
    ours = {dev for dev, file in backing.items() if _inside(file, roots)}
    grew = True
    while grew:
        more = {dev for dev, file in backing.items() if file in ours} - ours
        ours |= more
        grew = bool(more)
    return ours


def our_mounts(mounts: Sequence[Mount], loops: set[str], roots: Sequence[str]) -> list[str]:
    """Mount points to release, deepest first.

    Ours: under ``roots``, or mounted from one of ``loops``, or anything
    mounted below one of those (a bootstrap's /proc inside the instance).
    """
    points = {m.point for m in mounts if _inside(m.point, roots) or m.source in loops}
    grew = True
    while grew:
        more = {m.point for m in mounts if _inside(m.point, points)} - points
        points |= more
        grew = bool(more)
    return sorted(points, key=lambda p: (p.count("/"), p), reverse=True)


def leftovers(roots: Sequence[str]) -> tuple[list[str], list[str]]:
    """(mount points, loop devices) of ours that are still there."""
    loops = our_loops(loop_backing_files(), roots)
    return our_mounts(current_mounts(), loops, roots), sorted(loops)


def release(roots: Sequence[str]) -> list[str]:
    """Unmount and detach whatever of ours is left; returns what was released.

    A busy mount is detached lazily rather than left; loop devices stacked
    on ours go first.
    """
    done = []
    points, loops = leftovers(roots)
    for point in points:
        res = subprocess.run(["umount", point], capture_output=True)
        if res.returncode != 0:
            res = subprocess.run(["umount", "-l", point], capture_output=True)
        if res.returncode == 0:
            done.append(f"unmounted {point}")
            _remove_script_mountpoint(point)
    backing = loop_backing_files()
    # Loops over our loops before the loops they sit on.
    ordered = sorted(loops, key=lambda d: backing.get(d, "").startswith("/dev/loop"),
                     reverse=True)
    for dev in ordered:
        res = subprocess.run(["losetup", "--detach", dev], capture_output=True)
        if res.returncode == 0:
            done.append(f"detached {dev}")
    return done


def _remove_script_mountpoint(point: str) -> None:
    """The empty temporary mount point of a script stopped by force."""
    if os.path.basename(point).startswith("ganeti-debootstrap."):
        try:
            os.rmdir(point)
        except OSError:
            pass
