"""Tests that touch real devices: root only, never skipped in CI, leak-checked.

Every test here runs with real loop devices, partition tables, filesystems
and (once per session) a real debootstrap. After each test the machine must
look as it did before: no new mount, loop device or device-mapper map. A
leak fails the test and is then released, so one leak does not cascade.
"""

from __future__ import annotations

import os
import subprocess

import pytest


def pytest_collection_modifyitems(config, items):
    root_items = [i for i in items if "/tests/root/" in str(i.fspath)]
    if not root_items or os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            "tests/root needs root and must not be skipped in CI: run the "
            "suite as root (devel/run-tests does).")
    skip = pytest.mark.skip(reason="needs root: real loop devices and mounts")
    for item in root_items:
        item.add_marker(skip)


def _mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f}


def _loops() -> set[str]:
    out = subprocess.run(["losetup", "--noheadings", "--list", "--output",
                          "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def _dm_maps() -> set[str]:
    try:
        out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return set()
    return {line.split()[0] for line in out.splitlines()
            if line.strip() and "No devices found" not in line}


def machine_state() -> dict[str, set[str]]:
    """What a test could leak: mount points, loop devices, dm maps."""
    return {"mounts": _mounts(), "loops": _loops(), "dm": _dm_maps()}


def release(leaked: dict[str, set[str]]) -> None:
    """Release leftovers after a failed leak check, deepest mounts first."""
    for mnt in sorted(leaked["mounts"], key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    for name in leaked["dm"]:
        subprocess.run(["dmsetup", "remove", name], capture_output=True)
    for entry in leaked["loops"]:
        subprocess.run(["losetup", "-d", entry.split()[0]], capture_output=True)


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it leaves a mount, loop device or dm map behind."""
    before = machine_state()
    yield
    after = machine_state()
    leaked = {k: after[k] - before[k] for k in after}
    if any(leaked.values()):
        release(leaked)
        pytest.fail(f"test left resources behind: {leaked}", pytrace=False)


# One real bootstrap per session, shared by every test that needs a warm cache.
from tests.root.bootstrap_fixture import bootstrapped_localstatedir  # noqa: E402,F401
