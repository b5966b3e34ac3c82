"""Ganeti 3.0 drives the installed OS definition, as on a real node.

One scenario, split into steps that share a module-scoped cluster (see
ganeti_cluster.py): the definition is the Debian package built from this
work tree (tests/debpackage.py), unpacked, and seen inside the cluster's
mount namespace exactly where the package installs it:
/usr/share/ganeti/os/debootstrap, /etc/default/ganeti-instance-debootstrap,
/etc/ganeti/instance-debootstrap, and /var/cache/ganeti-instance-debootstrap
holding the session's warm bootstrap cache (there is no network inside
the cluster). Nothing is installed on the node.
Ganeti lists and diagnoses it, then adds, refuses, reinstalls, renames,
exports, imports and removes instances. After each step the instance's
disk file is inspected from the node, read-only: partition 1 of the msdos
table attached with an offset loop device (this kernel does not parse
partition tables), mounted read-only, its hostname and fstab checked.

A step that needs an earlier one fails at once, naming it, when that one
did not pass. Ganeti 3.0 only warns (and exits 0) when the OS rename or
import script fails, so every step also checks that no warning was
printed (test_ganeti_harness.py pins that behaviour down).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ganeti_debootstrap.runner import output, run
from tests.root.bootstrap_fixture import bootstrapped_localstatedir  # noqa: F401
from tests.root.ganeti_checks import (  # noqa: F401 - module fixtures
    CLUSTER_PATH,
    OS_NAME,
    OS_PATH,
    SECTOR,
    VARIANTS_LIST,
    RootFilesystem,
    Scenario,
    assert_instance_root,
    assert_no_warnings,
    inspect_disk,
    released_by,
    variants,
)
from tests.root.ganeti_cluster import (
    NODE_NAME,
    GanetiCluster,
    host_state,
    state_differences,
)


def add_instance(cluster: GanetiCluster, name: str, filesystem: str,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.run("gnt-instance", "add", "-t", "file", "-s", "1G",
                       "-o", f"{OS_NAME}+default", "-O", f"filesystem={filesystem}",
                       "--no-name-check", "--no-ip-check", "--no-start",
                       "-n", NODE_NAME, name, check=check)


@pytest.fixture(scope="module")
def cluster(os_dir: Path, package_root: Path, tmp_path_factory: pytest.TempPathFactory,
            bootstrapped_localstatedir: str,  # noqa: F811
            ) -> Iterator[GanetiCluster]:
    workdir = tmp_path_factory.mktemp("ganeti")
    before = host_state(workdir, os_dir)
    cache = Path(bootstrapped_localstatedir) / "cache" / "ganeti-instance-debootstrap"
    with GanetiCluster(os_dir, workdir / "cluster", os_name=OS_NAME,
                       package_root=package_root, cache_dir=cache) as running:
        assert running.os_path == OS_PATH
        yield running
    timings = running.format_timings()
    (workdir / "timings.txt").write_text(timings + "\n")
    print(f"\nGaneti timings:\n{timings}")
    leftover = state_differences(before, host_state(workdir, os_dir))
    assert not leftover, f"the cluster changed the node: {leftover}"


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario()


def test_gnt_os_list_shows_every_variant(cluster: GanetiCluster,
                                         package_root: Path) -> None:
    listed = cluster.run("gnt-os", "list", "--no-headers").stdout.split()
    assert f"{OS_NAME}+default" in listed
    assert listed == [f"{OS_NAME}+{v}" for v in variants(package_root)]


def test_gnt_os_diagnose_finds_our_definition_valid(cluster: GanetiCluster,
                                                    package_root: Path) -> None:
    diagnose = cluster.run("gnt-os", "diagnose").stdout
    print(f"\ngnt-os diagnose:\n{diagnose}")
    assert f"OS: {OS_NAME} [global status: valid]" in diagnose
    assert f"Variants: [{', '.join(variants(package_root))}]" in diagnose
    # Found where the package installs it (and nowhere else).
    assert f"status: valid (path: {OS_PATH})" in diagnose
    # The OS dir's variants.list is the package's symlink to /etc.
    target = cluster.run("readlink", f"{OS_PATH}/variants.list").stdout.strip()
    assert target == VARIANTS_LIST
    assert "[API versions: 20, 15, 10, 5]" in diagnose


def test_gnt_os_info_lists_the_filesystem_parameter(cluster: GanetiCluster,
                                                    os_dir: Path) -> None:
    info = cluster.run("gnt-os", "info", OS_NAME).stdout
    declared = dict(line.split(None, 1) for line in
                    (os_dir / "parameters.list").read_text().splitlines() if line.strip())
    assert "filesystem" in declared
    assert f"filesystem: {declared['filesystem'].strip()}" in info


def test_add_creates_an_ext3_root_named_after_the_instance(
        cluster: GanetiCluster, scenario: Scenario, tmp_path: Path) -> None:
    assert_no_warnings(add_instance(cluster, "inst1", "ext3"))
    assert cluster.leftover_mounts() == []
    fs = inspect_disk(cluster.instance_disk_path("inst1"), tmp_path / "mnt")
    assert_instance_root(fs, "inst1", "ext3")
    assert fs.mailname == "inst1"
    assert any(log.name.startswith(f"add-{OS_NAME}+default-inst1-")
               for log in cluster.os_logs())
    scenario.disks["inst1"] = fs
    scenario.passed.add("add")


def test_add_with_an_unknown_filesystem_is_refused_with_our_verify_message(
        cluster: GanetiCluster) -> None:
    # What our verify says about zfs (not a root type) when Ganeti is not in between: run in
    # the cluster's namespaces, from the package's OS dir, environment cleaned.
    alone = cluster.run("env", "-i", "-C", OS_PATH, f"PATH={CLUSTER_PATH}",
                        "OS_API_VERSION=20", f"OS_NAME={OS_NAME}", "OS_VARIANT=default",
                        "OSP_FILESYSTEM=zfs", "./verify", "parameters", check=False)
    assert alone.returncode != 0
    message = [line.strip() for line in alone.stdout.splitlines() if line.strip()]
    assert message and "zfs" in alone.stdout

    refused = add_instance(cluster, "inst-zfs", "zfs", check=False)
    assert refused.returncode != 0
    assert message[-1] in refused.stdout, (
        f"the user does not see verify's explanation {message[-1]!r}:\n{refused.stdout}")
    names = cluster.run("gnt-instance", "list", "--no-headers", "-o", "name").stdout
    assert "inst-zfs" not in names.split()
    assert not (cluster.file_storage_dir / "inst-zfs").exists()


def test_add_with_a_private_key_and_a_secret_hash_shows_and_logs_neither(
        cluster: GanetiCluster, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tenant@example.org",
         "-f", str(key)])
    public = (tmp_path / "id_ed25519.pub").read_text().strip()
    hashed = output(["openssl", "passwd", "-6", "-stdin"], stdin=b"Gidb-ganeti-pw")
    since = time.time()
    added = cluster.run("gnt-instance", "add", "-t", "file", "-s", "1G",
                        "-o", f"{OS_NAME}+default", "--no-name-check", "--no-ip-check",
                        "--no-start", "-n", NODE_NAME,
                        "--os-parameters-private", f"ssh_authorized_keys={public}",
                        "--os-parameters-secret", f"password_hash={hashed}", "inst-keys")
    assert_no_warnings(added)
    fs = inspect_disk(cluster.instance_disk_path("inst-keys"), tmp_path / "mnt",
                      read=["/root/.ssh/authorized_keys", "/etc/shadow"])
    assert_instance_root(fs, "inst-keys", "ext4")
    authorized, shadow = fs.files
    assert authorized == public + "\n"
    assert any(line.startswith(f"root:{hashed}:") for line in shadow.splitlines())
    blob, secret = public.split()[1], hashed.rsplit("$", 1)[1]
    info = cluster.run("gnt-instance", "info", "inst-keys").stdout
    assert blob not in info and secret not in info
    # For the note: what info shows of the instance's OS parameters
    # (Ganeti 3.0: an empty list, private and secret ones left out).
    section = info[info.index("Operating system parameters:"):]
    print("\ngnt-instance info inst-keys:\n" + section[:section.index("Hypervisor:")])
    logs = [p for p in cluster.os_logs(since) if "inst-keys" in p.name]
    assert any(p.name.startswith(f"add-{OS_NAME}+default-inst-keys-") for p in logs)
    for log in logs:
        text = log.read_text(errors="replace")
        assert blob not in text and secret not in text, log.name
    # Ganeti's own logs, for the report: which of them hold either value.
    holding = sorted(str(p.relative_to(cluster.log_dir))
                     for p in cluster.log_dir.rglob("*") if p.is_file()
                     and (blob in (t := p.read_text(errors="replace")) or secret in t))
    print(f"Ganeti logs holding the key or the hash: {holding or 'none'}")
    assert not any(name.startswith("os/") for name in holding)
    cluster.run("gnt-instance", "remove", "-f", "inst-keys")


def test_reinstall_makes_a_fresh_filesystem(
        cluster: GanetiCluster, scenario: Scenario, tmp_path: Path) -> None:
    scenario.require("add")
    # -O repeats the parameter: Ganeti 3.0 reinstalls with the instance's
    # parameters but then stores the (empty) -O given, so without it the
    # later export and import would run with the defaults.
    assert_no_warnings(cluster.run("gnt-instance", "reinstall", "-f",
                                   "-O", "filesystem=ext3", "inst1"))
    assert cluster.leftover_mounts() == []
    fs = inspect_disk(cluster.instance_disk_path("inst1"), tmp_path / "mnt")
    # Ganeti keeps the instance's OS parameters (filesystem=ext3).
    assert_instance_root(fs, "inst1", "ext3")
    assert fs.uuid != scenario.disks["inst1"].uuid, "reinstall kept the old filesystem"
    scenario.disks["inst1"] = fs
    scenario.passed.add("reinstall")


def test_rename_changes_the_hostname_only(
        cluster: GanetiCluster, scenario: Scenario, tmp_path: Path) -> None:
    scenario.require("add")
    # With name checks off, Ganeti asks for confirmation: -f gives it.
    assert_no_warnings(cluster.run("gnt-instance", "rename", "-f", "--no-name-check",
                                   "--no-ip-check", "inst1", "inst2"))
    assert cluster.leftover_mounts() == []
    fs = inspect_disk(cluster.instance_disk_path("inst2"), tmp_path / "mnt")
    assert_instance_root(fs, "inst2", "ext3")
    assert fs.mailname == "inst2"
    assert fs.uuid == scenario.disks["inst1"].uuid
    scenario.disks["inst2"] = fs
    scenario.passed.add("rename")


def test_export_writes_a_dump_of_the_root_filesystem(
        cluster: GanetiCluster, scenario: Scenario) -> None:
    scenario.require("rename")
    # The fake hypervisor "runs" it; a running file-disk instance cannot be
    # snapshotted, so export must be allowed to stop it meanwhile.
    cluster.run("gnt-instance", "startup", "inst2")
    assert_no_warnings(cluster.run("gnt-backup", "export", "--long-sleep",
                                   "-n", NODE_NAME, "inst2"))
    assert cluster.leftover_mounts() == []
    export = cluster.export_dir / "inst2"
    assert (export / "config.ini").is_file()
    streams = [p for p in export.iterdir() if p.name != "config.ini"]
    assert len(streams) == 1, f"expected one disk stream in {sorted(export.iterdir())}"
    listing = output(["restore", "-t", "-f", str(streams[0])])
    assert "./etc/hostname" in listing.split()
    scenario.passed.add("export")


def test_import_restores_the_system_under_the_new_name(
        cluster: GanetiCluster, scenario: Scenario, tmp_path: Path) -> None:
    scenario.require("export")
    # inst2 still exists and owns its MAC: the import needs a new one.
    assert_no_warnings(cluster.run(
        "gnt-backup", "import", "-t", "file", "-n", NODE_NAME,
        f"--src-node={NODE_NAME}", "--src-dir=/var/lib/ganeti/export/inst2",
        "--net", "0:mac=generate", "--no-name-check", "--no-ip-check", "inst3"))
    assert cluster.leftover_mounts() == []
    fs = inspect_disk(cluster.instance_disk_path("inst3"), tmp_path / "mnt")
    # Ganeti runs rename after importing under another name.
    assert_instance_root(fs, "inst3", "ext3")
    assert fs.uuid != scenario.disks["inst2"].uuid
    assert fs.debian_version == scenario.disks["inst2"].debian_version
    scenario.passed.add("import")


MULTI_PARAMETERS = "filesystem=xfs,swap=512M,data_disks=format"
SWAP_BYTES = 512 * 2**20
MARKER = "written on the data disk before the export\n"


def data_disk_state(disk: Path, mountpoint: Path, write: str = "") -> tuple[str, str, str]:
    """(type, UUID, marker file's text) of a whole-disk data filesystem;
    ``write``: put that text into the marker file first."""
    fstype = output(["blkid", "--probe", "--output", "value", "--match-tag", "TYPE",
                     str(disk)])
    uuid = output(["blkid", "--probe", "--output", "value", "--match-tag", "UUID",
                   str(disk)])
    mountpoint.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        loop = output(["losetup", "--find", "--show"]
                      + ([] if write else ["--read-only"]) + [str(disk)])
        stack.enter_context(released_by(["losetup", "--detach", loop]))
        run(["mount"] + ([] if write else ["-o", "ro"]) + ["-t", fstype, loop,
                                                           str(mountpoint)])
        stack.enter_context(released_by(["umount", str(mountpoint)]))
        marker = mountpoint / "marker"
        if write:
            marker.write_text(write)
        text = marker.read_text() if marker.exists() else ""
    return fstype, uuid, text


def swap_partition(disk: Path) -> dict[str, Any]:
    table = json.loads(output(["sfdisk", "--json", str(disk)]))["partitiontable"]
    [swap] = [p for p in table["partitions"] if p["type"] == "82"]
    return {"size": swap["size"] * SECTOR, "start": swap["start"]}


def assert_multi_disk_instance(cluster: GanetiCluster, name: str, tmp_path: Path,
                               marker: str) -> str:
    """An XFS root with a 512 MiB swap partition and an ext4 data disk in
    fstab by UUID; returns the data disk's UUID."""
    disk0, disk1 = (cluster.instance_disk_path(name, i) for i in (0, 1))
    fs = inspect_disk(disk0, tmp_path / "root", read=["/etc/fstab"])
    assert (fs.fstype, fs.hostname) == ("xfs", name)
    assert fs.fstab_root == (f"UUID={fs.uuid}", "xfs")
    assert swap_partition(disk0)["size"] == SWAP_BYTES
    data_type, data_uuid, text = data_disk_state(disk1, tmp_path / "data")
    assert (data_type, text) == ("ext4", marker)
    [fstab] = fs.files
    lines = [line.split() for line in fstab.splitlines()
             if line.strip() and not line.startswith("#")]
    assert [f"UUID={data_uuid}", "/srv/disk1", "ext4", "defaults,nofail", "0", "2"] in lines
    assert [line[2] for line in lines if line[1] == "none"] == ["swap"]
    return data_uuid


def test_an_xfs_instance_with_swap_and_a_data_disk_round_trips_through_gnt_backup(
        cluster: GanetiCluster, tmp_path: Path) -> None:
    """Two disks, -O filesystem=xfs,swap=512M,data_disks=format: added, exported
    (a tar stream of the root, a dump of the data disk) and imported under
    another name with the data disk's files, fstab naming the new disks."""
    assert_no_warnings(cluster.run(
        "gnt-instance", "add", "-t", "file", "--disk", "0:size=2G", "--disk", "1:size=1G",
        "-o", f"{OS_NAME}+default", "-O", MULTI_PARAMETERS, "--no-name-check",
        "--no-ip-check", "--no-start", "-n", NODE_NAME, "multi1"))
    assert cluster.leftover_mounts() == []
    data_disk_state(cluster.instance_disk_path("multi1", 1), tmp_path / "data", MARKER)
    before = assert_multi_disk_instance(cluster, "multi1", tmp_path, MARKER)
    assert_no_warnings(cluster.run("gnt-backup", "export", "-n", NODE_NAME, "multi1"))
    export = cluster.export_dir / "multi1"
    streams = sorted(p for p in export.iterdir() if p.name != "config.ini")
    assert len(streams) == 2, f"expected a stream per disk in {sorted(export.iterdir())}"
    heads = {}
    for stream in streams:
        with open(stream, "rb") as f:
            heads[stream.name] = f.read(1024)
    kinds = sorted("tar" if head[257:262] == b"ustar" else "other" for head in heads.values())
    assert kinds == ["other", "tar"], "the XFS root's stream is a tar archive"
    assert_no_warnings(cluster.run(
        "gnt-backup", "import", "-t", "file", "-n", NODE_NAME, f"--src-node={NODE_NAME}",
        "--src-dir=/var/lib/ganeti/export/multi1", "--net", "0:mac=generate",
        "--no-name-check", "--no-ip-check", "multi2"))
    assert cluster.leftover_mounts() == []
    after = assert_multi_disk_instance(cluster, "multi2", tmp_path, MARKER)
    assert after != before, "the imported data disk is a new filesystem"
    for name in ("multi1", "multi2"):
        cluster.run("gnt-instance", "remove", "-f", name)
    cluster.run("gnt-backup", "remove", "multi1")


def test_remove_deletes_the_instances(cluster: GanetiCluster, scenario: Scenario) -> None:
    scenario.require("add")
    names = cluster.run("gnt-instance", "list", "--no-headers", "-o", "name").stdout.split()
    disks = [cluster.instance_disk_path(name) for name in names]
    for name in names:
        cluster.run("gnt-instance", "remove", "-f", name)
    assert cluster.run("gnt-instance", "list", "--no-headers").stdout.strip() == ""
    assert [d for d in disks if d.exists()] == []
    assert cluster.leftover_mounts() == []
