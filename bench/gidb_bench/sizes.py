"""Part of the warm scenario: bytes a warm create writes, and its time, as the disk grows.

Warm creates on sparse file disks of 2, 20 and 128 GiB, interleaved. For
each: the median time, and what the create left in the disk file (FIEMAP):
bytes with data, bytes allocated but unwritten (zeroed with fallocate, no
data written), against the data of the cache's filesystem image (its
allocated bytes). Targets: data written at most 1.1x the image's data at
every size; the time should not grow with the disk (reported, 128/2 GiB).
"""

from __future__ import annotations

import os

from . import diskio, stats
from .context import GIB, MIB, Bench
from .stats import Verdict

NAME = "warm"  # part of the warm scenario
SIZES_GIB = (2, 20, 128)
TARGET = 1.1


def image_of(archive: str, fstype: str = "ext4") -> str:
    """The cache image made beside ``archive`` (cache-X.tar -> cache-X.ext4.img)."""
    stem = archive[:-len(".tar")] if archive.endswith(".tar") else archive
    return f"{stem}.{fstype}.img"


def run(bench: Bench) -> None:
    runs = bench.options.runs
    image = image_of(bench.archive)
    if not os.path.exists(image):
        image = image_of(os.path.join(bench.warm_cache, os.path.basename(bench.archive)))
    image_data = diskio.allocation(image).allocated
    bench.say(f"Ours: the installed create on sparse file disks of "
              f"{', '.join(str(s) for s in SIZES_GIB)} GiB (msdos, ext4), {runs} of each, "
              f"interleaved. The cache's ext4 image holds {image_data / MIB:.1f} MiB of "
              f"data ({os.path.getsize(image) / MIB:.1f} MiB long).")
    times: dict[int, list[float]] = {s: [] for s in SIZES_GIB}
    left: dict[int, diskio.Allocation] = {}
    phases: dict[int, list[dict[str, float]]] = {s: [] for s in SIZES_GIB}
    for round_no, label in stats.interleaved([str(s) for s in SIZES_GIB], runs):
        size = int(label)
        disk = bench.fresh_disk("sizes.img", size * GIB)
        bench.quiesce()
        result = bench.ours_create(disk, "sizes.example.org", f"sizes-{size}-{round_no + 1}")
        times[size].append(result.seconds)
        phases[size].append(stats.phase_times(result.log_text()))
        left[size] = diskio.allocation(disk)
        bench.say(f"  run {round_no + 1}/{runs} {size:4} GiB  {stats.seconds(result.seconds)} s")
    os.unlink(bench.path("disks", "sizes.img"))
    rows = []
    for size in SIZES_GIB:
        alloc = left[size]
        rows.append([f"{size} GiB", stats.seconds(stats.median(times[size])),
                     f"{alloc.written / MIB:.1f}", f"{alloc.unwritten / MIB:.1f}",
                     f"{alloc.written / image_data:.3f}", f"{alloc.allocated / image_data:.3f}"])
    for line in stats.table(["disk", "median (s)", "data (MiB)", "unwritten (MiB)",
                             "data/image", "allocated/image"], rows):
        bench.say("  " + line)
    for size in SIZES_GIB:
        bench.say(f"  {size} GiB, median of each phase (s): " + ", ".join(
            f"{name} {seconds:.3f}"
            for name, seconds in stats.median_phases(phases[size]).items()))
    for size_gib in SIZES_GIB:
        verdict = Verdict(NAME, f"data written by a warm create, {size_gib} GiB disk, "
                                f"/image's data", left[size_gib].written / image_data, TARGET)
        bench.verdicts.append(verdict)
        bench.say("  " + verdict.line())
    largest, smallest = stats.median(times[SIZES_GIB[-1]]), stats.median(times[SIZES_GIB[0]])
    bench.say(f"  warm create time, {SIZES_GIB[-1]} GiB / {SIZES_GIB[0]} GiB disk, medians: "
              f"{stats.ratio(largest, smallest):.2f}")
