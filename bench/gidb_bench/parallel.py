"""Four creates started together on a cold node.

Target: they bootstrap once (the others wait for the cache and reuse it)
and all four finish within the time of one cold create plus three warm
ones. The cold time is measured here, one solo cold create interleaved
with each group of four (the mirror's speed drifts from minute to minute:
a cold create measured minutes earlier says little about this one), the
warm time is the warm scenario's median (or measured here when it did not
run). The verdict compares the medians over the rounds.
"""

from __future__ import annotations

import glob
import os

from . import install, procs, stats
from .cold import DISK_BYTES as COLD_DISK_BYTES
from .context import GIB, Bench, bootstrapped
from .procs import BenchError, Result
from .stats import Verdict

NAME = "parallel"
COUNT = 4
DISK_BYTES = 2 * GIB
LABELS = ("cold", "group")


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


def _cold(bench: Bench, round_no: int) -> float:
    """One solo create on an empty cache, as the cold scenario runs it."""
    cache = bench.fresh_cache("parallel-cold")
    try:
        disk = bench.fresh_disk("parallel-cold.img", COLD_DISK_BYTES)
        bench.quiesce()
        result = bench.ours_create(disk, "cold.example.org", f"parallel-cold-{round_no + 1}")
    finally:
        bench.restore_warm_cache()
        bench.discard(cache)
    if not bootstrapped(result.log_text()):
        raise BenchError(f"the solo cold create (log {result.log_path}) did not bootstrap")
    return result.seconds


def _group(bench: Bench, round_no: int) -> tuple[float, list[Result], int]:
    """Four creates at once on an empty cache: wall time, results, archives left."""
    cache = bench.fresh_cache("parallel")
    try:
        disks = [bench.fresh_disk(f"parallel-{i + 1}.img", DISK_BYTES) for i in range(COUNT)]
        bench.quiesce()
        group = [bench.start_ours("create", install.create_env(
                     f"parallel{i + 1}.example.org", disk, DISK_BYTES >> 20),
                     f"parallel-{round_no + 1}-{i + 1}") for i, disk in enumerate(disks)]
        results = procs.wait_all(group)
        for result in results:
            procs.check_result(result)
        archives = len(glob.glob(os.path.join(cache, "cache-*.tar")))
    finally:
        bench.restore_warm_cache()
        bench.discard(cache)
    first = min(r.started for r in results)
    return max(r.ended for r in results) - first, results, archives


def _describe(bench: Bench, results: list[Result]) -> int:
    """Print what each create of a group did; return how many bootstrapped."""
    first = min(r.started for r in results)
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
        bench.say("    " + line)
    return bootstraps


def run(bench: Bench) -> None:
    runs = bench.options.cold_runs
    bench.say(f"{COUNT} installed creates started at once, each on its own 2 GiB "
              f"sparse disk, sharing one empty cache directory; each group is "
              f"paired with a solo cold create (empty cache), interleaved, "
              f"{runs} rounds.")
    if "warm ours" not in bench.medians:
        bench.say("  (the warm scenario did not run: measuring its median here)")
    warm = _warm_median(bench)
    cold_times: list[float] = []
    walls: list[float] = []
    bootstrap_counts: list[int] = []
    for round_no, label in stats.interleaved(LABELS, runs):
        if label == "cold":
            cold_times.append(_cold(bench, round_no))
            bench.say(f"  round {round_no + 1}: solo cold create "
                      f"{stats.seconds(cold_times[-1])} s")
            continue
        wall, results, archives = _group(bench, round_no)
        walls.append(wall)
        bench.say(f"  round {round_no + 1}: {COUNT} at once, all done in "
                  f"{stats.seconds(wall)} s")
        bootstrap_counts.append(_describe(bench, results))
        if archives != 1:
            raise BenchError(f"the parallel creates left {archives} cache archives, not 1")
    cold = stats.median(cold_times)
    wall = stats.median(walls)
    budget = cold + (COUNT - 1) * warm
    bench.say(f"  median wall time of the {COUNT}: {stats.seconds(wall)} s; budget: median "
              f"solo cold {stats.seconds(cold)} s + {COUNT - 1} x median warm "
              f"{stats.seconds(warm)} s = {stats.seconds(budget)} s")
    for verdict in (
            Verdict(NAME, f"{COUNT} parallel creates, wall/(cold + {COUNT - 1} warm), medians",
                    stats.ratio(wall, budget), 1.0),
            Verdict(NAME, f"bootstraps per group of {COUNT} creates (most in a round)",
                    max(bootstrap_counts), 1, exact=True)):
        bench.verdicts.append(verdict)
        bench.say("  " + verdict.line())
