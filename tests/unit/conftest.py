"""Unit test setup: no external command runs unless a test asks for it.

Every unit test runs with a refusing runner installed (a FakeRunner
without rules: any command raises UnexpectedCommand), so a unit test
cannot touch the node by accident. A test that fakes commands takes the
``fake_runner`` fixture (tests/conftest.py), which replaces the refusing
one; a test that must run a real program says so with
``@pytest.mark.real_commands``.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ganeti_debootstrap import procs, runner, signals
from ganeti_debootstrap.instance_files import NodeFiles
from ganeti_debootstrap.paths import Paths
from tests.fakenode import DISK0_MIB, FakeNode
from tests.fakes import FakeRunner
from tests.scratch import make_paths
from tests.systemtree import write

REAL_COMMANDS = "real_commands"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{REAL_COMMANDS}: the unit test runs real external commands "
                   "(without it, every command is refused)")


@pytest.fixture(autouse=True)
def refuse_commands(request: pytest.FixtureRequest) -> Iterator[None]:
    """Install the refusing runner, unless the test is marked real_commands."""
    if request.node.get_closest_marker(REAL_COMMANDS) is not None:
        yield
        return
    with runner.replaced(FakeRunner()):
        yield


@pytest.fixture
def fake_node(tmp_path: Path, fake_runner: FakeRunner,
              monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    """Loop devices, mounts, tables and filesystems faked (tests/fakenode.py).

    The scripts' temporary directories (their mount points) are made in
    tmp_path/tmp, so that leftovers() sees any left behind.
    """
    node = FakeNode(tmp_path / "node", fake_runner)
    node.base.mkdir()
    node.install(monkeypatch)
    node.tmpdir = tmp_path / "tmp"
    node.tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(node.tmpdir))
    return node


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """A scratch installation of the OS definition (tests/scratch.py), default settings."""
    return make_paths(tmp_path / "install")


@pytest.fixture
def disk0(tmp_path: Path) -> str:
    """The instance's disk 0: a sparse 1 GiB file (DISK_0_PATH)."""
    path = tmp_path / "disks" / "disk0.img"
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.truncate(DISK0_MIB * 2**20)
    return str(path)


@pytest.fixture
def disk_file(tmp_path: Path) -> str:
    """A sparse 600 MiB disk file, disk.img."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    os.truncate(path, 600 * 2**20)
    return str(path)


@pytest.fixture
def node(tmp_path: Path) -> NodeFiles:
    """The node's files the instance gets a copy of: a resolv.conf with a real server."""
    conf = write(tmp_path / "node/etc/resolv.conf",
                 "search example.org\nnameserver 192.0.2.53\n")
    return NodeFiles(resolv_conf=str(conf),
                     resolved_upstream=str(tmp_path / "node/run/resolv.conf"))


@pytest.fixture
def process_state() -> Iterator[None]:
    """For tests calling a main(): it installs signal handlers and logging;
    ours are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in signals.HANDLED}
    logger = logging.getLogger("ganeti_debootstrap")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty scratch /proc the package scans instead of the node's (procs.PROC)."""
    path = tmp_path / "proc"
    path.mkdir()
    monkeypatch.setattr(procs, "PROC", str(path))
    return str(path)
