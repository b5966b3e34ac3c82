"""Bad input, end to end: the scripts run as Ganeti runs them, as root.

tests/unit/test_bad_input.py covers every variable and setting in-process
with a fake runner; this runs a sample through the real scripts, as root,
and watches the node: the disk file is unchanged (never mounted, so a digest
of it is exact), nothing appears in the scripts' TMPDIR or working
directory, nothing the input held ran (a canary file), and the node's own
root disk is never touched, whatever DISK_0_PATH says.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.diskdigest import disk_digest
from tests.root import scripts
from tests.root.scripts import create_env, ganeti_env, mounted_root, read, run_script


class Watched:
    """The node as a script finds it: disk digest, scratch directories, canary."""

    def __init__(self, tmp_path, localstatedir: str) -> None:
        self.tree = scripts.make_os_tree(str(tmp_path / "os"), localstatedir)
        self.disk = scripts.sparse_disk(str(tmp_path), 1024)
        self.tmpdir = str(tmp_path / "tmp")
        os.mkdir(self.tmpdir)
        self.canary = str(tmp_path / "canary")
        self.base = str(tmp_path)

    def snapshot(self) -> tuple[str, list[str], list[str], list[str]]:
        return (disk_digest(self.disk), sorted(os.listdir(self.tmpdir)),
                sorted(os.listdir(self.tree.os_dir)), sorted(os.listdir(self.base)))

    def run(self, script: str, env: dict[str, str], args: tuple[str, ...] = (),
            **kwargs) -> tuple[int, str]:
        env = dict(env, TMPDIR=self.tmpdir)
        res = run_script(self.tree, script, env, args=args, check=False, **kwargs)
        lines = res.stderr.decode(errors="replace").strip().splitlines()
        return res.returncode, (lines[-1] if lines else "")


@pytest.fixture
def node(tmp_path, bootstrapped_localstatedir) -> Watched:
    return Watched(tmp_path, bootstrapped_localstatedir)


def refused(node: Watched, script: str, env: dict[str, str], named: str,
            args: tuple[str, ...] = ()) -> str:
    before = node.snapshot()
    status, last = node.run(script, env, args)
    print(f"\nBADINPUT {script} {named}: exit {status}; last line: {last[:200]}")
    assert status in (1, 2), last
    assert named in last
    assert node.snapshot() == before, "the disk or a scratch directory changed"
    assert not os.path.exists(node.canary), "something the input held was executed"
    return last


def injected(node: Watched) -> list[str]:
    c = node.canary
    return [f"$(touch {c})", f"`touch {c}`", f"x;touch {c}", f"x\ntouch {c}",
            f"x|touch {c}", f"../../{os.path.basename(c)}"]


@pytest.mark.parametrize("index", range(6))
def test_instance_name_holding_a_command_is_refused_and_never_run(node, index):
    name = injected(node)[index]
    refused(node, "create", create_env(name, node.disk), "INSTANCE_NAME")
    refused(node, "rename", ganeti_env(INSTANCE_NAME="web1", OLD_INSTANCE_NAME=name,
                                       DISK_COUNT="1", DISK_0_PATH=node.disk),
            "OLD_INSTANCE_NAME")


def test_api5_instance_name_holding_a_command_is_refused(node):
    env = ganeti_env()
    del env["OS_API_VERSION"]
    refused(node, "create", env, "-i=", ("-i", f"$(touch {node.canary})", "-b", node.disk,
                                         "-s", node.disk))


@pytest.mark.parametrize("variant", ["../../etc/passwd", "default/../../../etc/shadow",
                                     "/etc/passwd", "..", "$(touch canary)"])
def test_variant_with_path_parts_is_refused(node, variant):
    refused(node, "create", create_env("web1", node.disk, OS_VARIANT=variant), repr(variant))


@pytest.mark.parametrize("kind", ["missing", "directory", "relative-dotdot"])
def test_disk_path_that_is_not_a_disk_is_refused(node, tmp_path, kind):
    path = {"missing": str(tmp_path / "absent.img"), "directory": str(tmp_path),
            "relative-dotdot": "../../../../nonexistent/disk"}[kind]
    refused(node, "create", create_env("web1", path), path)


def test_settings_syntax_error_is_refused_naming_the_file(node):
    node.tree.settings('SUITE="trixie\nEXTRA_PKGS=\n')
    refused(node, "create", create_env("web1", node.disk), node.tree.defaults_file)


def test_hooks_directory_others_can_write_is_refused_before_the_disk(node):
    node.tree.hook("10-x", f"touch {node.canary}\n")
    os.chmod(node.tree.hooks_dir, 0o777)
    refused(node, "create", create_env("web1", node.disk), node.tree.hooks_dir)


def test_partition_alignment_leaving_no_room_is_refused_before_the_disk(node):
    node.tree.settings('PARTITION_ALIGNMENT="2000000"\n')
    refused(node, "create", create_env("web1", node.disk), "PARTITION_ALIGNMENT")


@pytest.mark.parametrize("value", ["x", "1", "77777"])
def test_export_size_fd_that_is_not_an_open_descriptor_is_refused(node, value):
    env = ganeti_env(INSTANCE_NAME="web1", EXPORT_INDEX="0", EXPORT_DISK_PATH=node.disk,
                     EXP_SIZE_FD=value)
    before = node.snapshot()
    res = run_script(node.tree, "export", dict(env, TMPDIR=node.tmpdir), check=False)
    assert res.returncode == 1 and res.stdout == b""
    assert "EXP_SIZE_FD" in res.stderr.decode().strip().splitlines()[-1]
    assert node.snapshot() == before


def test_import_index_that_is_not_a_number_is_refused(node):
    env = ganeti_env(INSTANCE_NAME="web1", IMPORT_INDEX="one", IMPORT_DISK_PATH=node.disk)
    refused(node, "import", env, "IMPORT_INDEX")


def test_values_passed_through_to_the_instance_are_never_interpreted(node):
    # Variables create accepts as they come (Ganeti's own checks apply to
    # them) end up in files and in the hooks' environment: never run.
    c = node.canary
    node.tree.hook("10-env", 'printf "%s" "$INSTANCE_HV_kernel_args" > "$TARGET/root/hv"\n')
    env = create_env("web1.example.org", node.disk, HYPERVISOR=f"kvm;touch {c}",
                     INSTANCE_HV_kernel_args=f"$(touch {c})",
                     INSTANCE_BE_memory=f"`touch {c}`", INSTANCE_PRIMARY_NODE=f"n1|touch {c}",
                     NIC_COUNT="1", NIC_0_MAC="aa:00:00:00:00:01", NIC_0_MODE=f"$(touch {c})",
                     NIC_0_LINK=f"br0;touch {c}")
    status, last = node.run("create", env)
    assert status == 0, last
    assert not os.path.exists(c)
    assert os.listdir(node.tmpdir) == []
    with mounted_root(node.disk) as root:
        assert read(root, "/root/hv") == f"$(touch {c})"


# --- no input adds a line to a file of the instance; root's files are root's --------

OTHER_UID = 1234


@pytest.fixture
def bare_node(tmp_path) -> Watched:
    """A node whose localstatedir has no cache: what is refused here must be
    refused before any cache is looked at (the shared cache stays untouched)."""
    localstatedir = tmp_path / "var"
    localstatedir.mkdir(mode=0o755)
    return Watched(tmp_path, str(localstatedir))


def test_create_refuses_a_settings_file_others_can_write(bare_node):
    node = bare_node
    node.tree.settings(f"touch {node.canary}\n")
    os.chmod(node.tree.defaults_file, 0o666)
    last = refused(node, "create", create_env("web1", node.disk), node.tree.defaults_file)
    assert f"chmod go-w {node.tree.defaults_file}" in last


@pytest.mark.parametrize("which", ["settings file", "variants dir", "variant file"])
def test_create_refuses_settings_owned_by_another_user(bare_node, which):
    node = bare_node
    conf = os.path.join(node.tree.variants_dir, "default.conf")
    path = {"settings file": node.tree.defaults_file,
            "variants dir": node.tree.variants_dir, "variant file": conf}[which]
    with open(node.tree.defaults_file if which == "settings file" else conf, "w") as f:
        f.write(f"touch {node.canary}\n")
    os.chown(path, OTHER_UID, 0)
    last = refused(node, "create", create_env("web1", node.disk), path)
    assert f"{path} is owned by uid {OTHER_UID}, not root" in last
    assert f"chown root {path}" in last


def test_create_refuses_a_cache_directory_owned_by_another_user(bare_node):
    node = bare_node
    os.makedirs(node.tree.cache_dir)
    os.chown(node.tree.cache_dir, OTHER_UID, 0)
    before = sorted(os.listdir(node.tree.cache_dir))
    last = refused(node, "create", create_env("web1", node.disk), node.tree.cache_dir)
    assert f"chown root {node.tree.cache_dir}" in last and "GENERATE_CACHE=no" in last
    assert sorted(os.listdir(node.tree.cache_dir)) == before


def test_create_refuses_a_cache_directory_others_can_write(bare_node):
    node = bare_node
    os.makedirs(node.tree.cache_dir)
    os.chmod(node.tree.cache_dir, 0o777)
    last = refused(node, "create", create_env("web1", node.disk), node.tree.cache_dir)
    assert f"chmod go-w {node.tree.cache_dir}" in last
    assert os.listdir(node.tree.cache_dir) == []


def test_a_settings_file_in_a_directory_of_another_user_is_refused(tmp_path):
    from ganeti_debootstrap import settings
    from ganeti_debootstrap.errors import ConfigError
    from ganeti_debootstrap.paths import Paths

    tree = scripts.make_os_tree(str(tmp_path / "os"), str(tmp_path / "var"))
    paths = Paths(tree.sysconfdir, tree.localstatedir, tree.os_dir)
    settings.load(paths, "default", 20)  # root's, all the way: read
    parent = os.path.dirname(tree.defaults_file)
    os.chown(parent, OTHER_UID, 0)
    with pytest.raises(ConfigError, match=f"{parent} is owned by uid {OTHER_UID}"):
        settings.load(paths, "default", 20)


def test_a_root_owned_cache_under_a_sticky_directory_is_accepted(tmp_path):
    from ganeti_debootstrap import cache
    from ganeti_debootstrap.errors import CacheError

    sticky = tmp_path / "tmp-like"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "cache").mkdir(mode=0o755)
    cache.check_trusted(str(sticky / "cache"))
    os.chown(sticky / "cache", OTHER_UID, 0)  # they could swap its content
    with pytest.raises(CacheError, match=f"owned by uid {OTHER_UID}"):
        cache.check_trusted(str(sticky / "cache"))
    # Missing, it would be made in the sticky directory, where anyone could
    # make it first: refused.
    with pytest.raises(CacheError, match="writable by its group and others"):
        cache.check_trusted(str(sticky / "absent"))


@pytest.mark.parametrize("char", ["\n", "\r", "\u2028"], ids=["LF", "CR", "LS"])
def test_a_nic_network_name_with_a_line_break_is_refused_before_anything(bare_node, char):
    node = bare_node
    env = create_env("web1", node.disk, NIC_COUNT="1", NIC_0_MAC="aa:00:00:00:00:01",
                     NIC_0_MODE="bridged", NIC_0_LINK="br0",
                     NIC_0_NETWORK_NAME=f"net1{char}pre-up touch {node.canary}")
    refused(node, "create", env, "NIC_0_NETWORK_NAME=")
    assert not os.path.exists(node.tree.cache_dir)


@pytest.mark.parametrize("char", ["\n", "\r", "\u2028"], ids=["LF", "CR", "LS"])
def test_a_mirror_with_a_line_break_is_refused_before_anything(bare_node, char):
    node = bare_node
    node.tree.settings(f"MIRROR='http://127.0.0.1:9/debian{char}"
                       f"deb http://127.0.0.1:9/evil trixie main'\n")
    last = refused(node, "create", create_env("web1", node.disk), "MIRROR")
    assert node.tree.defaults_file in last
    assert not os.path.exists(node.tree.cache_dir)


# --- the node's own root disk ------------------------------------------------------

TRAPPED = ("wipefs", "sfdisk", "mke2fs", "mkfs.ext2", "mkfs.ext3", "mkfs.ext4", "mkswap",
           "losetup", "partx", "kpartx", "tune2fs", "resize2fs", "e2fsck", "dd", "tar",
           "restore", "mount", "blockdev")


def node_root_disk() -> str:
    """The block device the node's / is on."""
    source = subprocess.run(["findmnt", "--noheadings", "--output", "SOURCE", "/"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if not source.startswith("/dev/") or not stat.S_ISBLK(os.stat(source).st_mode):
        pytest.skip(f"/ is on {source!r}, not a block device")
    return source


@pytest.mark.parametrize("via", ["path", "symlink", "api5-swap", "import", "export",
                                 "rename"])
def test_the_nodes_root_disk_is_refused_and_never_written(node, tmp_path, via):
    root_disk = node_root_disk()
    # Safety net in case the check failed: every command that could write a
    # disk is replaced, in the script's PATH, by one that only logs its call.
    traps = tmp_path / "traps"
    traps.mkdir()
    trap_log = tmp_path / "trapped.log"
    for name in TRAPPED:
        (traps / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {trap_log}\nexit 1\n')
        (traps / name).chmod(0o755)
    path = "/sbin:/bin:/usr/sbin:/usr/bin"
    head = read_head(root_disk)
    if via == "api5-swap":
        env = ganeti_env(PATH=f"{traps}:{path}")
        del env["OS_API_VERSION"]
        last = refused(node, "create", env, root_disk, ("-i", "web1", "-b", node.disk,
                                                        "-s", root_disk))
    elif via in ("import", "export", "rename"):
        prefix = via.upper()
        env = ganeti_env(PATH=f"{traps}:{path}", INSTANCE_NAME="web1",
                         OLD_INSTANCE_NAME="web0", DISK_COUNT="1", DISK_0_PATH=root_disk,
                         **{f"{prefix}_INDEX": "0", f"{prefix}_DISK_PATH": root_disk})
        last = refused(node, via, env, root_disk)
    else:
        disk = root_disk
        if via == "symlink":
            disk = str(tmp_path / "innocent.img")
            os.symlink(root_disk, disk)
        last = refused(node, "create", create_env("web1", disk, PATH=f"{traps}:{path}"),
                       disk)
    assert "root filesystem" in last
    assert not trap_log.exists(), trap_log.read_text()
    assert read_head(root_disk) == head


def read_head(dev: str) -> bytes | None:
    """The first MiB of ``dev``; None where the node forbids opening it at
    all (some virtual machines' sandboxes do: then nothing could write it)."""
    try:
        with open(dev, "rb") as f:
            return f.read(2**20)
    except PermissionError:
        return None
