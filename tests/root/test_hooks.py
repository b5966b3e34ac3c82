"""Hooks against real ownership, and running in an instance tree, as root.

Only root trusted (the default): these are the checks create makes on a node.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ganeti_debootstrap import hooks
from ganeti_debootstrap.errors import HookError
from ganeti_debootstrap.target import Target

OTHER_UID = 1234


def hook(directory: Path, name: str, body: str = "exit 0\n", mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hooks"
    hook(d, "10-first")
    return d


def test_root_owned_hooks_under_tmp_are_accepted(hook_dir):
    # /tmp is sticky and world-writable; everything below it is root's.
    hooks.check_safe(str(hook_dir))


def test_a_hook_owned_by_another_user_is_refused(hook_dir):
    other = hook(hook_dir, "20-theirs")
    os.chown(other, OTHER_UID, 0)
    with pytest.raises(HookError, match=f"{other} is owned by uid {OTHER_UID}, not root"):
        hooks.check_safe(str(hook_dir))


def test_a_hook_directory_owned_by_another_user_is_refused(hook_dir):
    os.chown(hook_dir, OTHER_UID, 0)
    with pytest.raises(HookError, match=f"chown root {hook_dir}"):
        hooks.check_safe(str(hook_dir))


def test_a_parent_owned_by_another_user_is_refused(tmp_path):
    parent = tmp_path / "home"
    d = parent / "hooks"
    hook(d, "10-a")
    os.chown(parent, OTHER_UID, 0)
    with pytest.raises(HookError, match=f"{parent} is owned by uid {OTHER_UID}"):
        hooks.check_safe(str(d))


def test_a_world_writable_hook_is_refused(hook_dir):
    (hook_dir / "10-first").chmod(0o757)
    with pytest.raises(HookError, match="is writable by others"):
        hooks.check_safe(str(hook_dir))


def test_a_symlinked_hook_owned_by_another_user_is_refused(hook_dir):
    link = hook_dir / "20-link"
    os.symlink("10-first", link)
    os.chown(link, OTHER_UID, 0, follow_symlinks=False)
    with pytest.raises(HookError, match=f"chown -h root {link}"):
        hooks.check_safe(str(hook_dir))


def test_another_users_file_in_a_sticky_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = shared / "hooks"
    hook(theirs, "10-a")
    os.chown(theirs, OTHER_UID, 0)  # they could rename it away: sticky does not help
    with pytest.raises(HookError, match="owned by uid 1234"):
        hooks.check_safe(str(theirs))


def test_hooks_work_on_the_instance_tree_and_cannot_start_daemons(tmp_path, hook_dir):
    root = tmp_path / "target"
    for d in ("etc", "usr/sbin", "var/log"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_text("web1.example.org\n")
    hook(hook_dir, "20-inspect",
         'ls "$TARGET" > "$TARGET/var/log/listing"\n'
         '"$TARGET/usr/sbin/policy-rc.d" ssh start\n'
         'echo $? > "$TARGET/var/log/policy-status"\n'
         'echo "$INSTANCE_NAME $SUITE" > "$TARGET/etc/motd"\n')
    env = {"TARGET": str(root), "INSTANCE_NAME": "web1.example.org", "SUITE": "trixie",
           "PATH": hooks.HOOK_PATH}
    saved = os.umask(0o077)  # as Ganeti runs us
    try:
        with hooks.daemons_prevented(Target(str(root))):
            ran = hooks.run_all(str(hook_dir), env, timeout=30)
    finally:
        os.umask(saved)
    assert [os.path.basename(h) for h in ran] == ["10-first", "20-inspect"]
    assert (root / "var/log/listing").read_text().split() == ["etc", "usr", "var"]
    assert (root / "var/log/policy-status").read_text() == "101\n"
    assert (root / "etc/motd").read_text() == "web1.example.org trixie\n"
    assert (root / "etc/motd").stat().st_mode & 0o777 == 0o644
    assert not (root / "usr/sbin/policy-rc.d").exists()
