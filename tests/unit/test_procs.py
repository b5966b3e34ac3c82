"""The /proc scanner on a fake /proc tree: variables, zombies, names."""

from __future__ import annotations

import os

import pytest

from ganeti_debootstrap import procs


@pytest.fixture
def proc(tmp_path, monkeypatch) -> str:
    path = tmp_path / "proc"
    path.mkdir()
    monkeypatch.setattr(procs, "PROC", str(path))
    return str(path)


def process(proc: str, pid: int, comm: str, environ: bytes = b"",
            state: str = "S") -> None:
    base = os.path.join(proc, str(pid))
    os.makedirs(base)
    with open(os.path.join(base, "comm"), "w") as f:
        f.write(comm + "\n")
    with open(os.path.join(base, "environ"), "wb") as f:
        f.write(environ)
    with open(os.path.join(base, "stat"), "w") as f:
        f.write(f"{pid} ({comm} (x)) {state} 1 1\n")


def test_processes_are_found_by_an_exact_inherited_variable(proc):
    process(proc, 20, "daemon", b"PATH=/bin\0TARGET=/t\0")
    process(proc, 21, "other", b"TARGET=/t2\0")
    process(proc, 22, "named", b"MY_TARGET=/t\0")
    assert procs.processes_with_variable("TARGET", "/t") == {20: "daemon"}


def test_a_zombie_or_a_gone_process_is_not_running(proc):
    process(proc, 30, "alive")
    process(proc, 31, "zombie", state="Z")
    assert procs.running(30)
    assert not procs.running(31)
    assert not procs.running(32)


def test_a_gone_process_has_a_placeholder_name_and_processes_are_described(proc):
    assert procs.command_name(99) == "?"
    assert procs.describe([(1, "init"), (7, "sleep")]) == "init (pid 1), sleep (pid 7)"
