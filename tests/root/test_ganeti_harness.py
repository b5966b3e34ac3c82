"""The Ganeti test cluster itself, driven with a stand-in OS definition.

The stand-in's scripts only write one-line records into fixed 512-byte
slots of the instance's disk file (and fail when the OS parameter
``marker`` is ``fail<action>``), so these tests prove in seconds what
test_ganeti.py relies on: Ganeti finds the OS definition we install, runs
each script with the instance's disk, the export travels through
gnt-backup into an import, a refusal by verify reaches the user, and the
node looks the same afterwards, also when a test fails half-way. They
also pin down Ganeti 3.0 behaviour that test_ganeti.py has to work with.
"""

from __future__ import annotations

import ast
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.root.ganeti_cluster import (
    MASTER_IP,
    NODE_IP,
    NODE_NAME,
    ClusterError,
    CommandFailed,
    GanetiCluster,
    host_state,
    state_differences,
)

OS_NAME = "standin"
SLOT = 512
SLOTS = {"create": 0, "import": 1, "rename": 2}
EXPORT_BYTES = 4096

# One Python script serves every action: it records what Ganeti asked on
# the disk file, where the test reads it back.
STANDIN_SCRIPT = '''#!/usr/bin/python3 -I
"""Stand-in Ganeti OS script ({action}) for the harness tests."""
import os
import sys

ACTION = {action!r}
SLOT = {slot}
SLOTS = {slots!r}
EXPORT_BYTES = {export_bytes}


def record(disk, slot, text):
    with open(disk, "r+b") as f:
        f.seek(slot * SLOT)
        f.write(text.encode().ljust(SLOT, b"\\0")[:SLOT])


def main():
    env = os.environ
    print(f"stand-in {{ACTION}} {{sys.argv[1:]}} for {{env.get('INSTANCE_NAME')}}",
          file=sys.stderr)
    if env.get("OSP_MARKER") == f"fail{{ACTION}}":
        sys.stdin.buffer.read()  # as a real script would, before failing
        print(f"stand-in {{ACTION}} fails as asked", file=sys.stderr)
        return 1
    if ACTION == "verify":
        if env.get("OSP_MARKER") == "bad":
            print("stand-in verify: marker 'bad' is refused, pick another word",
                  file=sys.stderr)
            return 1
        return 0
    if ACTION == "create":
        record(env["DISK_0_PATH"], SLOTS["create"],
               f"create {{env['INSTANCE_NAME']}} variant={{env.get('OS_VARIANT')}} "
               f"marker={{env.get('OSP_MARKER', '')}} "
               f"reinstall={{env.get('INSTANCE_REINSTALL', '0')}} "
               f"umask={{os.umask(0o077):03o}}")
    elif ACTION == "export":
        if env.get("EXP_SIZE_FD"):
            os.write(int(env["EXP_SIZE_FD"]), f"{{EXPORT_BYTES}}\\n".encode())
        with open(env["EXPORT_DISK_PATH"], "rb") as f:
            sys.stdout.buffer.write(f.read(EXPORT_BYTES))
    elif ACTION == "import":
        data = sys.stdin.buffer.read()
        if len(data) != EXPORT_BYTES:
            print(f"stand-in import: got {{len(data)}} bytes", file=sys.stderr)
            return 1
        with open(env["IMPORT_DISK_PATH"], "r+b") as f:
            f.write(data)
        record(env["IMPORT_DISK_PATH"], SLOTS["import"],
               f"import {{env['INSTANCE_NAME']}}")
    elif ACTION == "rename":
        record(env["DISK_0_PATH"], SLOTS["rename"],
               f"rename {{env['OLD_INSTANCE_NAME']}} {{env['INSTANCE_NAME']}}")
    return 0


sys.exit(main())
'''


def write_standin_os(directory: Path) -> Path:
    """A minimal OS definition (API 20, two variants, one parameter)."""
    directory.mkdir(parents=True)
    for action in ("create", "import", "export", "rename", "verify"):
        script = directory / action
        script.write_text(STANDIN_SCRIPT.format(action=action, slot=SLOT, slots=SLOTS,
                                                export_bytes=EXPORT_BYTES))
        script.chmod(0o755)
    (directory / "ganeti_api_version").write_text("20\n")
    (directory / "variants.list").write_text("default\nother\n")
    (directory / "parameters.list").write_text("marker a word written onto the disk\n")
    return directory


def read_slot(disk: Path, name: str) -> str:
    with open(disk, "rb") as f:
        f.seek(SLOTS[name] * SLOT)
        return f.read(SLOT).rstrip(b"\0").decode()


def add_instance(cluster: GanetiCluster, name: str, *options: str,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.run("gnt-instance", "add", "-t", "file", "-s", "1G",
                       "-o", f"{OS_NAME}+default", *options, "--no-name-check",
                       "--no-ip-check", "--no-start", "-n", NODE_NAME, name,
                       check=check)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GanetiCluster]:
    """One cluster for the module's scenario; afterwards the node is as before."""
    base = tmp_path_factory.mktemp("ganeti-harness")
    os_dir = write_standin_os(base / "standin-os")
    before = host_state(base)
    with GanetiCluster(os_dir, base / "cluster", os_name=OS_NAME) as running:
        yield running
    print(f"\nGaneti harness timings:\n{running.format_timings()}")
    leftover = state_differences(before, host_state(base))
    assert not leftover, f"the cluster changed the node: {leftover}"


