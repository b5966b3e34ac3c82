"""Part of the warm scenario: creates on filesystems that share blocks.

For XFS (reflink) and Btrfs, each made by the benchmark on a loop device in
its scratch directory: the warm cache (archive, ext4 image and records)
copied onto it, and warm creates whose disk file lies on the same
filesystem (the image's extents are cloned) interleaved with creates whose
disk file lies on the work dir's filesystem (copied, as everywhere else)
and with creates from the warm cache on the work dir whose disk file lies
in Ganeti's layout on the shared filesystem (``<storage>/<instance>/disk``:
cloned from the copy image_share.py keeps beside the storage, made by an
untimed create first). Target: a warm create on such storage in at most
0.2 s.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

from . import diskio, stats
from .context import GIB, MIB, Bench
from .stats import Verdict

NAME = "warm"
TARGET_SECONDS = 0.2
DISK_BYTES = 2 * GIB
FS_BYTES = 6 * GIB
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Warm creates with the cache on a filesystem that shares blocks, the "
              f"disk file beside it (shared) or on the work dir's filesystem "
              f"(copied); and the cache on the work dir, the disk file in Ganeti's "
              f"layout <storage>/<instance>/<file> on the sharing filesystem, cloned "
              f"from the copy kept beside the storage (storage); 2 GiB sparse disks, "
              f"{runs} of each, interleaved.")
    for fstype in MKFS:
        if shutil.which(MKFS[fstype][0]) is None:
            bench.say(f"  {fstype}: skipped, {MKFS[fstype][0]} is not installed")
            continue
        try:
            _one_filesystem(bench, fstype)
        finally:
            bench.restore_warm_cache()


def _one_filesystem(bench: Bench, fstype: str) -> None:
    base = bench.path("reflink")
    os.makedirs(base, exist_ok=True)
    backing = os.path.join(base, f"{fstype}.fs")
    with open(backing, "wb") as f:
        f.truncate(FS_BYTES)
    subprocess.run([*MKFS[fstype], backing], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                          capture_output=True, text=True).stdout.strip()
    point = os.path.join(base, f"{fstype}-mnt")
    os.makedirs(point, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", fstype, loop, point], check=True)
        try:
            _measure(bench, fstype, point)
        finally:
            subprocess.run(["umount", point], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
        os.unlink(backing)


def _measure(bench: Bench, fstype: str, point: str) -> None:
    runs = bench.options.runs
    cache = os.path.join(point, "cache")
    os.makedirs(cache, mode=0o755)
    stem = os.path.basename(bench.archive)[:-len(".tar")]
    for path in glob.glob(os.path.join(bench.warm_cache, f"{stem}.*")):
        if path.endswith((".tar", ".inputs.json", ".ext4.img", ".ext4.img.json")):
            shutil.copy2(path, os.path.join(cache, os.path.basename(path)))
    storage = os.path.join(point, "file-storage")
    os.makedirs(os.path.join(storage, "instance"), mode=0o755)
    os.sync()
    # The copy beside the storage, made once (untimed), as the first create
    # after a new or refreshed image makes it.
    bench.inst.use_cache(bench.warm_cache)
    first = _storage_disk(storage)
    bench.ours_create(first, "reflink.example.org", f"reflink-{fstype}-storage-copy")
    os.unlink(first)
    labels = ["shared", "copied", "storage"]
    times: dict[str, list[float]] = {label: [] for label in labels}
    phase: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    data: dict[str, diskio.Allocation] = {}
    for round_no, label in stats.interleaved(labels, runs):
        bench.inst.use_cache(bench.warm_cache if label == "storage" else cache)
        if label == "shared":
            disk = os.path.join(point, "disk.img")
            with open(disk, "wb") as f:
                f.truncate(DISK_BYTES)
        elif label == "storage":
            disk = _storage_disk(storage)
        else:
            disk = bench.fresh_disk("reflink-copied.img", DISK_BYTES)
        bench.quiesce()
        result = bench.ours_create(disk, "reflink.example.org",
                                   f"reflink-{fstype}-{label}-{round_no + 1}")
        times[label].append(result.seconds)
        phase[label].append(stats.phase_times(result.log_text()))
        data[label] = diskio.allocation(disk)
        if label != "copied" and "(reflink)" not in result.log_text():
            bench.say(f"  {fstype}: the create did not share the image's blocks; see "
                      f"{result.log_path}")
        os.unlink(disk)
        bench.say(f"  {fstype} run {round_no + 1}/{runs} {label:7} "
                  f"{stats.seconds(result.seconds)} s")
    for label in labels:
        copy = stats.median([p.get("copy filesystem image", 0.0) for p in phase[label]])
        alloc = data[label]
        bench.say(f"  {fstype} {label}: median {stats.seconds(stats.median(times[label]))} s, "
                  f"image phase {copy:.3f} s; disk file: {alloc.written / MIB:.1f} MiB "
                  f"written, {alloc.shared / MIB:.1f} MiB shared, "
                  f"{alloc.unwritten / MIB:.1f} MiB unwritten")
    verdict = Verdict(NAME, f"warm create, disk file on {fstype} beside the cache",
                      stats.median(times["shared"]), TARGET_SECONDS, unit=" s",
                      note=f"copied there: {stats.median(times['copied']):.3f} s")
    bench.verdicts.append(verdict)
    bench.say("  " + verdict.line())
    verdict = Verdict(NAME, f"warm create, disk file in file storage on {fstype}, "
                      f"the cache elsewhere", stats.median(times["storage"]),
                      TARGET_SECONDS, unit=" s", note="cloned from the copy beside the storage")
    bench.verdicts.append(verdict)
    bench.say("  " + verdict.line())


def _storage_disk(storage: str) -> str:
    """A fresh disk file where Ganeti keeps one: <storage>/<instance>/<file>."""
    disk = os.path.join(storage, "instance", "a1b2.file.disk0")
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    return disk
