"""Through Ganeti: ours against Debian's shell edition, installed side by side.

One real Ganeti cluster (tests/root/ganeti_cluster.py: Ganeti 3.0 in
private namespaces, file disks, the fake hypervisor) holds two OS
definitions: ours, the installation under test, as ``debootstrap``, and
the shell edition Debian ships (the ``ganeti-instance-debootstrap`` package
of the node's archive, unpacked with dpkg-deb) as ``debootstrap-shell``.
Each is timed through Ganeti's own commands, interleaved: a warm
``gnt-instance add``, ``gnt-backup export`` of that instance and
``gnt-backup import`` of the export under a new name (Ganeti then runs the
rename script too). What Ganeti adds (jobs, disk files, loop devices, the
transfer daemons) is in both.

Both run with PARTITION_STYLE=none: the shell edition reaches partitions
through kpartx, which gives no partition devices on a kernel without
device-mapper, as on these test machines. Both read the same settings
(SUITE, no expiry) and run the same hooks directory, and both install the
same files: ours uses the benchmark's warm cache, and the shell edition
finds that cache's archive (a tar of the tree, the format it keeps) under
the name it looks for, ``cache-SUITE-ARCH.tar`` (the cluster has no route
to a mirror, so it could not bootstrap one itself). The shell edition's
fixed paths (/etc/default, /var/cache) are scratch directories bound over
the node's inside the cluster's mount namespace only. One untimed add of
each comes first.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from collections.abc import Callable

from ganeti_debootstrap.settings import DEFAULT_SUITE
from tests.root.ganeti_cluster import NODE_NAME, GanetiCluster

from . import stats
from .context import GIB, Bench
from .procs import BenchError

NAME = "ganeti"
OURS = "debootstrap"
SHELL = "debootstrap-shell"
LABELS = ("shell edition", "ours")
OS_OF = {"shell edition": SHELL, "ours": OURS}
DISK_SIZE = "2G"
DISK_BYTES = 2 * GIB
PACKAGE = "ganeti-instance-debootstrap"
ACTIONS = ("add", "export", "import")
_SHELL_SETTINGS = (f'SUITE="{DEFAULT_SUITE}"\nPARTITION_STYLE="none"\nCLEAN_CACHE=""\n'
                   'GENERATE_CACHE="yes"\n')


def _shell_edition(bench: Bench) -> tuple[str, str]:
    """Debian's package, downloaded and unpacked: (its OS dir copy, its version)."""
    base = bench.path("shell-edition")
    os.makedirs(base)
    proc = subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", PACKAGE],
                          cwd=base, capture_output=True, text=True, timeout=300)
    debs = glob.glob(os.path.join(base, f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise BenchError(f"apt-get download {PACKAGE} failed (status {proc.returncode}): "
                         f"{proc.stderr.strip()[-600:]}; run apt-get update, or leave "
                         f"the {NAME} scenario out")
    version = os.path.basename(debs[0]).split("_")[1]
    root = os.path.join(base, "root")
    subprocess.run(["dpkg-deb", "--extract", debs[0], root], check=True, timeout=120)
    # A copy of its OS dir whose variants.list is a file: the package's is a
    # link into /etc/ganeti, which belongs to the cluster.
    os_dir = os.path.join(base, "os")
    shutil.copytree(os.path.join(root, "usr/share/ganeti/os/debootstrap"), os_dir,
                    symlinks=True)
    variants = os.path.join(os_dir, "variants.list")
    if os.path.lexists(variants):
        os.unlink(variants)
    with open(variants, "w") as f:
        f.write("default\n")
    return os_dir, version


def _shell_paths(bench: Bench) -> dict[str, str]:
    """Scratch /etc/default and /var/cache for the shell edition's fixed paths."""
    etc_default = bench.path("shell-edition", "etc-default")
    shutil.copytree("/etc/default", etc_default, symlinks=True)
    variants_dir = bench.path("shell-edition", "variants")
    os.makedirs(variants_dir)
    open(os.path.join(variants_dir, "default.conf"), "w").close()
    with open(os.path.join(etc_default, PACKAGE), "w") as f:
        f.write(_SHELL_SETTINGS + f'VARIANTS_DIR="{variants_dir}"\n'
                f'CUSTOMIZE_DIR="{bench.inst.hooks_dir}"\n')
    var_cache = bench.path("shell-edition", "var-cache")
    cache_dir = os.path.join(var_cache, PACKAGE)
    os.makedirs(cache_dir)
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()
    shutil.copyfile(bench.archive, os.path.join(cache_dir, f"cache-{DEFAULT_SUITE}-{arch}.tar"))
    return {"/etc/default": etc_default, "/var/cache": var_cache}


def _add(cluster: GanetiCluster, os_name: str, name: str) -> None:
    cluster.run("gnt-instance", "add", "-t", "file", "-s", DISK_SIZE,
                "-o", f"{os_name}+default", "--no-name-check", "--no-ip-check",
                "--no-start", "-n", NODE_NAME, name)


def _export(cluster: GanetiCluster, name: str) -> None:
    cluster.run("gnt-backup", "export", "-n", NODE_NAME, name)


def _import(cluster: GanetiCluster, source: str, name: str) -> None:
    cluster.run("gnt-backup", "import", "-t", "file", "-n", NODE_NAME,
                f"--src-node={NODE_NAME}", f"--src-dir=/var/lib/ganeti/export/{source}",
                "--net", "0:mac=generate", "--no-name-check", "--no-ip-check", name)


def _clean(cluster: GanetiCluster, *names: str) -> None:
    for name in names:
        cluster.run("gnt-instance", "remove", "-f", name, check=False)
        cluster.run("gnt-backup", "remove", name, check=False)


def _timed(step: Callable[..., None], *args: object) -> float:
    start = time.monotonic()
    step(*args)
    return time.monotonic() - start


def run(bench: Bench) -> None:
    runs = bench.options.runs
    os_dir, version = _shell_edition(bench)
    bench.say(f"Through a one-node Ganeti {_ganeti_version()} test cluster (file disks, "
              f"fake hypervisor): gnt-instance add (warm), gnt-backup export, gnt-backup "
              f"import (then rename) of a {DISK_SIZE} instance; ours against Debian's shell "
              f"edition {version} installed beside it; PARTITION_STYLE=none, SUITE="
              f"{DEFAULT_SUITE} for both; runs: {runs} of each, interleaved.")
    with open(bench.inst.defaults_file) as f:
        our_settings = f.read()
    try:
        with open(bench.inst.defaults_file, "a") as f:
            f.write('\n# bench/run ganeti: as the shell edition can here.\n'
                    'PARTITION_STYLE="none"\n')
        bench.restore_warm_cache()
        with GanetiCluster(bench.inst.os_dir, bench.path("ganeti"), os_name=OURS,
                           extra_os={SHELL: os_dir}, binds=_shell_paths(bench)) as cluster:
            _measure(bench, cluster, runs)
    finally:
        with open(bench.inst.defaults_file, "w") as f:
            f.write(our_settings)


def _measure(bench: Bench, cluster: GanetiCluster, runs: int) -> None:
    for label in LABELS:
        start = time.monotonic()
        name = f"warmup-{OS_OF[label]}"
        _add(cluster, OS_OF[label], name)
        _clean(cluster, name)
        bench.say(f"  warm-up add, {label}: {time.monotonic() - start:.1f} s (untimed)")
    times: dict[tuple[str, str], list[float]] = {(a, lb): [] for a in ACTIONS for lb in LABELS}
    for round_no, label in stats.interleaved(LABELS, runs):
        tag = "sh" if label == "shell edition" else "py"
        name, copy = f"{tag}-{round_no}", f"{tag}-{round_no}-imported"
        bench.quiesce()
        try:
            times[("add", label)].append(_timed(_add, cluster, OS_OF[label], name))
            bench.quiesce()
            times[("export", label)].append(_timed(_export, cluster, name))
            bench.quiesce()
            times[("import", label)].append(_timed(_import, cluster, name, copy))
        finally:
            _clean(cluster, name, copy)
        bench.say(f"  run {round_no + 1}/{runs} {label:13} "
                  + ", ".join(f"{a} {stats.seconds(times[(a, label)][-1])} s"
                              for a in ACTIONS))
    rows = []
    for action in ACTIONS:
        shell = stats.median(times[(action, "shell edition")])
        ours = stats.median(times[(action, "ours")])
        rows.append([f"gnt-{'instance' if action == 'add' else 'backup'} {action}",
                     stats.seconds(shell), stats.seconds(ours),
                     f"{stats.ratio(ours, shell):.2f}"])
    for line in stats.table(["median", "shell edition (s)", "ours (s)", "ours/shell"], rows):
        bench.say("  " + line)


def _ganeti_version() -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "ganeti"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "(unknown version)"
