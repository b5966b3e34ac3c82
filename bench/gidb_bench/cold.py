"""Cold create: ours with an empty cache vs plain debootstrap of the same suite.

Target: ours (BOOTSTRAP_TOOL=auto, so mmdebstrap) takes at most half of
``debootstrap SUITE DIR``. Ours with BOOTSTRAP_TOOL=debootstrap is measured
too: its ratio is our overhead around the same tool (partitioning, mkfs,
cleaning the tree, storing the cache archive), reported without a target.
Each of our runs gets a new empty cache directory. The peak resident memory
of a cold create (the largest process of its tree, bootstrap tool and apt
included) is held to the memory scenario's target too.
"""

from __future__ import annotations

import re

from . import install, memory, procs, stats
from .context import GIB, Bench, bootstrapped
from .procs import GANETI_PATH, BenchError, Result, run as run_command
from .stats import Verdict

NAME = "cold"
TARGET = 0.5
DISK_BYTES = 2 * GIB
DEBOOTSTRAP_VARIANT = "debootstrap"
LABELS = ("debootstrap", "ours", "ours-debootstrap")
SAMPLE_SECONDS = 0.05
HEADERS = {"debootstrap": "debootstrap (s)", "ours": "ours, auto (s)",
           "ours-debootstrap": "ours, debootstrap (s)"}


def tool_used(log_text: str) -> str:
    """The bootstrap tool a create's log names ("Bootstrapping SUITE with TOOL")."""
    m = re.search(r"^Bootstrapping \S+ with (\S+)", log_text, re.MULTILINE)
    return m.group(1) if m else "none"


def run(bench: Bench, suite: str) -> None:
    runs = bench.options.cold_runs
    bench.say(f"Reference: debootstrap {suite} DIR (debootstrap's default mirror, into "
              f"a directory of the work dir's filesystem). Ours: the installed create, "
              f"2 GiB sparse disk, each run with an empty cache directory, "
              f"BOOTSTRAP_TOOL=auto and (variant {DEBOOTSTRAP_VARIANT}) "
              f"BOOTSTRAP_TOOL=debootstrap. Runs: {runs} of each, interleaved.")
    times: dict[str, list[float]] = {label: [] for label in LABELS}
    peaks: dict[str, list[int]] = {label: [] for label in LABELS}
    tools: dict[str, set[str]] = {label: set() for label in LABELS}
    for round_no, label in stats.interleaved(LABELS, runs):
        bench.quiesce()
        child = ""
        if label == "debootstrap":
            result = _debootstrap(bench, suite, f"cold-{round_no + 1}-debootstrap")
            tools[label].add("debootstrap")
        else:
            result, (name, kib) = _ours(bench, label, f"cold-{round_no + 1}-{label}")
            tools[label].add(tool_used(result.log_text()))
            child = f"; largest child seen: {name} {stats.mib(kib)} MiB"
        times[label].append(result.seconds)
        peaks[label].append(result.maxrss_kib)
        bench.say(f"  run {round_no + 1}/{runs} {label:16}  {stats.seconds(result.seconds)} s"
                  f"  (peak of the tree's largest process: {stats.mib(result.maxrss_kib)} MiB"
                  f"{child})")
    medians = {label: stats.median(times[label]) for label in LABELS}
    bench.medians["cold ours"] = medians["ours"]
    rows = [[str(i + 1)] + [stats.seconds(times[label][i]) for label in LABELS]
            for i in range(runs)]
    rows.append(["median"] + [stats.seconds(medians[label]) for label in LABELS])
    for line in stats.table(["run"] + [HEADERS[label] for label in LABELS], rows):
        bench.say("  " + line)
    bench.say("  tools that bootstrapped: " + ", ".join(
        f"{label}: {'/'.join(sorted(tools[label]))}" for label in LABELS))
    bench.say("  peak resident memory, largest process of each tree (max over runs, "
              "MiB): " + ", ".join(f"{label} {stats.mib(max(peaks[label]))}"
                                   for label in LABELS))
    verdict = Verdict(NAME, "cold create, ours (auto)/debootstrap",
                      stats.ratio(medians["ours"], medians["debootstrap"]), TARGET,
                      note=f"ours bootstrapped with {'/'.join(sorted(tools['ours']))}")
    bench.verdicts.append(verdict)
    bench.say("  " + verdict.line())
    for label in ("ours", "ours-debootstrap"):
        peak = Verdict(NAME, f"peak resident memory of a cold create, {label}",
                       max(peaks[label]) / 1024, memory.TARGET_MIB, " MiB",
                       note="largest process of the tree, apt included")
        bench.verdicts.append(peak)
        bench.say("  " + peak.line())
    overhead = stats.ratio(medians["ours-debootstrap"], medians["debootstrap"])
    bench.say(f"  ours with BOOTSTRAP_TOOL=debootstrap / debootstrap: {overhead:.3f} "
              f"(no target: our overhead around the same tool, "
              f"{medians['ours-debootstrap'] - medians['debootstrap']:+.1f} s)")


def _debootstrap(bench: Bench, suite: str, log_name: str) -> Result:
    dest = bench.path("debootstrap-tree")
    bench.remove_tree(dest)
    try:
        return run_command(["debootstrap", suite, dest], env={"PATH": GANETI_PATH},
                           log_path=bench.log_path(log_name))
    finally:
        bench.discard(dest)


def _ours(bench: Bench, label: str, log_name: str) -> tuple[Result, tuple[str, int]]:
    """Our create on an empty cache; its result and its largest child (sampled)."""
    variant = DEBOOTSTRAP_VARIANT if label == "ours-debootstrap" else "default"
    cache = bench.fresh_cache("cold")
    try:
        disk = bench.fresh_disk("cold.img", DISK_BYTES)
        env = install.create_env("cold.example.org", disk, DISK_BYTES >> 20, variant)
        # Sampled (seldom: the tree is large) to name its largest process.
        running = bench.start_ours("create", env, log_name, sample_every=SAMPLE_SECONDS)
        result = procs.wait(running)
        procs.check_result(result)
        assert running.sampler is not None
        if not bootstrapped(result.log_text()):
            raise BenchError(f"the cold create (log {result.log_path}) did not "
                             f"bootstrap: its cache directory was not empty?")
        return result, running.sampler.largest_child()
    finally:
        bench.restore_warm_cache()
        bench.discard(cache)
