"""Warm create: ours vs the shell edition's way, from the same warm cache.

Target: ours takes at most a third of the reference's time on a 2 GiB
file disk, msdos, ext4, the default suite. Ours copies the cache's
filesystem image (made by the set-up's warm-up create, timed there); the
reference unpacks the cache's archive into a fresh ext4 (bench/reference-create).
"""

from __future__ import annotations

from . import stats
from .context import GIB, Bench
from .procs import Result
from .stats import Verdict

NAME = "warm"
TARGET = 0.33
DISK_BYTES = 2 * GIB


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Ours: the installed create (CACHE_IMAGE=yes); reference: "
              f"bench/reference-create (sfdisk, mkfs.ext4, offset loop, mount, "
              f"tar --xattrs, instance files, umount, detach). 2 GiB sparse "
              f"file disk, msdos, ext4; runs: {runs} of each, interleaved.")
    # One untimed run of each first: both read the cache through the page
    # cache afterwards, whatever ran before.
    for label in ("reference", "ours"):
        disk = bench.fresh_disk("warm.img", DISK_BYTES)
        _one(bench, label, disk, "warm-untimed")
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    phases = []
    for round_no, label in stats.interleaved(["reference", "ours"], runs):
        disk = bench.fresh_disk("warm.img", DISK_BYTES)
        bench.quiesce()
        result = _one(bench, label, disk, f"warm-{round_no + 1}")
        times[label].append(result.seconds)
        if label == "ours":
            phases.append(stats.phase_times(result.log_text()))
        bench.say(f"  run {round_no + 1}/{runs} {label:9}  {stats.seconds(result.seconds)} s")
    ref, ours = stats.median(times["reference"]), stats.median(times["ours"])
    bench.medians["warm ours"] = ours
    rows = [[str(i + 1), stats.seconds(r), stats.seconds(o)]
            for i, (r, o) in enumerate(zip(times["reference"], times["ours"]))]
    rows.append(["median", stats.seconds(ref), stats.seconds(ours)])
    for line in stats.table(["run", "reference (s)", "ours (s)"], rows):
        bench.say("  " + line)
    bench.say("  ours, median of each phase (s): " + ", ".join(
        f"{name} {seconds:.3f}" for name, seconds in stats.median_phases(phases).items()))
    verdict = Verdict(NAME, "warm create, ours/reference", stats.ratio(ours, ref), TARGET)
    bench.verdicts.append(verdict)
    bench.say("  " + verdict.line())


def _one(bench: Bench, label: str, disk: str, log_name: str) -> Result:
    if label == "reference":
        return bench.reference_create(disk, "ref.example.org", f"{log_name}-reference")
    return bench.ours_create(disk, "ours.example.org", f"{log_name}-ours")
