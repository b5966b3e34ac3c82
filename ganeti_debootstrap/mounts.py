"""Mounting the instance's root, unmounting everything below it, and the
kernel filesystems (/proc, /sys, /dev, /dev/pts) that hooks need inside it.

Hooks run in the instance and may mount things of their own inside the
target (``/proc``, ``binfmt_misc``, a bind of the node's ``/dev``...). So
releasing a mount means unmounting the whole tree below it, deepest first,
as /proc/self/mountinfo shows it at that moment. A busy unmount is retried
a few times and then reported with the processes holding it; there is no
lazy unmount, which would hide the mount while keeping the loop device
under it busy with nothing left to show why.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from . import filesystems, fsutil, procs, runner
from .errors import CommandError, DiskError
from .log import failure_logged, released
from .target import Target

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"

# A busy unmount is usually a process that is about to exit (a hook's last
# child, a blkid started by udev): retry with growing pauses, about 3 s in
# all, before naming the processes that still hold it.
UNMOUNT_DELAYS = (0.1, 0.2, 0.4, 0.8, 1.5)

_sleep = time.sleep  # replaced by unit tests

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (escapes already decoded)."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    fstype: str
    source: str


def unescape(field: str) -> str:
    """Decode the octal escapes (``\\040`` for a space...) of a mountinfo field."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The entries of a mountinfo text, in the kernel's order (parents first)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        # Optional fields ("shared:1"...) end with a lone "-"; after it come
        # the filesystem type, the source and the superblock options.
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]),
            major=int(major), minor=int(minor), root=unescape(fields[3]),
            mount_point=unescape(fields[4]), fstype=unescape(fields[sep + 1]),
            source=unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""))
    return entries


