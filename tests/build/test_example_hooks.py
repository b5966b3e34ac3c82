"""The example hooks shipped in examples/hooks do what their comments say.

They run here against a scratch directory standing in for the mounted
instance, with the variables create gives hooks; no root needed.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from .conftest import GANETI_PATH, ROOT

HOOKS = ROOT / "examples" / "hooks"
# run-parts (Debian) runs only names made of these characters.
RUN_PARTS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def run_hook(name: str, target: Path | None,
             **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": GANETI_PATH, "INSTANCE_NAME": "web1.example.org", **env}
    if target is not None:
        full["TARGET"] = str(target)
    return subprocess.run([str(HOOKS / name)], env=full, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("hook", sorted(p.name for p in HOOKS.iterdir()))
def test_example_hook_is_an_executable_shell_script_run_parts_accepts(
        hook: str) -> None:
    path = HOOKS / hook
    assert RUN_PARTS_NAME.match(hook)
    assert mode(path) & 0o111 == 0o111
    assert path.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize("hook", sorted(p.name for p in HOOKS.iterdir()))
def test_example_hook_refuses_to_run_without_target(hook: str) -> None:
    proc = run_hook(hook, None)
    assert proc.returncode != 0
    assert "TARGET" in proc.stderr


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    common = tmp_path / "authorized_keys"
    common.write_text("ssh-ed25519 AAAAcommon admin@site\n")
    per_instance = tmp_path / "authorized_keys.d"
    per_instance.mkdir()
    return {"KEYS_FILE": str(common), "KEYS_DIR": str(per_instance)}


def test_ssh_hook_installs_the_common_keys_for_root_with_private_modes(
        tmp_path: Path, keys: dict[str, str]) -> None:
    target = tmp_path / "target"
    (target / "root").mkdir(parents=True)
    proc = run_hook("ssh-authorized-keys", target, **keys)
    assert proc.returncode == 0, proc.stderr
    installed = target / "root/.ssh/authorized_keys"
    assert installed.read_text() == "ssh-ed25519 AAAAcommon admin@site\n"
    assert mode(target / "root/.ssh") == 0o700
    assert mode(installed) == 0o600


def test_ssh_hook_prefers_the_instance_own_key_file(
        tmp_path: Path, keys: dict[str, str]) -> None:
    target = tmp_path / "target"
    (target / "root").mkdir(parents=True)
    Path(keys["KEYS_DIR"], "web1.example.org").write_text("ssh-ed25519 AAAAown web1\n")
    proc = run_hook("ssh-authorized-keys", target, **keys)
    assert proc.returncode == 0, proc.stderr
    installed = target / "root/.ssh/authorized_keys"
    assert installed.read_text() == "ssh-ed25519 AAAAown web1\n"


def test_ssh_hook_fails_naming_both_key_files_when_there_is_none(
        tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "root").mkdir(parents=True)
    proc = run_hook("ssh-authorized-keys", target, KEYS_FILE=str(tmp_path / "none"),
                    KEYS_DIR=str(tmp_path / "none.d"))
    assert proc.returncode != 0
    assert str(tmp_path / "none.d" / "web1.example.org") in proc.stderr
    assert "remove this hook" in proc.stderr
    assert not (target / "root/.ssh").exists()


def fake_instance(tmp_path: Path, zone: str = "Europe/Zurich") -> Path:
    target = tmp_path / "target"
    (target / "etc").mkdir(parents=True)
    zonefile = target / "usr/share/zoneinfo" / zone
    zonefile.parent.mkdir(parents=True)
    zonefile.write_bytes(b"TZif2 fake")
    return target


def test_timezone_hook_links_localtime_and_sets_the_locale(tmp_path: Path) -> None:
    target = fake_instance(tmp_path)
    # A stale symlink in place of a file must be replaced, not followed.
    outside = tmp_path / "outside"
    (target / "etc/timezone").symlink_to(outside)
    proc = run_hook("timezone-locale", target, TIMEZONE="Europe/Zurich",
                    LOCALE="C.UTF-8")
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(target / "etc/localtime") == "/usr/share/zoneinfo/Europe/Zurich"
    assert (target / "etc/timezone").read_text() == "Europe/Zurich\n"
    assert (target / "etc/default/locale").read_text() == "LANG=C.UTF-8\n"
    assert not outside.exists()


def test_timezone_hook_refuses_a_zone_the_instance_lacks(tmp_path: Path) -> None:
    target = fake_instance(tmp_path)
    proc = run_hook("timezone-locale", target, TIMEZONE="Mars/Olympus")
    assert proc.returncode != 0
    assert "Mars/Olympus" in proc.stderr and "tzdata" in proc.stderr


def test_timezone_hook_asks_for_locales_package_for_other_locales(
        tmp_path: Path) -> None:
    target = fake_instance(tmp_path)
    proc = run_hook("timezone-locale", target, TIMEZONE="Europe/Zurich",
                    LOCALE="de_CH.UTF-8")
    assert proc.returncode != 0
    assert "EXTRA_PKGS" in proc.stderr and "locales" in proc.stderr
