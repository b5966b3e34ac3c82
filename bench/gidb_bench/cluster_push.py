"""Measure ganeti-debootstrap-cache push on the two-node test cluster.

Usage (as root): bench/cluster-push [--runs N] [--cache LOCALSTATEDIR] [--workdir DIR]

Builds the Debian package from this tree, starts the two-node Ganeti
cluster of the root tests (tests/root/ganeti_two_nodes.py) with the given
warm cache on node 1 (default: the tests' GIDB_TEST_LOCALSTATEDIR,
/var/tmp/gidb-test-var) and an empty one on node 2, then:

- ``push`` of the default variant's entry to node 2, N times (node 2's
  cache emptied before each): seconds per GiB, end to end and of
  ``gnt-cluster copyfile`` alone;
- N warm creates (2 GiB file disk, ext4) on each node, interleaved:
  node 2's from the pushed entry against node 1's from the entry made
  there (the sum of the create's phases from its OS log, and the
  ``gnt-instance add`` wall time). Target: the same within noise.

Everything lives in a scratch directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.debpackage import build_binary_package
from tests.root.ganeti_cluster import NODE_NAME
from tests.root.ganeti_two_nodes import NODE2_NAME, TwoNodeCluster

# The work tree (bench/cluster-push puts it on sys.path for the tests' harness).
ROOT = Path(__file__).resolve().parent.parent.parent

COMMAND = "usr/sbin/ganeti-debootstrap-cache"
OS_DIR = "usr/share/ganeti/os/debootstrap"
CACHE = "cache/ganeti-instance-debootstrap"
PHASE = re.compile(r"^.*: done in ([0-9.]+) s$", re.MULTILINE)


def json_result(output: str) -> list[dict[str, object]]:
    match = re.search(r"^\[\]?$", output, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no JSON result in:\n{output}")
    result, _ = json.JSONDecoder().raw_decode(output[match.start():])
    assert isinstance(result, list)
    return result


def create_seconds(log_dir: Path, name: str) -> float:
    """The sum of the phases of the create of ``name``, from its OS log."""
    [log] = [p for p in log_dir.iterdir()
             if p.name.startswith(f"add-debootstrap+default-{name}-")]
    return sum(float(s) for s in PHASE.findall(log.read_text()))


def measure(cluster: TwoNodeCluster, command: str, node2_cache: Path, runs: int) -> None:
    rates = []
    for run in range(1, runs + 1):
        for path in node2_cache.iterdir():
            path.unlink()
        start = time.monotonic()
        [entry] = json_result(cluster.run(command, "push", "default", "--json").stdout)
        wall = time.monotonic() - start
        gib = float(str(entry["bytes"])) / 2**30
        copy = float(str(entry["copy_seconds"]))
        rates.append((wall / gib, copy / gib))
        print(f"push {run}: {entry['bytes']} bytes ({gib:.3f} GiB), {wall:.1f} s "
              f"({copy:.1f} s gnt-cluster copyfile, {entry['receive_seconds']} s receive "
              f"on node 2): {wall / gib:.1f} s/GiB, copyfile {copy / gib:.1f} s/GiB",
              flush=True)
    logs = {NODE_NAME: cluster.os_log_dir, NODE2_NAME: cluster.node2_os_log_dir}
    creates: dict[str, list[float]] = {NODE_NAME: [], NODE2_NAME: []}
    adds: dict[str, list[float]] = {NODE_NAME: [], NODE2_NAME: []}
    count = 0
    for run in range(runs):
        order = (NODE_NAME, NODE2_NAME) if run % 2 == 0 else (NODE2_NAME, NODE_NAME)
        for node in order:
            count += 1
            name = f"bench{count}"
            start = time.monotonic()
            cluster.run("gnt-instance", "add", "-t", "file", "-s", "2G",
                        "-o", "debootstrap+default", "-O", "filesystem=ext4",
                        "--no-name-check", "--no-ip-check", "--no-start", "-n", node, name)
            adds[node].append(time.monotonic() - start)
            creates[node].append(create_seconds(logs[node], name))
            cluster.run("gnt-instance", "remove", "-f", name)
    print("== push ==")
    print(f"  push of one entry to one node: {statistics.median(r[0] for r in rates):.1f} "
          f"s/GiB (median of {runs}; gnt-cluster copyfile alone "
          f"{statistics.median(r[1] for r in rates):.1f} s/GiB)")
    print("== warm create on node 2 from a pushed entry ==")
    for node, what in ((NODE_NAME, "node 1, entry made there"),
                       (NODE2_NAME, "node 2, pushed entry")):
        print(f"  {what}: create {statistics.median(creates[node]):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in creates[node])}); gnt-instance add "
              f"{statistics.median(adds[node]):.2f} s")
    ratio = statistics.median(creates[NODE2_NAME]) / statistics.median(creates[NODE_NAME])
    print(f"  pushed/local, medians: {ratio:.2f} (target: the same within noise)")
    print(f"  load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", default=os.environ.get("GIDB_TEST_LOCALSTATEDIR",
                                                          "/var/tmp/gidb-test-var"),
                        help="a localstatedir whose cache holds the default variant's entry")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    cache = Path(args.cache) / CACHE
    if not any(cache.glob("cache-*.tar")):
        raise SystemExit(f"{cache} holds no cache entry: run the root tests (or "
                         f"ganeti-debootstrap-cache build) with that localstatedir first")
    work = Path(tempfile.mkdtemp(prefix="gidb-cluster-push.", dir=args.workdir))
    try:
        package = build_binary_package(ROOT, work / "deb")
        root = work / "root"
        subprocess.run(["dpkg-deb", "--extract", str(package.deb), str(root)], check=True)
        node2_cache = work / "node2-cache"
        node2_cache.mkdir(mode=0o755)
        with TwoNodeCluster(root / OS_DIR, work / "cluster", package_root=root,
                            cache_dir=cache, node2_cache_dir=node2_cache) as cluster:
            measure(cluster, str(root / COMMAND), node2_cache, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
