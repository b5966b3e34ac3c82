"""Export and import of a data disk of each filesystem type against its own tool.

For each of ext4, XFS and Btrfs: a 2 GiB file disk holding that
filesystem on the whole disk, filled with the warm cache's system (about
the tree of a fresh instance), exported as data disk 1 by our export (a
dump for ext4, tar for XFS and Btrfs: it probes the disk, checks it and
announces the size) against dump or tar by hand; the stream imported as
data disk 1 by our import (it tells the kind from the first bytes, makes
ext4, restores confined, checks the stream's end) against mkfs.ext4 and
restore or tar by hand (bench/reference-backup-kinds). Target: ours at
most 1.1 times the tool's time, each way, for each type.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from . import install, procs, stats
from .context import GIB, MIB, Bench
from .stats import Verdict

NAME = "backup-kinds"
DISK_BYTES = 2 * GIB
TYPES = ("ext4", "xfs", "btrfs")
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}
TARGET = 1.1


def _filled(bench: Bench, fstype: str) -> str:
    """A disk holding ``fstype`` with the warm cache's system in it."""
    disk = bench.fresh_disk(f"kinds-{fstype}.img", DISK_BYTES)
    subprocess.run(MKFS[fstype] + [disk], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "--find", "--show", disk], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(dir=bench.workdir) as mnt:
            subprocess.run(["mount", loop, mnt], check=True)
            try:
                subprocess.run(["tar", "-C", mnt, "--xattrs", "--xattrs-include=*",
                                "--acls", "--numeric-owner", "-xf", bench.archive],
                               check=True)
            finally:
                subprocess.run(["umount", mnt], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    return disk


def _env(action: str, disk: str) -> dict[str, str]:
    prefix = action.upper()
    return install.ganeti_env(INSTANCE_NAME="kinds.example.org", DISK_COUNT="2",
                              DISK_1_PATH=disk, **{f"{prefix}_INDEX": "1",
                                                   f"{prefix}_DISK_PATH": disk,
                                                   f"{prefix}_DEVICE": disk})


def _one(bench: Bench, label: str, action: str, disk: str, fstype: str, log: str,
         stream: str) -> procs.Result:
    mode = "wb" if action == "export" else "rb"
    with open(stream, mode) as f:
        io = {"stdout": f} if action == "export" else {"stdin": f}
        if label == "ours":
            return bench.ours(action, _env(action, disk), log, **io)  # type: ignore[arg-type]
        script = os.path.join(bench.source_root, "bench", "reference-backup-kinds")
        return procs.run(["/bin/bash", script, action, disk, fstype],
                         env=install.ganeti_env(), log_path=bench.log_path(log),
                         umask=0o077, **io)  # type: ignore[arg-type]


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Ours: export and import of data disk 1 (dump for ext4, tar for XFS and "
              f"Btrfs; imported onto ext4); by hand: dump/restore or tar "
              f"(bench/reference-backup-kinds). 2 GiB file disks holding the warm "
              f"cache's system; runs: {runs} of each, interleaved.")
    rows = []
    for fstype in TYPES:
        source = _filled(bench, fstype)
        times: dict[str, list[float]] = {f"{a} {lb}": [] for a in ("export", "import")
                                         for lb in ("by hand", "ours")}
        sizes: dict[str, int] = {}
        for round_no, label in stats.interleaved(["by hand", "ours"], runs):
            stream = bench.path(f"kinds-{fstype}-{label.replace(' ', '-')}.stream")
            bench.quiesce()
            result = _one(bench, label, "export", source, fstype,
                          f"kinds-{fstype}-export-{round_no}", stream)
            times[f"export {label}"].append(result.seconds)
            sizes[label] = os.path.getsize(stream)
            target = bench.fresh_disk("kinds-target.img", DISK_BYTES)
            bench.quiesce()
            result = _one(bench, label, "import", target, fstype,
                          f"kinds-{fstype}-import-{round_no}", stream)
            times[f"import {label}"].append(result.seconds)
            os.unlink(stream)
        medians = {k: stats.median(v) for k, v in times.items()}
        for action in ("export", "import"):
            ratio = stats.ratio(medians[f"{action} ours"], medians[f"{action} by hand"])
            rows.append([f"{fstype} {action}", stats.seconds(medians[f"{action} by hand"]),
                         stats.seconds(medians[f"{action} ours"]), f"{ratio:.2f}"])
            bench.verdicts.append(Verdict(NAME, f"{fstype} {action}, ours/by hand", ratio,
                                          TARGET))
        bench.say(f"  {fstype}: stream ours {sizes.get('ours', 0) / MIB:.1f} MiB, by hand "
                  f"{sizes.get('by hand', 0) / MIB:.1f} MiB")
        os.unlink(source)
    for line in stats.table(["median", "by hand (s)", "ours (s)", "ours/by hand"], rows):
        bench.say("  " + line)
    for verdict in bench.verdicts[-2 * len(TYPES):]:
        bench.say("  " + verdict.line())
