"""The set-up create and import share (plan.py): settings, parameters, arch, boot loader."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ganeti_debootstrap import environment, plan, settings
from ganeti_debootstrap.errors import ConfigError, MissingProgramError
from ganeti_debootstrap.paths import Paths


@pytest.fixture
def tree(tmp_path: Path) -> Paths:
    paths = Paths(str(tmp_path / "etc"), str(tmp_path / "var"), str(tmp_path / "os"))
    os.makedirs(paths.default_variants_dir)
    os.makedirs(os.path.dirname(paths.defaults_file))
    os.makedirs(paths.os_dir)
    Path(paths.variants_list).write_text("default\n")
    Path(paths.default_variants_dir, "default.conf").write_text("")
    return paths


@pytest.fixture
def node(fake_runner):
    """The fake runner, reading the settings for real and answering dpkg with amd64."""
    fake_runner.expect(*settings.SHELL_COMMAND, real=True)
    fake_runner.expect("dpkg", "--print-architecture", stdout="amd64\n")
    return fake_runner


def request(script: str = "create", **variables: str) -> environment.Request:
    env = {"OS_API_VERSION": "20", "INSTANCE_NAME": "web1.example.org",
           "OS_VARIANT": "default", "DISK_COUNT": "1", "DISK_0_PATH": "/dev/null",
           "IMPORT_INDEX": "0", "IMPORT_DISK_PATH": "/dev/null", **variables}
    return environment.parse(script, [], env)


def commands(fake) -> list[str]:
    """The commands run but the settings shell."""
    return [c for c in fake.commands() if not c.startswith(settings.SHELL_COMMAND[0])]


def test_import_gets_the_node_architecture_once_and_no_bootstrap_tool(tree, node,
                                                                      monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    p = plan.prepare(request("import", OSP_FILESYSTEM="ext3"), tree)
    assert (p.arch, p.tool, p.params.filesystem) == ("amd64", "", "ext3")
    assert p.settings.variant == "default"
    assert commands(node) == ["dpkg --print-architecture"]


def test_arch_setting_is_used_without_asking_dpkg(tree, node):
    Path(tree.defaults_file).write_text("ARCH=i386\n")
    assert plan.prepare(request("import"), tree).arch == "i386"
    assert commands(node) == []


def test_the_boot_loader_is_resolved_with_its_packages(tree, node):
    Path(tree.defaults_file).write_text("EXTRA_PKGS=vim\n")
    p = plan.prepare(request("import", OSP_BOOTLOADER="grub"), tree)
    assert p.settings.bootloader == "grub"
    assert p.settings.extra_pkgs == ("vim", "linux-image-amd64", "grub-pc")


def test_create_chooses_the_tool_before_the_architecture_is_asked(tree, node,
                                                                  monkeypatch):
    Path(tree.defaults_file).write_text("BOOTSTRAP_TOOL=mmdebstrap\n")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(MissingProgramError, match="mmdebstrap"):
        plan.prepare(request(), tree, bootstraps=True)
    assert commands(node) == []
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    assert plan.prepare(request(), tree, bootstraps=True).tool == "mmdebstrap"


def test_a_bad_setting_is_reported_before_a_bad_parameter(tree, node):
    Path(tree.defaults_file).write_text("PARTITION_STYLE=mbr\n")
    with pytest.raises(ConfigError, match="PARTITION_STYLE"):
        plan.prepare(request(OSP_FILESYSTEM="zfs"), tree)
    Path(tree.defaults_file).write_text("")
    with pytest.raises(ConfigError, match="filesystem='zfs'"):
        plan.prepare(request(OSP_FILESYSTEM="zfs"), tree)
    assert commands(node) == []


def test_root_filesystem_comes_from_the_setting_unless_the_parameter_names_one(tree, node):
    assert plan.prepare(request(), tree).params.filesystem == "ext4"
    Path(tree.defaults_file).write_text('FILESYSTEM="xfs"\n')
    assert plan.prepare(request(), tree).params.filesystem == "xfs"
    assert plan.prepare(request(OSP_FILESYSTEM="btrfs"), tree).params.filesystem == "btrfs"
