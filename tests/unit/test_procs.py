"""The /proc scanner on a fake /proc tree: variables, zombies, names."""

from __future__ import annotations

import os


from ganeti_debootstrap import procs


def add_process(proc: str, pid: int, comm: str, environ: bytes = b"", state: str = "S",
                links: dict[str, str] | None = None, maps: str = "") -> None:
    """A fake /proc/PID: comm, environ, stat, maps and the links given
    (``root``, ``cwd``, ``exe``, ``fd/N``)."""
    base = os.path.join(proc, str(pid))
    os.makedirs(os.path.join(base, "fd"))
    for name, text in (("comm", comm + "\n"), ("maps", maps),
                       ("stat", f"{pid} ({comm} (x)) {state} 1 1\n")):
        with open(os.path.join(base, name), "w") as f:
            f.write(text)
    with open(os.path.join(base, "environ"), "wb") as f:
        f.write(environ)
    for name, dest in (links or {}).items():
        os.symlink(dest, os.path.join(base, name))


def test_processes_are_found_by_an_exact_inherited_variable(proc):
    add_process(proc, 20, "daemon", b"PATH=/bin\0TARGET=/t\0")
    add_process(proc, 21, "other", b"TARGET=/t2\0")
    add_process(proc, 22, "named", b"MY_TARGET=/t\0")
    assert procs.processes_with_variable("TARGET", "/t") == {20: "daemon"}


def test_a_zombie_or_a_gone_process_is_not_running(proc):
    add_process(proc, 30, "alive")
    add_process(proc, 31, "zombie", state="Z")
    assert procs.running(30)
    assert not procs.running(31)
    assert not procs.running(32)


def test_a_gone_process_has_a_placeholder_name_and_processes_are_described(proc):
    assert procs.command_name(99) == "?"
    assert procs.describe([(1, "init"), (7, "sleep")]) == "init (pid 1), sleep (pid 7)"


def test_processes_are_found_by_root_cwd_exe_fd_and_maps(proc):
    add_process(proc, 10, "chrooted", links={"root": "/t"})
    add_process(proc, 11, "inside", links={"cwd": "/t/home"})
    add_process(proc, 12, "binary", links={"exe": "/t/usr/bin/daemon (deleted)"})
    add_process(proc, 13, "writer", links={"fd/3": "/t/var/log/x"})
    add_process(proc, 14, "mapper",
                maps="7f00-7f10 r-xp 00000000 07:01 12 /t/usr/lib/libx.so\n")
    add_process(proc, 15, "outside", links={"cwd": "/tmp", "fd/1": "/tx/file"},
                maps="7f00-7f10 r-xp 0 0:0 0 [heap]\n")
    assert procs.processes_using("/t") == [
        (10, "chrooted"), (11, "inside"), (12, "binary"), (13, "writer"), (14, "mapper")]
