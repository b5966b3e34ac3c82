"""What runs as root, or goes into every instance, must be changeable by root alone.

trust.check_path as the settings, the variants and the cache use it (the hooks'
own cases are in test_hooks.py). Unit tests may run as any user: the test's
own uid is trusted unless a test says otherwise; tests/root/test_bad_input_root.py
has the same cases with real ownership (chown).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ganeti_debootstrap import cache, settings, trust
from ganeti_debootstrap.errors import CacheError, ConfigError
from ganeti_debootstrap.paths import Paths
from tests.scratch import make_paths

ME = (0, os.geteuid())
UNTRUSTED = (4242 if os.geteuid() != 4242 else 4243,)


@pytest.fixture
def tree(tmp_path: Path) -> Paths:
    return make_paths(tmp_path, default_conf="SUITE=bookworm\n")


def variant_conf(tree: Paths) -> str:
    return os.path.join(tree.default_variants_dir, "default.conf")


@pytest.mark.real_commands  # settings.load sources the files with /bin/sh
def test_settings_only_root_can_change_are_read(tree):
    assert settings.load(tree, "default", 20, trusted_uids=ME).suite == "bookworm"


@pytest.mark.parametrize("which", ["settings file", "variants dir", "variant file",
                                   "sysconfdir"])
@pytest.mark.parametrize("mode,who", [(0o002, "others"), (0o020, "its group"),
                                      (0o022, "its group and others")])
@pytest.mark.real_commands  # settings.load sources the files with /bin/sh
def test_settings_others_can_change_are_refused_with_the_fix(tree, which, mode, who):
    path = {"settings file": tree.defaults_file, "variants dir": tree.default_variants_dir,
            "variant file": variant_conf(tree), "sysconfdir": tree.sysconfdir}[which]
    os.chmod(path, os.stat(path).st_mode | mode)
    with pytest.raises(ConfigError) as err:
        settings.load(tree, "default", 20, trusted_uids=ME)
    message = str(err.value)
    assert message.startswith("Refusing to read the settings in ")
    assert f"{path} is writable by {who}" in message
    assert f"Fix it with `chmod go-w {path}`" in message
    assert "sourced as root" in message


@pytest.mark.real_commands  # settings.load sources the files with /bin/sh
def test_settings_of_an_untrusted_owner_are_refused_with_the_fix(tree):
    # Ownership of one path needs chown (root): tests/root/test_bad_input_root.py.
    # Here nobody's uid is trusted, so the first entry on the way is refused.
    with pytest.raises(ConfigError, match=r"is owned by .*not root.*`chown root /"):
        settings.load(tree, "default", 20, trusted_uids=UNTRUSTED)


@pytest.mark.real_commands  # settings.load sources the files with /bin/sh
def test_a_missing_settings_file_and_variants_dir_keep_their_behaviour(tree):
    os.unlink(tree.defaults_file)
    assert settings.load(tree, "default", 20, trusted_uids=ME).suite == "bookworm"
    os.unlink(variant_conf(tree))
    os.rmdir(tree.default_variants_dir)
    with pytest.raises(ConfigError, match="published .* but its settings file"):
        settings.load(tree, "default", 20, trusted_uids=ME)


@pytest.mark.real_commands  # settings.load sources the files with /bin/sh
def test_a_variants_dir_reached_through_a_writable_directory_is_refused(tree, tmp_path):
    shared = tmp_path / "shared"
    (shared / "variants").mkdir(parents=True)
    (shared / "variants" / "default.conf").write_text("")
    shared.chmod(0o777)
    Path(tree.defaults_file).write_text(f"VARIANTS_DIR={shared}/variants\n")
    with pytest.raises(ConfigError, match=f"{shared} is writable by its group and others"):
        settings.load(tree, "default", 20, trusted_uids=ME)


def test_the_cache_directory_only_root_can_change_passes(tree):
    os.makedirs(tree.cache_dir, mode=0o755)
    cache.check_trusted(tree.cache_dir, trusted_uids=ME)


def test_a_missing_cache_directory_is_checked_where_it_will_be_made(tree):
    cache.check_trusted(tree.cache_dir, trusted_uids=ME)
    os.chmod(tree.localstatedir, 0o777)
    with pytest.raises(CacheError) as err:
        cache.check_trusted(tree.cache_dir, trusted_uids=ME)
    assert f"chmod go-w {tree.localstatedir}" in str(err.value)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_cache_directory_others_can_write_is_refused_with_the_fix(tree, mode):
    os.makedirs(tree.cache_dir)
    os.chmod(tree.cache_dir, mode)
    with pytest.raises(CacheError) as err:
        cache.check_trusted(tree.cache_dir, trusted_uids=ME)
    message = str(err.value)
    assert message.startswith(f"Refusing to use the bootstrap cache in {tree.cache_dir}: ")
    assert f"Fix it with `chmod go-w {tree.cache_dir}`" in message
    assert "GENERATE_CACHE=no" in message


def test_a_cache_directory_of_another_owner_is_refused_with_the_fix(tree):
    os.makedirs(tree.cache_dir)
    with pytest.raises(CacheError, match=r"owned by .*not root.*`chown root "):
        cache.check_trusted(tree.cache_dir, trusted_uids=UNTRUSTED)


def test_a_cache_directory_linked_into_a_writable_directory_is_refused(tree, tmp_path):
    drop = tmp_path / "drop"
    (drop / "cache").mkdir(parents=True)
    drop.chmod(0o777)
    os.makedirs(os.path.dirname(tree.cache_dir))
    os.symlink(drop / "cache", tree.cache_dir)
    with pytest.raises(CacheError, match=f"{drop} is writable"):
        cache.check_trusted(tree.cache_dir, trusted_uids=ME)


def test_a_symlink_loop_is_refused_not_followed_forever(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    purpose = trust.Purpose("use it", "It runs as root", "run commands as root",
                            ConfigError)
    with pytest.raises(ConfigError, match="Too many symbolic links"):
        trust.check_path(str(tmp_path / "a"), purpose, trusted_uids=ME)


def test_the_default_trusts_root_and_the_user_running_the_script():
    assert trust.default_uids() == (0, os.geteuid())
