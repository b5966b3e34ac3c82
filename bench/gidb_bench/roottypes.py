"""Warm create per root filesystem type: XFS and Btrfs against ext4.

Each type's first create (untimed) makes its cache image; then the three
types' warm creates run interleaved on fresh 2 GiB sparse file disks,
msdos, the default suite, each copying its type's image. Target: XFS and
Btrfs each within 1.5x of ext4's median.
"""

from __future__ import annotations

import os

from . import install, stats
from .context import GIB, MIB, Bench
from .procs import BenchError
from .stats import Verdict

NAME = "roottypes"
TARGET = 1.5
DISK_BYTES = 2 * GIB
TYPES = ("ext4", "xfs", "btrfs")


def _create(bench: Bench, fstype: str, log_name: str) -> float:
    disk = bench.fresh_disk("roottype.img", DISK_BYTES)
    env = {**install.create_env("rt.example.org", disk, os.path.getsize(disk) // MIB),
           "OSP_FILESYSTEM": fstype}
    bench.quiesce()
    result = bench.ours("create", env, log_name)
    if "The system comes from the cache image" not in result.log_text():
        raise BenchError(f"the {fstype} create did not copy its cache image "
                           f"(see {bench.log_path(log_name)})")
    return result.seconds


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Warm create per root type (OS parameter filesystem), each from its "
              f"own cache image; 2 GiB sparse file disk, msdos; runs: {runs} of "
              f"each, interleaved, after one untimed create of each.")
    for fstype in TYPES:
        _create(bench, fstype, f"roottypes-untimed-{fstype}")
    times: dict[str, list[float]] = {t: [] for t in TYPES}
    for round_no, fstype in stats.interleaved(list(TYPES), runs):
        seconds = _create(bench, fstype, f"roottypes-{fstype}-{round_no + 1}")
        times[fstype].append(seconds)
        bench.say(f"  run {round_no + 1}/{runs} {fstype:6} {stats.seconds(seconds)} s")
    medians = {t: stats.median(v) for t, v in times.items()}
    bench.say("  medians: " + ", ".join(f"{t} {stats.seconds(m)} s"
                                        for t, m in medians.items()))
    for fstype in TYPES[1:]:
        verdict = Verdict(NAME, f"warm create, {fstype}/ext4",
                          stats.ratio(medians[fstype], medians["ext4"]), TARGET)
        bench.verdicts.append(verdict)
        bench.say("  " + verdict.line())