def test_cluster_runs_in_its_own_namespaces(cluster: GanetiCluster) -> None:
    assert cluster.run("hostname").stdout.strip() == NODE_NAME
    inside = cluster.run("ip", "-o", "address", "show", "dev", cluster.bridge).stdout
    assert f"{NODE_IP}/24" in inside
    assert f"{MASTER_IP}/" in inside, "the master IP is not up on the bridge"
    host = subprocess.run(["ip", "-o", "address", "show"], capture_output=True,
                          text=True, check=True).stdout
    assert "198.51.100." not in host
    assert cluster.run("gnt-cluster", "getmaster").stdout.strip() == NODE_NAME


def test_daemons_run_inside_and_not_on_the_node(cluster: GanetiCluster) -> None:
    ps = cluster.run("ps", "-e", "-o", "comm=").stdout.split()
    for daemon in ("ganeti-noded", "ganeti-wconfd", "ganeti-luxid"):
        assert daemon in ps
    assert not os.path.exists("/run/ganeti"), "Ganeti wrote into the node's /run"


def test_os_definition_is_found_first_and_valid(cluster: GanetiCluster) -> None:
    diagnose = cluster.run("gnt-os", "diagnose").stdout
    assert f"OS: {OS_NAME} [global status: valid]" in diagnose
    assert f"(path: /srv/ganeti/os/{OS_NAME})" in diagnose
    listed = cluster.run("gnt-os", "list", "--no-headers").stdout.split()
    assert listed == [f"{OS_NAME}+default", f"{OS_NAME}+other"]


def test_add_runs_create_on_the_instance_disk(cluster: GanetiCluster) -> None:
    add_instance(cluster, "inst1", "-O", "marker=first")
    disk = cluster.instance_disk_path("inst1")
    assert disk.parent == cluster.file_storage_dir / "inst1"
    assert disk.stat().st_size == 1024 ** 3
    # Ganeti runs OS scripts with umask 077 (the script reports the one it had).
    assert read_slot(disk, "create") == (
        "create inst1 variant=default marker=first reinstall=0 umask=077")
    assert any(log.name.startswith(f"add-{OS_NAME}+default-inst1-")
               for log in cluster.os_logs())
    assert cluster.leftover_mounts() == []


def test_refusal_by_verify_reaches_the_user(cluster: GanetiCluster) -> None:
    proc = add_instance(cluster, "refused", "-O", "marker=bad", check=False)
    assert proc.returncode != 0
    assert "stand-in verify: marker 'bad' is refused, pick another word" in proc.stdout
    assert "refused" not in cluster.run("gnt-instance", "list", "--no-headers",
                                        "-o", "name").stdout.split()
    assert not (cluster.file_storage_dir / "refused").exists()


def os_parameters(cluster: GanetiCluster, instance: str) -> dict[str, str]:
    """The instance's own OS parameters, as Ganeti stores them."""
    shown = cluster.run("gnt-instance", "list", "--no-headers", "-o", "osparams",
                        instance).stdout.strip()
    params = ast.literal_eval(shown)  # printed as a Python dict
    assert isinstance(params, dict)
    return params


def test_reinstall_runs_create_again(cluster: GanetiCluster) -> None:
    assert os_parameters(cluster, "inst1") == {"marker": "first"}
    cluster.run("gnt-instance", "reinstall", "-f", "inst1")
    disk = cluster.instance_disk_path("inst1")
    assert read_slot(disk, "create").startswith("create inst1 variant=default "
                                                "marker=first reinstall=1 ")


def test_reinstall_without_o_forgets_the_os_parameters(cluster: GanetiCluster) -> None:
    # Ganeti 3.0 runs the reinstall with the instance's parameters but then
    # stores the empty -O it was given (LUInstanceReinstall turns a missing
    # osparams into {}): later exports and imports see none. test_ganeti.py
    # repeats -O on reinstall because of this.
    assert os_parameters(cluster, "inst1") == {}
    cluster.run("gnt-instance", "modify", "-O", "marker=first", "inst1")
    assert os_parameters(cluster, "inst1") == {"marker": "first"}


def test_rename_runs_rename_and_moves_the_disk(cluster: GanetiCluster) -> None:
    cluster.run("gnt-instance", "rename", "-f", "--no-name-check", "--no-ip-check",
                "inst1", "inst2")
    disk = cluster.instance_disk_path("inst2")
    assert disk.parent == cluster.file_storage_dir / "inst2"
    assert not (cluster.file_storage_dir / "inst1").exists()
    assert read_slot(disk, "rename") == "rename inst1 inst2"


