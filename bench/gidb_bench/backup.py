"""Export, import and rename: ours against dump, restore and sed done by hand.

On one freshly created instance (2 GiB file disk, msdos, ext4, the default
suite): our export (which checks the disk and announces the stream size)
against ``dump -0`` of the same filesystem by hand; our import (which
partitions and formats like create, checks the stream's trailer and adapts
fstab and identity) against sfdisk, mkfs.ext4 and ``restore -r`` by hand;
our rename of the imported instance (which finds and checks its root,
mounts it and rewrites hostname, mailname and hosts) against a mount and a
``sed`` of /etc/hostname and /etc/mailname by hand (bench/reference-backup).
Both write the stream to a file on the work dir's filesystem and read it
from there. There is no target for these: the numbers and the stream sizes
are reported.
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
OLD_NAME = "bk.example.org"
NEW_NAME = "rn.example.org"


def _root_offset(disk: str) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", disk], check=True,
                                      capture_output=True, text=True).stdout)
    part = table["partitiontable"]["partitions"][0]
    return int(part["start"]) * int(table["partitiontable"].get("sectorsize", 512))


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"Ours: the installed export, import and rename; by hand: dump -0 / "
              f"sfdisk + mkfs.ext4 + restore -r / mount + sed (bench/reference-backup). "
              f"A fresh instance on a 2 GiB sparse file disk, each import renamed; "
              f"runs: {runs} of each, interleaved.")
    source = bench.fresh_disk("backup-source.img", DISK_BYTES)
    bench.ours_create(source, "bk.example.org", "backup-create")
    offset = _root_offset(source)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("export by hand", "export ours",
                                      "import by hand", "import ours",
                                      "rename by hand", "rename ours")}
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
        bench.quiesce()
        result = _one(bench, label, "rename", target, offset, round_no)
        times[f"rename {label}"].append(result.seconds)
        bench.say(f"  run {round_no + 1}/{runs} {label:8} export "
                  f"{stats.seconds(times['export ' + label][-1])} s, import "
                  f"{stats.seconds(times['import ' + label][-1])} s, rename "
                  f"{stats.seconds(times['rename ' + label][-1])} s")
    medians = {k: stats.median(v) for k, v in times.items()}
    rows = [[what, stats.seconds(medians[f"{what} by hand"]),
             stats.seconds(medians[f"{what} ours"]),
             f"{stats.ratio(medians[f'{what} ours'], medians[f'{what} by hand']):.2f}"]
            for what in ("export", "import", "rename")]
    for line in stats.table(["median", "by hand (s)", "ours (s)", "ours/by hand"], rows):
        bench.say("  " + line)
    bench.say(f"  stream size: ours {sizes.get('ours', 0) / MIB:.1f} MiB, by hand "
              f"{sizes.get('by hand', 0) / MIB:.1f} MiB")


def _one(bench: Bench, label: str, action: str, disk: str, offset: int, round_no: int,
         stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> procs.Result:
    """One export, import or rename of ``disk`` (root at byte ``offset``), ours
    or by hand; rename goes from OLD_NAME to NEW_NAME."""
    if label == "ours":
        if action == "rename":
            env = install.create_env(NEW_NAME, disk, DISK_BYTES // MIB,
                                     OLD_INSTANCE_NAME=OLD_NAME)
        else:
            prefix = action.upper()
            env = install.create_env(OLD_NAME, disk, DISK_BYTES // MIB,
                                     **{f"{prefix}_INDEX": "0", f"{prefix}_DISK_PATH": disk,
                                        f"{prefix}_DEVICE": disk})
        return bench.ours(action, env, f"backup-{action}-{round_no}", stdin=stdin,
                          stdout=stdout)
    script = os.path.join(bench.source_root, "bench", "reference-backup")
    names = [OLD_NAME, NEW_NAME] if action == "rename" else []
    return procs.run(["/bin/bash", script, action, disk, str(offset), *names],
                     env=install.ganeti_env(),
                     log_path=bench.log_path(f"backup-{action}-ref-{round_no}"),
                     umask=0o077, stdin=stdin, stdout=stdout)
