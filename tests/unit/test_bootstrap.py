"""Choosing and running the bootstrap tool, and cleaning the tree it made."""

from __future__ import annotations

import os
import shutil

import pytest

from ganeti_debootstrap import bootstrap
from ganeti_debootstrap.errors import CommandError, ConfigError, MissingProgramError
from ganeti_debootstrap.settings import Settings

FULL = Settings(suite="bookworm", arch="i386", mirror="http://mirror.invalid/debian",
                components=("main", "contrib"), extra_pkgs=("vim", "curl", "vim"))


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly the given tools are installed."""
    present: set[str] = set()
    real_which = shutil.which

    def which(name, *args, **kwargs):
        if name in bootstrap.TOOLS:
            return f"/usr/bin/{name}" if name in present else None
        return real_which(name, *args, **kwargs)

    monkeypatch.setattr(shutil, "which", which)
    return present


@pytest.fixture
def scripts(tmp_path, monkeypatch):
    """A debootstrap scripts directory knowing trixie and bookworm."""
    d = tmp_path / "scripts"
    d.mkdir()
    for suite in ("trixie", "bookworm"):
        (d / suite).write_text("")
    monkeypatch.setattr(bootstrap, "DEBOOTSTRAP_SCRIPTS", str(d))
    return d


def test_auto_prefers_mmdebstrap_when_installed(installed):
    installed.update({"mmdebstrap", "debootstrap"})
    assert bootstrap.choose_tool("auto") == "mmdebstrap"


def test_auto_falls_back_to_debootstrap(installed):
    installed.add("debootstrap")
    assert bootstrap.choose_tool("auto") == "debootstrap"


def test_explicit_tool_is_used_even_if_the_other_is_installed(installed):
    installed.update({"mmdebstrap", "debootstrap"})
    assert bootstrap.choose_tool("debootstrap") == "debootstrap"


def test_explicit_missing_tool_names_its_package(installed):
    installed.add("debootstrap")
    with pytest.raises(MissingProgramError, match="package 'mmdebstrap'"):
        bootstrap.choose_tool("mmdebstrap")


def test_debootstrap_defaults_give_suite_and_target_only():
    assert bootstrap.command(Settings(), "debootstrap", "/t") == [
        "debootstrap", "trixie", "/t"]


def test_debootstrap_passes_every_setting_with_sorted_unique_packages():
    assert bootstrap.command(FULL, "debootstrap", "/t") == [
        "debootstrap", "--arch=i386", "--include=curl,vim",
        "--components=main,contrib", "bookworm", "/t",
        "http://mirror.invalid/debian"]


def test_mmdebstrap_defaults_install_debootstraps_package_set():
    assert bootstrap.command(Settings(), "mmdebstrap", "/t") == [
        "mmdebstrap", "--mode=root", "--format=directory",
        "--variant=important", '--aptopt=Dir::Cache::srcpkgcache ""',
        '--customize-hook=rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"', "trixie", "/t"]


def test_mmdebstrap_passes_every_setting():
    assert bootstrap.command(FULL, "mmdebstrap", "/t") == [
        "mmdebstrap", "--mode=root", "--format=directory",
        "--variant=important", '--aptopt=Dir::Cache::srcpkgcache ""',
        '--customize-hook=rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"',
        "--architectures=i386", "--include=curl,vim",
        "--components=main,contrib", "bookworm", "/t",
        "http://mirror.invalid/debian"]


@pytest.mark.parametrize("tool", ["debootstrap", "mmdebstrap"])
def test_proxy_is_exported_to_the_tool(fake_runner, scripts, tool):
    fake_runner.expect(tool)
    proxy = "http://proxy.invalid:3128"
    bootstrap.run(Settings(proxy=proxy), tool, "/t")
    assert fake_runner.envs == [{"http_proxy": proxy, "https_proxy": proxy}]


def test_no_proxy_adds_nothing_to_the_environment(fake_runner, scripts):
    fake_runner.expect("debootstrap")
    bootstrap.run(Settings(), "debootstrap", "/t")
    assert fake_runner.commands() == ["debootstrap trixie /t"]
    assert fake_runner.envs == [{}]


def test_suite_unknown_to_debootstrap_is_refused_before_running(fake_runner, scripts):
    with pytest.raises(ConfigError) as err:
        bootstrap.run(Settings(suite="forky"), "debootstrap", "/t")
    message = str(err.value)
    assert "'forky'" in message and "Upgrade debootstrap" in message
    assert fake_runner.calls == []


def test_mmdebstrap_leaves_suite_checking_to_apt(fake_runner, scripts):
    fake_runner.expect("mmdebstrap")
    bootstrap.run(Settings(suite="forky"), "mmdebstrap", "/t")
    assert fake_runner.calls[0][-2:] == ("forky", "/t")


def test_failure_carries_output_and_a_mirror_hint(fake_runner, scripts):
    fake_runner.expect("mmdebstrap", returncode=1, stderr="E: Unable to locate package nosuch")
    with pytest.raises(CommandError) as err:
        bootstrap.run(Settings(extra_pkgs=("nosuch",)), "mmdebstrap", "/t")
    message = str(err.value)
    assert "Unable to locate package nosuch" in message
    assert "MIRROR" in message and "EXTRA_PKGS (nosuch)" in message


def test_debootstrap_failure_includes_the_end_of_its_own_log(fake_runner, scripts, tmp_path):
    dest = tmp_path / "root"

    def fail_with_log(argv):
        (dest / "debootstrap").mkdir(parents=True)
        (dest / "debootstrap" / "debootstrap.log").write_text(
            "dpkg: error processing package systemd (--configure):\n"
            " installed systemd package post-installation script subprocess "
            "returned error exit status 1\n")

    fake_runner.expect("debootstrap", returncode=1, action=fail_with_log,
                       stderr="W: See /x/debootstrap/debootstrap.log for details")
    with pytest.raises(CommandError) as err:
        bootstrap.run(Settings(), "debootstrap", str(dest))
    message = str(err.value)
    assert "See /x/debootstrap/debootstrap.log" in message
    assert "error processing package systemd" in message


def make_tree(root):
    """A tree with what both tools leave behind that must not be cached."""
    files = {
        "var/cache/apt/archives/bash_5.2_amd64.deb": "deb",
        "var/cache/apt/archives/lock": "",
        "var/cache/apt/archives/partial/half.deb": "x",
        "var/lib/apt/lists/deb.debian.org_debian_dists_trixie_InRelease": "r",
        "var/lib/apt/lists/lock": "",
        "etc/hostname": "node1\n",
        "etc/resolv.conf": "nameserver 192.0.2.1\n",
        "etc/udev/rules.d/70-persistent-net.rules": "SUBSYSTEM==...",
        "etc/udev/rules.d/80-site.rules": "kept",
        "etc/ssh/ssh_host_ed25519_key": "secret",
        "etc/ssh/ssh_host_ed25519_key.pub": "public",
        "etc/ssh/sshd_config": "kept",
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
        "etc/os-release": "kept",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.chmod(root / "etc/machine-id", 0o444)
    (root / "var/lib/dbus").mkdir(parents=True)
    os.symlink("/etc/machine-id", root / "var/lib/dbus/machine-id")


def test_clean_tree_removes_downloads_and_identity(tmp_path):
    make_tree(tmp_path)
    changed = bootstrap.clean_tree(str(tmp_path))
    assert not (tmp_path / "var/cache/apt/archives/bash_5.2_amd64.deb").exists()
    assert not (tmp_path / "var/cache/apt/archives/partial/half.deb").exists()
    assert os.listdir(tmp_path / "var/lib/apt/lists") == ["lock"]
    for gone in ("etc/hostname", "etc/resolv.conf", "etc/ssh/ssh_host_ed25519_key",
                 "etc/ssh/ssh_host_ed25519_key.pub",
                 "etc/udev/rules.d/70-persistent-net.rules"):
        assert not (tmp_path / gone).exists(), gone
    assert "/etc/hostname" in changed and "/etc/machine-id" in changed


def test_clean_tree_keeps_apt_locks_configuration_and_directories(tmp_path):
    make_tree(tmp_path)
    bootstrap.clean_tree(str(tmp_path))
    for kept in ("var/cache/apt/archives/lock", "var/cache/apt/archives/partial",
                 "etc/ssh/sshd_config", "etc/udev/rules.d/80-site.rules",
                 "etc/os-release"):
        assert (tmp_path / kept).exists(), kept
    assert os.path.islink(tmp_path / "var/lib/dbus/machine-id")


def test_machine_id_is_emptied_keeping_its_mode(tmp_path):
    make_tree(tmp_path)
    bootstrap.clean_tree(str(tmp_path))
    machine_id = tmp_path / "etc/machine-id"
    assert machine_id.read_text() == ""
    assert os.stat(machine_id).st_mode & 0o777 == 0o444


def test_clean_tree_of_a_clean_tree_changes_nothing(tmp_path):
    make_tree(tmp_path)
    bootstrap.clean_tree(str(tmp_path))
    assert bootstrap.clean_tree(str(tmp_path)) == []


def test_clean_tree_never_follows_links_out_of_the_tree(tmp_path):
    outside = tmp_path / "node-archives"
    outside.mkdir()
    (outside / "precious.deb").write_text("node's own")
    root = tmp_path / "root"
    (root / "var/cache/apt").mkdir(parents=True)
    os.symlink(str(outside), root / "var/cache/apt/archives")
    (root / "etc").mkdir()
    os.symlink(str(outside / "precious.deb"), root / "etc/hostname")
    bootstrap.clean_tree(str(root))
    assert (outside / "precious.deb").read_text() == "node's own"
    assert not os.path.lexists(root / "etc/hostname")