def test_export_then_import_carries_the_disk_data(cluster: GanetiCluster) -> None:
    # The fake hypervisor "runs" the instance; a running file-disk instance
    # cannot be snapshotted, so export must be allowed to shut it down.
    cluster.run("gnt-instance", "startup", "inst2")
    cluster.run("gnt-backup", "export", "--long-sleep", "-n", NODE_NAME, "inst2")
    assert (cluster.export_dir / "inst2" / "config.ini").is_file()
    assert "running" in cluster.run("gnt-instance", "list", "--no-headers",
                                    "-o", "status", "inst2").stdout
    # The source still exists, so its MAC is taken: the import needs a new one.
    cluster.run("gnt-backup", "import", "-t", "file", "-n", NODE_NAME,
                f"--src-node={NODE_NAME}", "--src-dir=/var/lib/ganeti/export/inst2",
                "--net", "0:mac=generate", "--no-name-check", "--no-ip-check",
                "inst3")
    disk = cluster.instance_disk_path("inst3")
    assert read_slot(disk, "create").startswith("create inst1 ")  # came through
    assert read_slot(disk, "import") == "import inst3"
    # Ganeti runs rename after an import under another name.
    assert read_slot(disk, "rename") == "rename inst2 inst3"


def test_failed_rename_and_import_scripts_are_only_warnings(
        cluster: GanetiCluster) -> None:
    # Ganeti 3.0 exits 0 when the OS rename or import script fails: it
    # prints a WARNING and keeps the instance (renamed, or with whatever
    # the import left on its disk). test_ganeti.py checks for warnings.
    add_instance(cluster, "doomed", "-O", "marker=failrename")
    renamed = cluster.run("gnt-instance", "rename", "-f", "--no-name-check",
                          "--no-ip-check", "doomed", "doomed2")
    assert " - WARNING: Could not run OS rename script" in renamed.stdout
    assert "stand-in rename fails as asked" in renamed.stdout

    cluster.run("gnt-instance", "modify", "-O", "marker=failimport", "doomed2")
    cluster.run("gnt-backup", "export", "-n", NODE_NAME, "doomed2")
    imported = cluster.run("gnt-backup", "import", "-t", "file", "-n", NODE_NAME,
                           f"--src-node={NODE_NAME}",
                           "--src-dir=/var/lib/ganeti/export/doomed2",
                           "--net", "0:mac=generate", "--no-name-check",
                           "--no-ip-check", "doomed3")
    assert " - WARNING: Some disks for instance doomed3" in imported.stdout
    assert "were not imported successfully" in imported.stdout
    assert "doomed3" in cluster.run("gnt-instance", "list", "--no-headers",
                                    "-o", "name").stdout.split()


def test_remove_deletes_the_disks(cluster: GanetiCluster) -> None:
    names = cluster.run("gnt-instance", "list", "--no-headers", "-o", "name").stdout.split()
    assert {"inst2", "inst3"} <= set(names)
    disks = [cluster.instance_disk_path(name) for name in names]
    for name in names:
        cluster.run("gnt-instance", "remove", "-f", name)
    assert cluster.run("gnt-instance", "list", "--no-headers").stdout.strip() == ""
    assert not any(disk.exists() for disk in disks)
    assert cluster.leftover_mounts() == []


def test_failure_inside_leaves_the_node_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os_dir = write_standin_os(tmp_path / "standin-os")
    before = host_state(tmp_path)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with GanetiCluster(os_dir, tmp_path / "cluster", os_name=OS_NAME) as running:
            add_instance(running, "half-way")
            disk = running.instance_disk_path("half-way")
            # What a broken OS script could leave: a mount inside the
            # namespace, where the node's own leak check cannot see it.
            left = running.workdir / "left-mounted"
            left.mkdir()
            running.run("mount", "-t", "tmpfs", "tmpfs", str(left))
            assert running.leftover_mounts() == [f"tmpfs {left} tmpfs"]
            raise Boom
    assert "mounts left inside the cluster" in capsys.readouterr().err
    assert not disk.exists(), "instance storage was not deleted"
    assert state_differences(before, host_state(tmp_path)) == {}


def test_failed_init_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    os_dir = write_standin_os(tmp_path / "standin-os")
    before = host_state(tmp_path)
    cluster = GanetiCluster(os_dir, tmp_path / "cluster", os_name=OS_NAME,
                            init_options=["--mac-prefix=not-a-mac-prefix"])
    with pytest.raises(CommandFailed) as failed:
        with cluster:
            pass
    assert "gnt-cluster init" in str(failed.value)
    assert "not-a-mac-prefix" in failed.value.output
    assert cluster.processes() == []
    assert state_differences(before, host_state(tmp_path)) == {}


def test_second_cluster_in_the_same_workdir_is_refused(tmp_path: Path) -> None:
    os_dir = write_standin_os(tmp_path / "standin-os")
    (tmp_path / "cluster" / "etc-ganeti").mkdir(parents=True)
    with pytest.raises(ClusterError, match="already holds a cluster"):
        with GanetiCluster(os_dir, tmp_path / "cluster", os_name=OS_NAME):
            pass
