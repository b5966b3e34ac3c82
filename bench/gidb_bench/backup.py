"""Export and import: ours against dump and restore done by hand.

On one freshly created instance (2 GiB file disk, msdos, ext4, the default
suite): our export (which checks the disk and announces the stream size)
against ``dump -0`` of the same filesystem by hand; our import (which
partitions and formats like create, checks the stream's trailer and adapts
fstab and identity) against sfdisk, mkfs.ext4 and ``restore -r`` by hand
(bench/reference-backup). Both write the stream to a file on the work dir's
filesystem and read it from there. There is no target for these: the
numbers and the stream sizes are reported.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import IO

from . import install, procs, stats
from .context import GIB, MIB, Bench

NAME = "backup"
DISK_BYTES = 2 * GIB


def _root_offset(disk: str) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", disk], check=True,
                                      capture_output=True, text=True).stdout)
    part = table["partitiontable"]["partitions"][0]
    return int(part["start"]) * int(table["partitiontable"].get("sectorsize", 512))


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Ours: the installed export and import; by hand: dump -0 / sfdisk + "
              f"mkfs.ext4 + restore -r (bench/reference-backup). A fresh instance "
              f"on a 2 GiB sparse file disk; runs: {runs} of each, interleaved.")
    source = bench.fresh_disk("backup-source.img", DISK_BYTES)
    bench.ours_create(source, "bk.example.org", "backup-create")
    offset = _root_offset(source)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("export by hand", "export ours",
                                      "import by hand", "import ours")}
    sizes: dict[str, int] = {}
    for round_no, label in stats.interleaved(["by hand", "ours"], runs):
        stream = bench.path(f"backup-{label.replace(' ', '-')}.dump")
        bench.quiesce()
        with open(stream, "wb") as out:
            result = _one(bench, label, "export", source, offset, round_no, stdout=out)
        times[f"export {label}"].append(result.seconds)
        sizes[label] = os.path.getsize(stream)
        target = bench.fresh_disk("backup-target.img", DISK_BYTES)
        bench.quiesce()
        with open(stream, "rb") as inp:
            result = _one(bench, label, "import", target, offset, round_no, stdin=inp)
        times[f"import {label}"].append(result.seconds)
        os.unlink(stream)
        bench.say(f"  run {round_no + 1}/{runs} {label:8} export "
                  f"{stats.seconds(times['export ' + label][-1])} s, import "
                  f"{stats.seconds(times['import ' + label][-1])} s")
    medians = {k: stats.median(v) for k, v in times.items()}
    rows = [[what, stats.seconds(medians[f"{what} by hand"]),
             stats.seconds(medians[f"{what} ours"]),
             f"{stats.ratio(medians[f'{what} ours'], medians[f'{what} by hand']):.2f}"]
            for what in ("export", "import")]
    for line in stats.table(["median", "by hand (s)", "ours (s)", "ours/by hand"], rows):
        bench.say("  " + line)
    bench.say(f"  stream size: ours {sizes.get('ours', 0) / MIB:.1f} MiB, by hand "
              f"{sizes.get('by hand', 0) / MIB:.1f} MiB")


def _one(bench: Bench, label: str, action: str, disk: str, offset: int, round_no: int,
         stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> procs.Result:
    """One export or import of ``disk`` (root at byte ``offset``), ours or by hand."""
    if label == "ours":
        prefix = action.upper()
        env = install.create_env("bk.example.org", disk, DISK_BYTES // MIB,
                                 **{f"{prefix}_INDEX": "0", f"{prefix}_DISK_PATH": disk,
                                    f"{prefix}_DEVICE": disk})
        return bench.ours(action, env, f"backup-{action}-{round_no}", stdin=stdin,
                          stdout=stdout)
    script = os.path.join(bench.source_root, "bench", "reference-backup")
    return procs.run(["/bin/bash", script, action, disk, str(offset)],
                     env=install.ganeti_env(),
                     log_path=bench.log_path(f"backup-{action}-ref-{round_no}"),
                     umask=0o077, stdin=stdin, stdout=stdout)
