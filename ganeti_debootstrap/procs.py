"""The node's processes as /proc shows them: who holds files below a path,
who inherited a variable, whether one still runs, their names.

Used to name what keeps an unmount busy (mounts, blockdev) and to find
what a hook left running (hooks). A process can end while it is read:
whatever is gone is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from . import fsutil

PROC = "/proc"  # replaced by unit tests


def _pids() -> list[str]:
    return [name for name in os.listdir(PROC) if name.isdigit()]


def command_name(pid: int) -> str:
    """The command name of ``pid`` ("?" when it is gone)."""
    try:
        with open(os.path.join(PROC, str(pid), "comm"), encoding="utf-8",
                  errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def describe(processes: Iterable[tuple[int, str]]) -> str:
    """``name (pid N), ...`` for a message."""
    return ", ".join(f"{name} (pid {pid})" for pid, name in processes)


def processes_using(path: str) -> list[tuple[int, str]]:
    """Processes (pid, command name) with their root, cwd, executable, an open
    file or a mapped file at or below ``path``."""
    found = []
    try:
        pids = _pids()
    except OSError:
        return []
    for pid in pids:
        if any(fsutil.is_under(p, path) for p in _paths_held(os.path.join(PROC, pid))):
            found.append((int(pid), command_name(int(pid))))
    return sorted(found)


def _paths_held(base: str) -> Iterator[str]:
    """Paths a process (its /proc directory) keeps open; gone ones are skipped."""
    links = [os.path.join(base, name) for name in ("root", "cwd", "exe")]
    try:
        links += [os.path.join(base, "fd", fd) for fd in os.listdir(os.path.join(base, "fd"))]
    except OSError:
        pass
    for link in links:
        try:
            yield os.readlink(link)
        except OSError:
            continue
    try:
        with open(os.path.join(base, "maps"), encoding="utf-8",
                  errors="surrogateescape") as f:
            for line in f:
                # address perms offset dev inode [path]
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    yield parts[5]
    except OSError:
        pass


def processes_with_variable(name: str, value: str) -> dict[int, str]:
    """Processes (pid -> command name) whose environment holds ``name=value``."""
    needle = f"{name}={value}".encode()
    found = {}
    for pid in _pids():
        try:
            with open(os.path.join(PROC, pid, "environ"), "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue  # gone, or a kernel thread
        found[int(pid)] = command_name(int(pid))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting for its parent."""
    try:
        with open(os.path.join(PROC, str(pid), "stat"), encoding="ascii",
                  errors="replace") as f:
            # pid (comm) state ...: comm may hold spaces and parentheses.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
