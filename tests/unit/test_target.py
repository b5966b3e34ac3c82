"""Paths inside the instance never lead out of it, whatever links it holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ganeti_debootstrap.target import Target, TargetPathError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "usr/lib").mkdir(parents=True)
    return r


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file of the 'node', next to the instance root."""
    f = tmp_path / "node-file"
    f.write_text("node\n")
    return f


def test_an_absolute_symlink_resolves_inside_the_instance(root):
    os.symlink("/usr/lib", root / "lib")
    assert Target(str(root)).path("/lib/x") == str(root / "usr/lib/x")


def test_a_relative_symlink_cannot_climb_above_the_root(root, outside):
    os.symlink("../../../../../../node-file", root / "etc/hostname")
    t = Target(str(root))
    assert t.path("/etc/hostname") == str(root / "node-file")


def test_dotdot_stops_at_the_instance_root(root):
    assert Target(str(root)).path("/../../etc/../../etc/hosts") == str(root / "etc/hosts")


def test_a_symlink_loop_is_refused(root):
    os.symlink("b", root / "a")
    os.symlink("a", root / "b")
    with pytest.raises(TargetPathError, match="too many symbolic links"):
        Target(str(root)).path("/a")


def test_a_nul_byte_is_refused(root):
    with pytest.raises(TargetPathError, match="NUL"):
        Target(str(root)).path("/etc/host\0name")


def test_the_last_link_is_followed_only_when_asked(root):
    os.symlink("/usr/lib/os-release", root / "etc/os-release")
    t = Target(str(root))
    assert t.path("/etc/os-release") == str(root / "usr/lib/os-release")
    assert t.path_nofollow("/etc/os-release") == str(root / "etc/os-release")


def test_write_replaces_a_symlink_pointing_out_instead_of_following_it(root, outside):
    os.symlink(str(outside), root / "etc/hostname")
    Target(str(root)).write_text("/etc/hostname", "web1\n")
    assert outside.read_text() == "node\n"
    assert not os.path.islink(root / "etc/hostname")
    assert (root / "etc/hostname").read_text() == "web1\n"


def test_write_bytes_replaces_a_symlink_and_keeps_every_byte(root, outside):
    os.symlink(str(outside), root / "etc/core.img")
    data = bytes(range(256)) * 4
    Target(str(root)).write_bytes("/etc/core.img", data, mode=0o600)
    assert outside.read_text() == "node\n"
    assert not os.path.islink(root / "etc/core.img")
    assert (root / "etc/core.img").read_bytes() == data
    assert stat.S_IMODE(os.stat(root / "etc/core.img").st_mode) == 0o600


def test_write_through_a_linked_directory_stays_inside(root, outside):
    # etc -> /<the node's directory>: resolved as the instance would see it.
    (root / "etc").rmdir()
    os.symlink(str(outside.parent), root / "etc")
    Target(str(root)).write_text("/etc/node-file", "instance\n")
    assert outside.read_text() == "node\n"
    assert (root / str(outside).lstrip("/")).read_text() == "instance\n"


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755, 0o444])
def test_write_sets_the_mode_exactly_whatever_the_umask(root, mode):
    saved = os.umask(0o077)
    try:
        Target(str(root)).write_text("/etc/file", "x", mode=mode)
    finally:
        os.umask(saved)
    assert stat.S_IMODE(os.stat(root / "etc/file").st_mode) == mode


def test_missing_directories_are_made_0755_under_ganetis_umask(root):
    saved = os.umask(0o077)
    try:
        Target(str(root)).write_text("/etc/network/if-up.d/site", "x")
    finally:
        os.umask(saved)
    for d in ("etc/network", "etc/network/if-up.d"):
        assert stat.S_IMODE(os.stat(root / d).st_mode) == 0o755


def test_a_failed_write_leaves_no_temporary_file(root):
    (root / "etc/hostname").write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        # A lone surrogate cannot be encoded: the write fails midway.
        Target(str(root)).write_text("/etc/hostname", "web1\udc80\n")
    assert os.listdir(root / "etc") == ["hostname"]
    assert (root / "etc/hostname").read_text() == "old\n"


def test_remove_takes_files_and_links_but_not_directories(root):
    t = Target(str(root))
    (root / "etc/file").write_text("x")
    os.symlink("/usr/lib", root / "etc/dirlink")
    os.symlink("/nowhere", root / "etc/dangling")
    assert t.remove("/etc/file") is True
    assert t.remove("/etc/dirlink") is True
    assert t.remove("/etc/dangling") is True
    assert t.remove("/etc/absent") is False
    assert t.remove("/usr/lib") is False
    assert os.listdir(root / "etc") == []
    assert (root / "usr/lib").is_dir()


def test_remove_through_a_link_pointing_out_stays_inside(root, outside):
    # Not named after the first component of the absolute path it holds
    # (/var/tmp/...): resolved inside the root, that would be a loop.
    os.symlink(str(outside.parent), root / "gidb-out")
    assert Target(str(root)).remove(f"/gidb-out/{outside.name}") is False
    assert outside.exists()


def test_exists_sees_a_dangling_link(root):
    os.symlink("/nowhere", root / "etc/dangling")
    t = Target(str(root))
    assert t.exists("/etc/dangling")
    assert not t.exists("/etc/absent")


def test_read_follows_links_inside_the_instance(root, outside):
    (root / "usr/lib/os-release").write_text("ID=debian\n")
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    os.symlink(str(outside), root / "etc/escape")
    t = Target(str(root))
    assert t.read_text("/etc/os-release") == "ID=debian\n"
    with pytest.raises(FileNotFoundError):
        t.read_text("/etc/escape")
