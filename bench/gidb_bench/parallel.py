"""Four creates started together on a cold node.

Target: they bootstrap once (the others wait for the cache and reuse it)
and all four finish within the time of one cold create plus three warm
ones, both medians of this invocation (the cold and warm scenarios, or
measured here when those did not run).
"""

from __future__ import annotations

import glob
import os

from . import install, procs, stats
from .cold import DISK_BYTES as COLD_DISK_BYTES
from .context import GIB, Bench, bootstrapped
from .procs import BenchError
from .stats import Verdict

NAME = "parallel"
COUNT = 4
DISK_BYTES = 2 * GIB


def _cold_median(bench: Bench) -> float:
    if "cold ours" in bench.medians:
        return bench.medians["cold ours"]
    times = []
    for i in range(bench.options.cold_runs):
        cache = bench.fresh_cache("parallel-cold")
        try:
            disk = bench.fresh_disk("parallel-cold.img", COLD_DISK_BYTES)
            bench.quiesce()
            result = bench.ours_create(disk, "cold.example.org", f"parallel-cold-{i + 1}")
        finally:
            bench.restore_warm_cache()
            bench.discard(cache)
        times.append(result.seconds)
        bench.say(f"  cold create {i + 1}: {stats.seconds(result.seconds)} s")
    bench.medians["cold ours"] = stats.median(times)
    return bench.medians["cold ours"]


def _warm_median(bench: Bench) -> float:
    if "warm ours" in bench.medians:
        return bench.medians["warm ours"]
    times = []
    for i in range(bench.options.runs):
        disk = bench.fresh_disk("parallel-warm.img", DISK_BYTES)
        bench.quiesce()
        times.append(bench.ours_create(disk, "warm.example.org",
                                       f"parallel-warm-{i + 1}").seconds)
    bench.medians["warm ours"] = stats.median(times)
    return bench.medians["warm ours"]


def run(bench: Bench) -> None:
    bench.say(f"{COUNT} installed creates started at once, each on its own 2 GiB "
              f"sparse disk, sharing one empty cache directory.")
    known = "cold ours" in bench.medians and "warm ours" in bench.medians
    if not known:
        bench.say("  (the cold or warm scenario did not run: measuring their medians here)")
    cold, warm = _cold_median(bench), _warm_median(bench)
    cache = bench.fresh_cache("parallel")
    try:
        disks = [bench.fresh_disk(f"parallel-{i + 1}.img", DISK_BYTES) for i in range(COUNT)]
        bench.quiesce()
        group = [bench.start_ours("create", install.create_env(
                     f"parallel{i + 1}.example.org", disk, DISK_BYTES >> 20),
                     f"parallel-{i + 1}") for i, disk in enumerate(disks)]
        results = procs.wait_all(group)
        for result in results:
            procs.check_result(result)
        archives = glob.glob(os.path.join(cache, "cache-*.tar"))
    finally:
        bench.restore_warm_cache()
        bench.discard(cache)
    first = min(r.started for r in results)
    wall = max(r.ended for r in results) - first
    bootstraps = 0
    rows = []
    for i, result in enumerate(results):
        text = result.log_text()
        phases = stats.phase_times(text)
        did = bootstrapped(text)
        bootstraps += did
        role = ("bootstrapped" if did else
                "made the image" if "Made the filesystem image" in text else "copied the image")
        rows.append([f"create {i + 1}", stats.seconds(result.ended - first), role,
                     f"{phases.get('filesystem image', 0.0):.2f}"])
    for line in stats.table(["", "finished at (s)", "what it did", "image phase (s)"], rows):
        bench.say("  " + line)
    budget = cold + (COUNT - 1) * warm
    bench.say(f"  wall time of the {COUNT}: {stats.seconds(wall)} s; budget: median cold "
              f"{stats.seconds(cold)} s + {COUNT - 1} x median warm {stats.seconds(warm)} s "
              f"= {stats.seconds(budget)} s")
    if len(archives) != 1:
        raise BenchError(f"the parallel creates left {len(archives)} cache archives, not 1")
    for verdict in (
            Verdict(NAME, f"{COUNT} parallel creates, wall/(cold + {COUNT - 1} warm)",
                    stats.ratio(wall, budget), 1.0),
            Verdict(NAME, f"bootstraps run by the {COUNT} creates", bootstraps, 1,
                    exact=True)):
        bench.verdicts.append(verdict)
        bench.say("  " + verdict.line())
