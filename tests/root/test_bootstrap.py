"""The real bootstrap (once per session) and the cache entry it leaves."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from ganeti_debootstrap import bootstrap
from ganeti_debootstrap.cache_store import Cache, CacheKey
from ganeti_debootstrap.errors import CommandError, ConfigError
from ganeti_debootstrap.settings import DEFAULT_SUITE, Settings
from tests.root.bootstrap_fixture import (bootstrapped_localstatedir,  # noqa: F401
                                          cache_dir, default_key)

# Packages of Priority required and important that both tools install.
BASE_PACKAGES = {"base-files", "base-passwd", "dpkg", "apt", "bash", "coreutils",
                 "libc6", "login", "passwd", "systemd", "systemd-sysv", "udev",
                 "iproute2", "ifupdown", "nano", "vim-tiny"}


@pytest.fixture(scope="module")
def default_cache(bootstrapped_localstatedir):  # noqa: F811
    store = Cache(cache_dir(bootstrapped_localstatedir), clean_days=None)
    key = default_key()
    with store.using(key, lambda: None):
        entry = store.lookup(key)
    assert entry is not None, "the session fixture left no valid cache entry"
    return store, entry


@pytest.fixture(scope="module")
def tree(default_cache, tmp_path_factory):
    """The default cache unpacked once for this module's checks."""
    store, entry = default_cache
    dest = tmp_path_factory.mktemp("tree")
    with store.using(entry.key, lambda: None):
        store.extract(entry, str(dest))
    return dest


def installed_packages(root) -> set[str]:
    status = (root / "var/lib/dpkg/status").read_text()
    packages: set[str] = set()
    current = ""
    for line in status.splitlines():
        if line.startswith("Package: "):
            current = line.split(": ", 1)[1]
        elif line.startswith("Status: ") and line.endswith(" installed"):
            packages.add(current)
    return packages


def test_tree_is_the_configured_release(tree):
    release = (tree / "usr/lib/os-release").read_text()
    assert f"VERSION_CODENAME={DEFAULT_SUITE}" in release
    assert os.path.islink(tree / "etc/os-release") or (tree / "etc/os-release").exists()


def test_base_system_packages_are_installed(tree):
    missing = BASE_PACKAGES - installed_packages(tree)
    assert not missing


def test_no_downloaded_packages_or_lists_are_cached(tree):
    archives = os.listdir(tree / "var/cache/apt/archives")
    assert not [n for n in archives if n.endswith(".deb")]
    lists = os.listdir(tree / "var/lib/apt/lists")
    assert set(lists) <= {"lock", "partial"}


def test_tree_carries_no_node_or_instance_identity(tree):
    assert (tree / "etc/machine-id").read_text() == ""
    assert not os.path.lexists(tree / "etc/hostname")
    assert not os.path.lexists(tree / "etc/resolv.conf")
    assert not [n for n in os.listdir(tree / "etc/ssh") if n.startswith("ssh_host_")] \
        if (tree / "etc/ssh").exists() else True


def test_no_bootstrap_apt_configuration_is_left(tree):
    conf = tree / "etc/apt/apt.conf.d"
    names = os.listdir(conf)
    assert not [n for n in names if "mmdebstrap" in n]
    for name in names:
        assert "proxy" not in (conf / name).read_text().lower(), name


def test_owners_and_setuid_programs_survive_the_cache(tree):
    root_st = os.stat(tree)
    assert stat.S_IMODE(root_st.st_mode) == 0o755 and root_st.st_uid == 0
    su = os.stat(tree / "usr/bin/su")
    assert su.st_mode & stat.S_ISUID and su.st_uid == 0
    shadow = os.stat(tree / "etc/shadow")
    assert stat.S_IMODE(shadow.st_mode) == 0o640
    assert shadow.st_gid == 42  # the tree's shadow group, by number


def test_cache_entry_records_its_key_and_is_private(default_cache):
    store, entry = default_cache
    key = default_key()
    assert re.fullmatch(rf"cache-{DEFAULT_SUITE}-{key.arch}-[0-9a-f]{{12}}\.tar",
                        os.path.basename(entry.path))
    record = json.load(open(entry.inputs_file))
    assert record["key"] == key.inputs()
    assert record["key"]["tool"] == bootstrap.choose_tool("auto")
    assert record["size"] == os.path.getsize(entry.path)
    assert stat.S_IMODE(os.stat(entry.path).st_mode) == 0o600


def test_changed_extra_packages_miss_the_cache(default_cache):
    store, entry = default_cache
    settings = Settings(extra_pkgs=("openssh-server",))
    key = CacheKey.from_settings(settings, bootstrap.choose_tool(settings.bootstrap_tool))
    assert key != entry.key and key.stem != entry.key.stem
    with store.using(key, lambda: None):
        assert store.lookup(key) is None
    with store.using(entry.key, lambda: None):
        assert store.lookup(entry.key) == entry


def test_installed_debootstrap_knows_the_default_suite_and_refuses_unknown_ones():
    bootstrap.check_suite_known(DEFAULT_SUITE, "debootstrap")
    with pytest.raises(ConfigError, match="does not know the suite 'nosuchsuite'"):
        bootstrap.check_suite_known("nosuchsuite", "debootstrap")


def test_failed_bootstrap_leaves_nothing_under_the_cache_name(tmp_path):
    # mmdebstrap takes any suite name; the mirror has no such suite, so apt
    # fails after one small download.
    settings = Settings(suite="nosuchsuite")
    tool = "mmdebstrap" if bootstrap.choose_tool("auto") == "mmdebstrap" else None
    if tool is None:
        pytest.skip("mmdebstrap is not installed")
    key = CacheKey.from_settings(settings, tool)
    store = Cache(str(tmp_path / "cache"))
    with store.using(key, lambda: None):
        with pytest.raises(CommandError) as err:
            with store.staging_dir(key) as root:
                bootstrap.run(settings, tool, root)
                store.store(key, root)
    assert "MIRROR" in str(err.value) and "'nosuchsuite'" in str(err.value)
    assert os.listdir(store.directory) == []