def current_mounts() -> list[MountEntry]:
    """The mounts this process sees now."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_under(top: str, entries: Sequence[MountEntry]) -> list[MountEntry]:
    """The mounts at or below ``top`` in the order to unmount them.

    Deepest path first; mounts stacked on the same path newest first (the
    kernel lists mounts in the order they were made, and ``umount PATH``
    removes the topmost one).
    """
    found = [(i, e) for i, e in enumerate(entries) if fsutil.is_under(e.mount_point, top)]
    found.sort(key=lambda ie: (ie[1].mount_point.rstrip("/").count("/"), ie[0]),
               reverse=True)
    return [e for _, e in found]


def is_mounted(path: str) -> bool:
    """Whether something is mounted exactly at ``path``."""
    path = os.path.realpath(path)
    return any(e.mount_point == path for e in current_mounts())


def unmount_tree(path: str) -> None:
    """Unmount everything mounted at or below ``path``, deepest first.

    Retries a busy unmount a few times; then raises DiskError naming the
    processes that keep it busy. Nothing mounted there is not an error.
    """
    top = os.path.realpath(path)
    pending = mounts_under(top, current_mounts())
    # Only something mounting concurrently can make a tree need more
    # successful unmounts than it had mounts; stop instead of looping.
    allowed = len(pending) + 8
    failures = 0
    while pending:
        mount_point = pending[0].mount_point
        try:
            runner.run(["umount", mount_point])
        except CommandError as exc:
            if failures == len(UNMOUNT_DELAYS):
                raise _busy_error(mount_point, top, exc) from exc
            _sleep(UNMOUNT_DELAYS[failures])
            failures += 1
        else:
            failures = 0
            allowed -= 1
        pending = mounts_under(top, current_mounts())
        if pending and allowed < 0:
            raise DiskError(
                f"{pending[0].mount_point} is mounted again each time it is "
                f"unmounted; something keeps mounting below {top}. Stop it, "
                f"then unmount by hand (umount -R {top}).")


def _busy_error(mount_point: str, top: str, exc: CommandError) -> DiskError:
    users = procs.processes_using(top)
    reason = (exc.stderr_tail.strip().splitlines()[-1].rstrip(".")
              if exc.stderr_tail.strip() else f"exit status {exc.returncode}")
    if users:
        who = (f"It is in use by {procs.describe(users)}: stop these processes "
               f"(a daemon a hook started inside the instance?)")
    else:
        who = (f"No process holds a file there (the kernel may: a loop device, "
               f"swap file or bind mount inside it; see 'fuser -vm {mount_point}')")
    return DiskError(
        f"Cannot unmount {mount_point} ({reason}). {who}, then run "
        f"'umount -R {top}' and detach the instance disk's loop devices "
        f"(losetup -a) before retrying.")


# How an instance the tenant has used (import, rename) is mounted: its
# setuid programs and device nodes mean nothing on the node. export never
# mounts (dump reads the device); a mount for reading only adds "ro".
UNTRUSTED_OPTIONS = ("nosuid", "nodev")


def make_private_root(prefix: str, directory: str | None = None) -> str:
    """A new empty directory ``root`` (0755) inside a new private (0700) one.

    Whatever is mounted or unpacked on ``root`` takes its own permissions
    (an instance's / is 0755): the private parent keeps the node's other
    users from walking in and running its setuid programs, even for a
    moment. The parent is named ``prefix`` plus random characters, in
    ``directory`` (default: the temporary directory); the caller removes
    both.
    """
    parent = tempfile.mkdtemp(prefix=prefix, dir=directory)  # always 0700
    root = os.path.join(parent, "root")
    try:
        os.mkdir(root)
        os.chmod(root, 0o755)  # whatever the umask (Ganeti's is 077)
    except BaseException:
        with failure_logged(f"removing {parent}"):
            if os.path.isdir(root):
                os.rmdir(root)
            os.rmdir(parent)
        raise
    return root


def _remove_mountpoint(path: str) -> None:
    os.rmdir(path)
    os.rmdir(os.path.dirname(path))


@contextlib.contextmanager
def temporary_mountpoint(prefix: str = "ganeti-debootstrap.") -> Iterator[str]:
    """A new empty directory to mount on, inside a 0700 one; both removed on exit."""
    path = make_private_root(prefix)
    try:
        yield path
    except BaseException:
        with failure_logged(f"removing the mount point {path}"):
            _remove_mountpoint(path)
        raise
    try:
        _remove_mountpoint(path)
    except OSError as exc:
        parent = os.path.dirname(path)
        raise DiskError(f"Cannot remove the temporary mount point {path}: "
                        f"{exc.strerror}. Unmount whatever is still mounted "
                        f"there (umount -R {path}) and remove {parent}.") from exc


@contextlib.contextmanager
def mounted(device: str, mount_point: str, fstype: str | None = None,
            options: Sequence[str] = ()) -> Iterator[str]:
    """Mount ``device`` on ``mount_point``; on exit unmount everything below it.

    Yields the mount point. ``fstype`` None lets mount(8) probe the type:
    never for an instance's filesystem, whose type we made or checked.
    """
    if isinstance(options, str):
        options = (options,)
    args: list[str] = []
    if fstype:
        args += ["-t", fstype]
    if options:
        args += ["-o", ",".join(options)]
    with _mounted_with(device, mount_point, args):
        yield mount_point


_libc = ctypes.CDLL(None, use_errno=True)

# unshare(2)'s flag for a new mount namespace (confine.py has its own copy:
# it runs by path, on the standard library alone).
CLONE_NEWNS = 0x00020000


def own_mount_namespace() -> None:
    """Move this thread, and the commands it starts, into a mount namespace of its own.

    Its mounts then exist nowhere else: a service or script that makes a
    mount namespace of its own meanwhile (systemd's PrivateTmp, ip netns,
    another unshare) copies the node's mounts, not ours, so nothing can
    keep our filesystem mounted after we unmount it (which would leave a
    loop device attached and its file changing after we checked it).
    The node's mounts still reach ours (slave propagation); ours do not go
    back. The namespace ends with the process.
    """
    if _libc.unshare(ctypes.c_int(CLONE_NEWNS)) != 0:
        err = ctypes.get_errno()
        raise DiskError(f"Cannot make a private mount namespace (unshare: "
                        f"{os.strerror(err)}); this needs root (CAP_SYS_ADMIN).")
    runner.run(["mount", "--make-rslave", "/"])


@contextlib.contextmanager
def write_errors_reported(mount_point: str, what: str) -> Iterator[None]:
    """Raise DiskError at the end of the block if a write to the filesystem
    mounted on ``mount_point`` (``what``, for the message) failed in it.

    A write the disk refuses (its storage is full: a thin pool, the
    filesystem holding a disk file) fails in the background, after the
    program that wrote succeeded; umount and sync(1) report nothing.
    syncfs(2) reports every such error since the descriptor it is given was
    opened (Linux 5.8 and later): it is opened when the block starts. Enter
    it right after mounting: the descriptor is closed before the unmount.
    """
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise DiskError(
                f"Writing to {what} failed: {os.strerror(err)}. Its disk, or the "
                f"storage under it (a full thin pool, a full filesystem holding "
                f"a disk file), refused writes, so what was written there is "
                f"incomplete. Make room on that storage, then run this again.")
    finally:
        os.close(fd)


@contextlib.contextmanager
def instance_root(device: str, fstype: str, disk_path: str,
                  options: Sequence[str] = ()) -> Iterator[str]:
    """Mount the instance's root filesystem ``device`` on a new private mount
    point; yield it. On exit: write errors reported, unmounted, removed.

    ``options`` is :data:`UNTRUSTED_OPTIONS` for a filesystem the tenant
    filled; ``disk_path`` (the instance's disk) names it in messages.
    """
    with contextlib.ExitStack() as stack:
        target_dir = stack.enter_context(temporary_mountpoint())
        stack.enter_context(mounted(device, target_dir, fstype,
                                    (*options, *filesystems.mount_options(fstype))))
        stack.enter_context(write_errors_reported(
            target_dir, f"the instance's root filesystem on {disk_path}"))
        yield target_dir


# What hooks expect inside the instance, in mounting order: (source, path
# inside the instance, mount arguments). /dev is a bind of the node's so
# that hooks see the instance's own loop device or partition mapping (and,
# on nodes with udev, /dev/disk/by-*). It is made private: the node's /dev
# is usually a shared mount, and without that the devpts mounted below it
# would propagate onto the node's own /dev/pts. devpts is a new instance
# (the default since Linux 4.7), so the instance's ptys are not the node's.
_API_FILESYSTEMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("proc", "/proc", ("-t", "proc", "-o", "nosuid,nodev,noexec")),
    ("sysfs", "/sys", ("-t", "sysfs", "-o", "nosuid,nodev,noexec")),
    ("/dev", "/dev", ("--bind", "--make-private")),
    ("devpts", "/dev/pts", ("-t", "devpts", "-o", "newinstance,gid=5,mode=620,ptmxmode=666")),
)


@contextlib.contextmanager
def api_filesystems(target: str) -> Iterator[None]:
    """Mount /proc, /sys, /dev and /dev/pts inside ``target``; unmount on exit.

    Whatever hooks mounted below these is unmounted too, deepest first.
    """
    inside = Target(target)
    with contextlib.ExitStack() as stack:
        for source, where, args in _API_FILESYSTEMS:
            # Target.path: a symlink planted in the instance (dev -> /dev)
            # must not make us mount over the node's own directories.
            point = inside.path(where)
            os.makedirs(point, mode=0o755, exist_ok=True)
            stack.enter_context(_mounted_with(source, point, args))
        yield


@contextlib.contextmanager
def _mounted_with(source: str, point: str, args: Sequence[str]) -> Iterator[None]:
    """Run ``mount ARGS SOURCE POINT``; on exit unmount everything below POINT."""
    try:
        runner.run(["mount", *args, source, point])
    except BaseException:
        # A signal can arrive after the kernel mounted but before mount(8)
        # returned: do not leave that half-made mount behind.
        with failure_logged(f"unmounting {point}"):
            if is_mounted(point):
                unmount_tree(point)
        raise
    with released(f"unmounting {point}", lambda: unmount_tree(point)):
        yield
