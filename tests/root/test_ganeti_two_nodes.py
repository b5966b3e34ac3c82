"""Two real Ganeti 3.0 nodes: the cache pushed across, instances created,
exported, imported and moved between the nodes (ganeti_two_nodes.py).

One cluster for the module. Node 1 (the master) holds a copy of the
session's warm bootstrap cache entry, node 2 an empty cache: the warm create on node 2 can only
come from ``ganeti-debootstrap-cache push``. Both see the Debian package
built from this tree where it installs (as in test_ganeti.py). There is no
network to a mirror inside: nothing here bootstraps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.root.aptrepo import BUMP, PACKAGE, copy_entry, make_repository, sources, version_in
from tests.root.bootstrap_fixture import bootstrapped_localstatedir  # noqa: F401
from tests.root.ganeti_cluster import NODE_NAME, host_state, state_differences
from tests.root.ganeti_two_nodes import NODE2_NAME, TwoNodeCluster
from tests.root.ganeti_checks import (  # noqa: F401 - module fixtures shared
    OS_NAME,
    OS_PATH,
    Scenario,
    assert_instance_root,
    assert_no_warnings,
    inspect_disk,
)

COMMAND = "/usr/sbin/ganeti-debootstrap-cache"
NODE2_VARIANT_FILE = "etc-ganeti/instance-debootstrap/variants/default.conf"


def accepted_verify_problems() -> list[str]:
    """What gnt-cluster verify reports here that the harness cannot avoid.

    Each is a part of the message, accepted only where its reason holds.
    Anything else fails the test.
    """
    accepted: list[str] = []
    if not os.path.exists("/proc/sysrq-trigger"):
        # The kernel lacks CONFIG_MAGIC_SYSRQ: no /proc has the file, the
        # machine's own neither; Ganeti (which uses it for hard reboots of
        # KVM and Xen instances) calls that a node setup error.
        accepted.append("node setup error: The procfs filesystem doesn't seem to be "
                        "mounted under /proc, missing required directory /proc/sys "
                        "and the file /proc/sysrq-trigger")
    return accepted


def add_instance(cluster: TwoNodeCluster, name: str, node: str,
                 filesystem: str = "ext4") -> str:
    proc = cluster.run("gnt-instance", "add", "-t", "file", "-s", "1G",
                       "-o", f"{OS_NAME}+default", "-O", f"filesystem={filesystem}",
                       "--no-name-check", "--no-ip-check", "--no-start",
                       "-n", node, name)
    assert_no_warnings(proc)
    return proc.stdout


@pytest.fixture(scope="module")
def two_nodes(os_dir: Path, package_root: Path,
              tmp_path_factory: pytest.TempPathFactory,
              bootstrapped_localstatedir: str,  # noqa: F811
              ) -> Iterator[TwoNodeCluster]:
    workdir = tmp_path_factory.mktemp("ganeti2")
    node2_cache = workdir / "node2-cache"
    node2_cache.mkdir(mode=0o755)
    before = host_state(workdir, os_dir)
    # Node 1's own copy of the session's entry: the refresh test upgrades it.
    cache = Path(copy_entry(bootstrapped_localstatedir, str(workdir / "node1-var")).directory)
    with TwoNodeCluster(os_dir, workdir / "cluster", os_name=OS_NAME,
                        package_root=package_root, cache_dir=cache,
                        node2_cache_dir=node2_cache) as running:
        yield running
    timings = running.format_timings()
    (workdir / "timings.txt").write_text(timings + "\n")
    print(f"\nGaneti timings (two nodes):\n{timings}")
    leftover = state_differences(before, host_state(workdir, os_dir))
    assert not leftover, f"the cluster changed the node: {leftover}"


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario()


def json_result(output: str) -> list[dict[str, Any]]:
    """The --json result in a command's output (stdout and stderr merged)."""
    match = re.search(r"^\[\]?$", output, re.MULTILINE)
    assert match, output
    result, _ = json.JSONDecoder().raw_decode(output[match.start():])
    assert isinstance(result, list)
    return result


def command(root: Path) -> str:
    """The package's administrator command; the same path on both nodes."""
    return str(root / COMMAND.lstrip("/"))


def test_both_nodes_find_our_definition_valid(two_nodes: TwoNodeCluster) -> None:
    diagnose = two_nodes.run("gnt-os", "diagnose").stdout
    print(f"\ngnt-os diagnose:\n{diagnose}")
    assert f"OS: {OS_NAME} [global status: valid]" in diagnose
    # Ganeti 3.0 names the nodes by UUID here.
    uuids = dict(line.split("|") for line in two_nodes.run(
        "gnt-node", "list", "--no-headers", "--separator=|",
        "--output=name,uuid").stdout.split())
    assert set(uuids) == {NODE_NAME, NODE2_NAME}
    for node, uuid in uuids.items():
        assert re.search(rf"Node: {re.escape(uuid)}, status: valid \(path: "
                         rf"{re.escape(OS_PATH)}\)", diagnose), node


