"""Warm create: ours vs the shell edition's way, from the same warm cache.

Target: ours takes at most a third of the reference's time on a 2 GiB
file disk, msdos, ext4, the default suite. Ours copies the cache's
filesystem image (made by the set-up's warm-up create, timed there); the
reference unpacks the cache's archive into a fresh ext4 (bench/reference-create).

Both are also measured against what the disk allows at that moment (the
floor, diskio.write_direct), on the idle disk and again with a concurrent
writer the benchmark starts (diskio.BusyWriter) and stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import diskio, reflink, sizes, stats
from .context import GIB, MIB, Bench
from .procs import Result
from .stats import Verdict

NAME = "warm"
TARGET = 0.33
DISK_BYTES = 2 * GIB


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Ours: the installed create (CACHE_IMAGE=yes); reference: "
              f"bench/reference-create (sfdisk, mkfs.ext4, offset loop, mount, "
              f"tar --xattrs, instance files, umount, detach); floor: writing the "
              f"bytes of data our create leaves in its disk file (FIEMAP, without "
              f"the extents left unwritten) to a new file in the work dir with "
              f"direct I/O and an fsync, the least any create needs for them. "
              f"2 GiB sparse file disk, msdos, ext4; runs: {runs} of each, "
              f"interleaved; then the same with a concurrent writer busy on the "
              f"disk (two streams of 4 MiB direct writes over a 256 MiB file).")
    # One untimed run of each first: both read the cache through the page
    # cache afterwards, whatever ran before.
    for label in ("reference", "ours"):
        disk = bench.fresh_disk("warm.img", DISK_BYTES)
        _one(bench, label, disk, "warm-untimed")
    floor_bytes = diskio.allocation(disk).written
    idle = _rounds(bench, "idle", floor_bytes)
    busy_writer = diskio.BusyWriter(bench.path("busy"), bench.log_path("busy-writer"))
    busy_writer.start()
    try:
        busy = _rounds(bench, "busy", floor_bytes)
    finally:
        busy_writer.stop()
    bench.medians["warm ours"] = idle.ours
    verdict = Verdict(NAME, "warm create, ours/reference", stats.ratio(idle.ours, idle.ref),
                      TARGET)
    bench.verdicts.append(verdict)
    bench.say("  " + verdict.line())
    for rounds in (idle, busy):
        rate = diskio.mib_per_s(rounds.floor_bytes, rounds.floor)
        bench.say(f"  {rounds.what} disk: floor {stats.seconds(rounds.floor)} s for "
                  f"{rounds.floor_bytes / MIB:.0f} MiB ({rate}); "
                  f"ours/floor {stats.ratio(rounds.ours, rounds.floor):.2f}, "
                  f"reference/floor {stats.ratio(rounds.ref, rounds.floor):.2f}, "
                  f"ours/reference {stats.ratio(rounds.ours, rounds.ref):.3f}; "
                  f"I/O pressure (some, avg10) {rounds.pressure}")
    bench.say("  -- bytes and time by disk size --")
    sizes.run(bench)
    bench.say("  -- disk files on filesystems that share blocks --")
    reflink.run(bench)


@dataclass(frozen=True)
class Rounds:
    what: str
    ref: float
    ours: float
    floor: float
    floor_bytes: int
    pressure: str


def _rounds(bench: Bench, what: str, floor_bytes: int) -> Rounds:
    """``runs`` rounds of reference, ours and the floor, interleaved."""
    runs = bench.options.runs
    times: dict[str, list[float]] = {"reference": [], "ours": [], "floor": []}
    phases = []
    written = []
    for round_no, label in stats.interleaved(["reference", "ours", "floor"], runs):
        bench.quiesce()
        if label == "floor":
            seconds = diskio.write_direct(bench.path("disks", "floor.dat"), floor_bytes)
        else:
            disk = bench.fresh_disk("warm.img", DISK_BYTES)
            bench.quiesce()
            result = _one(bench, label, disk, f"warm-{what}-{round_no + 1}")
            seconds = result.seconds
            if label == "ours":
                phases.append(stats.phase_times(result.log_text()))
                written.append(diskio.allocation(disk).written)
        times[label].append(seconds)
        bench.say(f"  {what} run {round_no + 1}/{runs} {label:9}  {stats.seconds(seconds)} s")
    pressure = diskio.io_pressure()
    ref, ours, floor = (stats.median(times[k]) for k in ("reference", "ours", "floor"))
    rows = [[str(i + 1), stats.seconds(r), stats.seconds(o), stats.seconds(f)]
            for i, (r, o, f) in enumerate(zip(times["reference"], times["ours"],
                                              times["floor"]))]
    rows.append(["median", stats.seconds(ref), stats.seconds(ours), stats.seconds(floor)])
    bench.say(f"  {what} disk:")
    for line in stats.table(["run", "reference (s)", "ours (s)", "floor (s)"], rows):
        bench.say("  " + line)
    bench.say("  ours, median of each phase (s): " + ", ".join(
        f"{name} {seconds:.3f}" for name, seconds in stats.median_phases(phases).items()))
    if written and max(written) != min(written):
        bench.say(f"  (data our creates left differed: {min(written) / MIB:.1f}-"
                  f"{max(written) / MIB:.1f} MiB; the floor writes {floor_bytes / MIB:.1f})")
    return Rounds(what, ref, ours, floor, floor_bytes, pressure)


def _one(bench: Bench, label: str, disk: str, log_name: str) -> Result:
    if label == "reference":
        return bench.reference_create(disk, "ref.example.org", f"{log_name}-reference")
    return bench.ours_create(disk, "ours.example.org", f"{log_name}-ours")
