"""Peak resident memory of a (warm) create, for a 2 GiB and a 20 GiB disk.

Target: under 100 MiB whatever the disk size. Reported apart: the python
process itself (its VmHWM, sampled while it runs) and the largest of its
children (sampled, with its name); the verdict uses wait4's ru_maxrss of
the whole tree, the exact peak of its largest process (children included,
even those too short-lived for the sampler).
"""

from __future__ import annotations

from . import install, procs, stats
from .context import GIB, Bench
from .stats import Verdict

NAME = "memory"
TARGET_MIB = 100
GROWTH_MIB = 10  # "independent of disk size": 2 -> 20 GiB may add this much
SIZES_GIB = (2, 20)
SAMPLE_SECONDS = 0.01


def run(bench: Bench) -> None:
    runs = bench.options.runs
    bench.say(f"The installed create from the warm cache onto sparse disks of "
              f"{' and '.join(str(s) for s in SIZES_GIB)} GiB; runs: {runs} of each, "
              f"interleaved; the tree's processes sampled every 10 ms.")
    own: dict[int, list[int]] = {s: [] for s in SIZES_GIB}
    tree: dict[int, list[int]] = {s: [] for s in SIZES_GIB}
    child: dict[int, tuple[str, int]] = {s: ("none seen", 0) for s in SIZES_GIB}
    for round_no, label in stats.interleaved([str(s) for s in SIZES_GIB], runs):
        size = int(label)
        disk = bench.fresh_disk(f"memory-{size}.img", size * GIB)
        bench.quiesce()
        running = bench.start_ours("create", install.create_env(
            "memory.example.org", disk, size * 1024), f"memory-{size}-{round_no + 1}",
            sample_every=SAMPLE_SECONDS)
        result = procs.wait(running)
        procs.check_result(result)
        assert running.sampler is not None
        own[size].append(running.sampler.own_peak())
        tree[size].append(result.maxrss_kib)
        largest = running.sampler.largest_child()
        if largest[1] > child[size][1]:
            child[size] = largest
    rows = [[f"{size} GiB", stats.mib(max(own[size])),
             f"{child[size][0]} {stats.mib(child[size][1])}", stats.mib(max(tree[size]))]
            for size in SIZES_GIB]
    for line in stats.table(["disk", "python (MiB)", "largest child (MiB)",
                             "largest of the tree, wait4 (MiB)"], rows):
        bench.say("  " + line)
    bench.say("  (maximum over the runs)")
    small, large = SIZES_GIB[0], SIZES_GIB[-1]
    verdicts = [Verdict(NAME, f"peak resident memory of a create, {size} GiB disk",
                        max(tree[size]) / 1024, TARGET_MIB, " MiB",
                        note=f"python itself {stats.mib(max(own[size]))} MiB")
                for size in SIZES_GIB]
    verdicts.append(Verdict(NAME, f"its growth from a {small} to a {large} GiB disk",
                            (max(tree[large]) - max(tree[small])) / 1024, GROWTH_MIB,
                            " MiB"))
    for verdict in verdicts:
        bench.verdicts.append(verdict)
        bench.say("  " + verdict.line())