def test_the_cluster_verifies_clean(two_nodes: TwoNodeCluster) -> None:
    proc = two_nodes.run("gnt-cluster", "verify", check=False)
    print(f"\ngnt-cluster verify:\n{proc.stdout}")
    problems = [line for line in proc.stdout.splitlines()
                if (" - ERROR: " in line or " - WARNING: " in line)
                and not any(text in line for text in accepted_verify_problems())]
    assert not problems, "gnt-cluster verify:\n" + "\n".join(problems)
    # An error (even an accepted one) makes the exit status non-zero.
    assert proc.returncode == (0 if not accepted_verify_problems() else 1)


def test_push_is_refused_on_a_node_that_is_not_the_master(
        two_nodes: TwoNodeCluster, package_root: Path) -> None:
    proc = two_nodes.run_on_node2(command(package_root), "push", "default", check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"is not the master of its Ganeti cluster; {NODE_NAME} is" in proc.stdout
    assert list(two_nodes.node2_cache_dir.iterdir()) == []


def test_push_is_refused_when_node2_would_use_another_key(
        two_nodes: TwoNodeCluster, package_root: Path) -> None:
    variant = two_nodes.node2_root / NODE2_VARIANT_FILE
    saved = variant.read_text()
    try:
        variant.write_text(saved + "EXTRA_PKGS=less\n")
        proc = two_nodes.run(command(package_root), "push", "default", check=False)
    finally:
        variant.write_text(saved)
    assert proc.returncode == 1, proc.stdout
    assert f"Not pushing: {NODE2_NAME} would use other entries (default: " in proc.stdout
    assert list(two_nodes.node2_cache_dir.iterdir()) == []


def test_build_and_push_make_the_first_create_on_node2_warm(
        two_nodes: TwoNodeCluster, package_root: Path,
        scenario: Scenario, tmp_path: Path) -> None:
    built = two_nodes.run(command(package_root), "build", "default", "--json")
    [result] = json_result(built.stdout)
    assert result["status"] in ("present", "image made")
    start = time.monotonic()
    pushed = two_nodes.run(command(package_root), "push", "default", "--json")
    seconds = time.monotonic() - start
    report = json_result(pushed.stdout)
    print(f"\npush: {json.dumps(report)}\n{seconds:.1f} s")
    [entry] = report
    assert (entry["node"], entry["status"]) == (NODE2_NAME, "pushed")
    names = sorted(p.name for p in two_nodes.node2_cache_dir.iterdir()
                   if not p.name.endswith(".lock"))
    assert f"{entry['entry']}.tar" in names and f"{entry['entry']}.inputs.json" in names
    assert not [n for n in names if n.startswith(".push-")]
    # A second push finds node 2 up to date.
    again = two_nodes.run(command(package_root), "push", "default")
    assert f"{NODE2_NAME}: up to date {entry['entry']}" in again.stdout
    since = time.time()
    add_instance(two_nodes, "inst2", NODE2_NAME)
    [log] = [p for p in two_nodes.node2_os_logs(since)
             if p.name.startswith(f"add-{OS_NAME}+default-inst2-")]
    text = log.read_text()
    print("\nnode 2's create log (last lines):\n" + "\n".join(text.splitlines()[-6:]))
    assert "Using the cache" in text and entry["entry"] in text
    assert "Bootstrapping" not in text
    fs = inspect_disk(two_nodes.instance_disk_path("inst2"), tmp_path / "mnt")
    assert_instance_root(fs, "inst2", "ext4")
    scenario.passed.add("push")


def test_export_on_node1_to_node2_and_import_onto_node2(
        two_nodes: TwoNodeCluster, scenario: Scenario, tmp_path: Path) -> None:
    # Ganeti streams our export on node 1 into the export directory on node 2,
    # then our import on node 2 reads it from there.
    add_instance(two_nodes, "inst1", NODE_NAME)
    original = inspect_disk(two_nodes.instance_disk_path("inst1"), tmp_path / "mnt")
    two_nodes.run("gnt-instance", "startup", "inst1")
    assert_no_warnings(two_nodes.run("gnt-backup", "export", "--long-sleep",
                                     "-n", NODE2_NAME, "inst1"))
    export = two_nodes.node2_state_dir / "export" / "inst1"
    assert (export / "config.ini").is_file()
    assert not (two_nodes.export_dir / "inst1").exists()
    assert_no_warnings(two_nodes.run(
        "gnt-backup", "import", "-t", "file", "-n", NODE2_NAME,
        f"--src-node={NODE2_NAME}", "--src-dir=/var/lib/ganeti/export/inst1",
        "--net", "0:mac=generate", "--no-name-check", "--no-ip-check", "inst3"))
    assert two_nodes.leftover_mounts() == [] and two_nodes.node2_leftover_mounts() == []
    disk = two_nodes.instance_disk_path("inst3")
    assert two_nodes.node2_storage_dir in disk.parents
    fs = inspect_disk(disk, tmp_path / "mnt")
    assert_instance_root(fs, "inst3", "ext4")
    assert fs.debian_version == original.debian_version
    assert fs.uuid != original.uuid
    scenario.passed.add("import")


def test_move_copies_a_file_disk_instance_to_node2(
        two_nodes: TwoNodeCluster, scenario: Scenario, tmp_path: Path) -> None:
    # Ganeti allows move for the file template (DTS_COPYABLE: file, plain):
    # it copies the disk raw; no OS script runs.
    scenario.require("import")
    before = inspect_disk(two_nodes.instance_disk_path("inst1"), tmp_path / "mnt")
    two_nodes.run("gnt-instance", "shutdown", "inst1")
    two_nodes.run("gnt-instance", "move", "-f", "-n", NODE2_NAME, "inst1")
    primary = two_nodes.run("gnt-instance", "list", "--no-headers", "--output=pnode",
                            "inst1").stdout.strip()
    assert primary == NODE2_NAME
    disk = two_nodes.instance_disk_path("inst1")
    assert two_nodes.node2_storage_dir in disk.parents
    after = inspect_disk(disk, tmp_path / "mnt")
    assert (after.uuid, after.hostname) == (before.uuid, "inst1")
    assert not list(two_nodes.file_storage_dir.glob("inst1/*"))


# Inside node 1's network namespace: nothing else listens there.
REPOSITORY_PORT = 18080


def installed_version(disk: Path, mountpoint: Path, package: str) -> str:
    """``package``'s version in dpkg's status file on the instance's root."""
    [status] = inspect_disk(disk, mountpoint, read=["/var/lib/dpkg/status"]).files
    return version_in(status, package)


def test_refresh_on_the_master_and_push_give_node2_the_newer_package(
        two_nodes: TwoNodeCluster, package_root: Path,
        scenario: Scenario, tmp_path: Path) -> None:
    """A newer nano in a repository served inside node 1's namespaces:
    refresh upgrades node 1's entry, push sends it, node 2's next instance
    has the new version and says when its system was refreshed."""
    scenario.require("push")
    [listed] = [e for e in json_result(two_nodes.run(command(package_root), "list",
                                                     "--json").stdout)
                if "default" in e["variants"]]
    assert two_nodes.cache_dir is not None
    archive = two_nodes.cache_dir / f"{listed['name']}.tar"
    old = version_in(subprocess.run(["tar", "-xOf", str(archive), "./var/lib/dpkg/status"],
                                    check=True, capture_output=True, text=True).stdout,
                     PACKAGE)
    make_repository(str(tmp_path / "work"), PACKAGE, old + BUMP)
    listing = tmp_path / "newer.list"
    listing.write_text(sources(f"http://127.0.0.1:{REPOSITORY_PORT}/"))
    probe = ("import urllib.request; urllib.request.urlopen("
             f"'http://127.0.0.1:{REPOSITORY_PORT}/Release', timeout=2)")
    with two_nodes.serving("/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1",
                           "--directory", str(tmp_path / "work" / "repo"),
                           str(REPOSITORY_PORT)):
        deadline = time.monotonic() + 30
        while two_nodes.run("/usr/bin/python3", "-c", probe, check=False).returncode != 0:
            assert time.monotonic() < deadline, "the repository never answered"
            time.sleep(0.2)
        refreshed = two_nodes.run(command(package_root), "refresh", "default",
                                  "--sources", str(listing), "--json")
    [result] = json_result(refreshed.stdout)
    print(f"\nrefresh: {json.dumps(result)}")
    assert (result["name"], result["status"]) == (listed["name"], "upgraded")
    assert result["upgraded"] == [{"package": PACKAGE, "old": old, "new": old + BUMP}]
    [entry] = json_result(two_nodes.run(command(package_root), "push", "default",
                                        "--json").stdout)
    assert (entry["entry"], entry["node"], entry["status"]) == (
        listed["name"], NODE2_NAME, "pushed")
    since = time.time()
    add_instance(two_nodes, "inst-refreshed", NODE2_NAME)
    [log] = [p for p in two_nodes.node2_os_logs(since)
             if p.name.startswith(f"add-{OS_NAME}+default-inst-refreshed-")]
    text = log.read_text()
    print("\nnode 2's create log (last line):\n" + text.splitlines()[-1])
    assert "Bootstrapping" not in text
    assert "last refreshed never" not in text and "last refreshed " in text
    disk = two_nodes.instance_disk_path("inst-refreshed")
    assert two_nodes.node2_storage_dir in disk.parents
    assert installed_version(disk, tmp_path / "mnt", PACKAGE) == old + BUMP
