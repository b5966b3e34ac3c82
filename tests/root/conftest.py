"""Tests that touch real devices: root only, never skipped in CI, leak-checked.

Every test here runs with real loop devices, partition tables, filesystems
and (once per session) a real debootstrap. After each test the machine must
look as it did before: no new mount, loop device or device-mapper map. A
leak fails the test and is then released, so one leak does not cascade.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

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


def _ours(leaked: dict[str, set[str]], scopes: list[str]) -> dict[str, set[str]]:
    """The part of ``leaked`` that this test session made: under its directories.

    Loop devices count by their backing file, mounts by their mount point or
    source. Another test session on the same machine (developers run several)
    makes its own, which this session must neither report nor release.
    """
    def inside(path: str) -> bool:
        return any(path == s or path.startswith(s.rstrip("/") + "/") for s in scopes)
    loops = {e for e in leaked["loops"] if inside(e.split(None, 1)[-1])}
    loop_names = {e.split()[0] for e in loops}
    mounts = set()
    with open("/proc/mounts") as f:
        sources = {line.split()[1]: line.split()[0] for line in f}
    for mnt in leaked["mounts"]:
        if inside(mnt) or sources.get(mnt) in loop_names or inside(sources.get(mnt, "")):
            mounts.add(mnt)
    return {"mounts": mounts, "loops": loops, "dm": set()}


def release(leaked: dict[str, set[str]]) -> None:
    """Release leftovers after a failed leak check, deepest mounts first."""
    for mnt in sorted(leaked["mounts"], key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    for name in leaked["dm"]:
        subprocess.run(["dmsetup", "remove", name], capture_output=True)
    for entry in leaked["loops"]:
        subprocess.run(["losetup", "-d", entry.split()[0]], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """Scripts and in-process code make their temporary mount points here.

    Everything a test can leak then lives below this session's directories,
    so that the leak check can tell its own leftovers from another session's.
    """
    path = str(tmp_path_factory.mktemp("tmpdir"))
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = path
    tempfile.tempdir = path
    yield path
    tempfile.tempdir = old_tempdir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


@pytest.fixture(autouse=True)
def no_leaks(request, tmp_path_factory):
    """Fail the test if it leaves a mount, loop device or dm map behind.

    In CI the machine is ours alone: anything new is a leak. On a developer's
    machine other sessions may be running, so only what lies under this
    session's directories (and the shared test cache) counts and is released.
    """
    before = machine_state()
    yield
    after = machine_state()
    leaked = {k: after[k] - before[k] for k in after}
    scopes = [str(tmp_path_factory.getbasetemp())]
    if os.environ.get("GIDB_TEST_LOCALSTATEDIR"):
        scopes.append(os.environ["GIDB_TEST_LOCALSTATEDIR"])
    ours = _ours(leaked, scopes)
    if not os.environ.get("CI"):
        leaked = ours
    if any(leaked.values()):
        release(ours)
        pytest.fail(f"test left resources behind: {leaked}", pytrace=False)
    remove_scratch_of_passed(request.node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, for remove_scratch_of_passed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_gidb_report_{report.when}", report)


def remove_scratch_of_passed(item) -> None:
    """Remove the tmp_path of a test that passed.

    Root tests make sparse disk images, backup streams and restored trees
    (up to 1 GiB a test); pytest 7.2 keeps every test's directory until
    the session after next, so a whole run held about 57 GiB and once
    filled this machine's disk. A failed test keeps its files to look at.
    Nothing is removed while something is mounted below the directory.
    """
    path = getattr(item, "funcargs", {}).get("tmp_path")
    report = getattr(item, "_gidb_report_call", None)
    if path is None or report is None or not report.passed:
        return
    top = str(path).rstrip("/") + "/"
    if any((m + "/").startswith(top) for m in _mounts()):
        return
    shutil.rmtree(path, ignore_errors=True)

# One real bootstrap per session, shared by every test that needs a warm cache.
from tests.root import scripts  # noqa: E402
from tests.root.bootstrap_fixture import bootstrapped_localstatedir  # noqa: E402,F401
# The Debian package built from this tree, unpacked (the Ganeti cluster tests).
from tests.root.ganeti_checks import os_dir, package_root  # noqa: E402,F401


@pytest.fixture
def tree(tmp_path, bootstrapped_localstatedir):  # noqa: F811
    """A scratch OS installation (settings, hooks, variants) on the session's warm cache."""
    return scripts.make_os_tree(str(tmp_path / "os"), bootstrapped_localstatedir)


@pytest.fixture
def disk(tmp_path):
    """A 1 GiB sparse instance disk file."""
    return scripts.sparse_disk(str(tmp_path), 1024)
