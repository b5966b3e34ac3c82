"""Running the measured commands: wall time, peak memory, and stopping them.

Each command runs in its own process group with a clean environment given
in full (as Ganeti runs OS scripts), its output in a log file. It is reaped
with wait4(), whose resource usage of a child includes the descendants it
waited for: its ru_maxrss is the largest peak of any process of the tree,
not a sum. On Ctrl-C the benchmark stops every group it started with
SIGTERM, so that the scripts release what they hold, and SIGKILL after a
grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
STOP_GRACE_SECONDS = 60.0
LOG_TAIL_LINES = 20


class BenchError(Exception):
    """A measured command failed; the message says which, with its log's end."""


class Interrupted(BaseException):
    """A termination signal reached the benchmark (Ctrl-C, SIGTERM, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@dataclass
class Result:
    """A finished command."""

    argv: list[str]
    returncode: int
    seconds: float
    maxrss_kib: int  # the largest peak of any process in the tree (wait4)
    log_path: str
    started: float = 0.0  # time.monotonic() at start
    ended: float = 0.0

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@dataclass
class Running:
    """A started command, not yet reaped."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log_path: str
    started: float
    sampler: MemorySampler | None = None


_live: dict[int, Running] = {}


def start(argv: Sequence[str], *, env: Mapping[str, str], log_path: str,
          cwd: str | None = None, stdin: IO[bytes] | None = None,
          stdout: IO[bytes] | None = None, umask: int = -1,
          sample_every: float | None = None) -> Running:
    """Start ``argv`` in its own process group; stderr (and stdout) to the log.

    ``sample_every`` (seconds): sample the tree's resident memory that often.
    """
    with open(log_path, "ab") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log, stderr=log,
            process_group=0, umask=umask)
    running = Running(proc, list(argv), log_path, started)
    _live[proc.pid] = running
    if sample_every is not None:
        running.sampler = MemorySampler(proc.pid, sample_every)
        running.sampler.start()
    return running


def _reaped(running: Running, status: int, usage: object) -> Result:
    ended = time.monotonic()
    _live.pop(running.proc.pid, None)
    running.proc.returncode = os.waitstatus_to_exitcode(status)
    if running.sampler is not None:
        running.sampler.stop()
    return Result(running.argv, running.proc.returncode, ended - running.started,
                  int(getattr(usage, "ru_maxrss")), running.log_path,
                  running.started, ended)


def wait(running: Running) -> Result:
    """Wait for one command and return its timing and peak memory.

    Interrupted, it stops every running command before passing the
    interruption on: whatever cleans up after it must not race them.
    """
    try:
        _, status, usage = os.wait4(running.proc.pid, 0)
    except BaseException:
        stop_all()
        raise
    return _reaped(running, status, usage)


def wait_all(group: Sequence[Running]) -> list[Result]:
    """Wait for every command of ``group``, each timed to its own end."""
    pending = {r.proc.pid: r for r in group}
    results: dict[int, Result] = {}
    try:
        while pending:
            pid, status, usage = os.wait4(-1, 0)
            if pid in pending:
                results[pid] = _reaped(pending.pop(pid), status, usage)
    except BaseException:
        stop_all()
        raise
    return [results[r.proc.pid] for r in group]


def run(argv: Sequence[str], *, env: Mapping[str, str], log_path: str,
        check: bool = True, **kwargs: object) -> Result:
    """Start, wait, and raise BenchError (with the log's end) on failure."""
    result = wait(start(argv, env=env, log_path=log_path, **kwargs))  # type: ignore[arg-type]
    if check:
        check_result(result)
    return result


def check_result(result: Result) -> None:
    if result.returncode != 0:
        raise BenchError(f"{' '.join(result.argv)} exited with status "
                         f"{result.returncode} after {result.seconds:.1f} s; the end "
                         f"of its log {result.log_path}:\n" + log_tail(result.log_path))


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError as err:
        return f"  (cannot read it: {err.strerror})"
    return "\n".join("  | " + line for line in text)


# What stop_all() stopped, for the report's clean-up section.
stopped: list[str] = []


def stop_all(grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every live group, wait up to ``grace`` seconds, then SIGKILL."""
    for pid, running in list(_live.items()):
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped.append(" ".join(running.argv[:2]))
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid, running in list(_live.items()):
        try:
            running.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            # The leader is gone or stuck: whatever is left of its group goes.
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            running.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if running.sampler is not None:
            running.sampler.stop()
        _live.pop(pid, None)


# -- resident memory of a process tree, sampled -----------------------------

def status_kib(text: str, field_name: str) -> int | None:
    """A "Name:   N kB" field of /proc/PID/status, in KiB."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field_name:
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0])
    return None


def read_text(path: str) -> str:
    """A (/proc or /sys) file's text; empty when it cannot be read (it went away)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (none once it has exited: it may at any moment)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids = []
    for tid in tids:
        kids += [int(p) for p in read_text(f"/proc/{pid}/task/{tid}/children").split()]
    return kids


@dataclass
class MemorySampler:
    """Polls the peak resident size (VmHWM) of a process and its descendants.

    VmHWM is each process's own high-water mark, so the last sample of a
    process is its peak up to then; a child living less than one interval
    may be missed (wait4's tree maximum still counts it).
    """

    root: int
    interval: float = 0.01
    # (pid, program): (name, KiB). A child is sampled again after its exec,
    # under its new program: its VmHWM starts afresh with the new image.
    peaks: dict[tuple[int, str], tuple[str, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _root_program: str = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pending = [self.root]
            while pending:
                pid = pending.pop()
                program = _program(pid)
                hwm = status_kib(read_text(f"/proc/{pid}/status"), "VmHWM")
                if hwm is None or not program:
                    continue
                if pid == self.root:
                    self._root_program = self._root_program or program
                elif program == self._root_program:
                    # Forked but not yet exec'd: a copy of the root's memory
                    # accounting, not a command of its own.
                    pending.extend(_children(pid))
                    continue
                name = read_text(f"/proc/{pid}/comm").strip() or str(pid)
                old = self.peaks.get((pid, program), ("", 0))[1]
                self.peaks[(pid, program)] = (name, max(old, hwm))
                pending.extend(_children(pid))
            self._stop.wait(self.interval)

    def own_peak(self) -> int:
        """The root process's peak in KiB (0 if never sampled)."""
        return max((v[1] for (pid, _), v in self.peaks.items() if pid == self.root),
                   default=0)

    def largest_child(self) -> tuple[str, int]:
        """(name, KiB) of the descendant with the largest peak seen."""
        others = [v for (pid, _), v in self.peaks.items() if pid != self.root]
        return max(others, key=lambda v: v[1], default=("none seen", 0))


def _program(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
