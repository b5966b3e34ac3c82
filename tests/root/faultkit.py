"""Fault injection for the root tests: scripts in the background, signals at a
known point, a stalling proxy, and an inventory of what a run left behind.

A script started with :func:`start` runs as Ganeti runs it (tests/launch.py,
clean environment, umask 077) with two test-only variables:

- ``GIDB_TEST_PAUSE_AT=<phase>`` (read by ``log.phase`` and nowhere else):
  the script prints ``PAUSED <phase>`` when that phase starts and waits for
  a signal there;
- ``GIDB_TEST_TAG=<unique>``: ignored by the scripts, but inherited by every
  process they start (commands, hooks, what hooks start), so that
  :func:`tagged_processes` finds anything left running afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from tests.root import scripts

PAUSE_VARIABLE = "GIDB_TEST_PAUSE_AT"
TAG_VARIABLE = "GIDB_TEST_TAG"

# How long an interrupted script may take to clean up and exit: a command it
# was running gets 5 s after SIGTERM (runner.STOP_GRACE_SECONDS), a busy
# unmount about 3 s of retries.
EXIT_SECONDS = 15.0


class Background:
    """A script running in its own process; its stderr is collected as it comes."""

    def __init__(self, proc: subprocess.Popen[bytes], tag: str) -> None:
        self.proc = proc
        self.tag = tag
        self._err = bytearray()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            with self._changed:
                self._err += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """Wait until stderr matches ``pattern`` (a regex); fail if the script ends first."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = regex.search(self._err.decode("utf-8", "replace"))
                if found:
                    return found
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"the script exited ({self.proc.returncode}) before "
                        f"printing {pattern!r}:\n{self._err.decode(errors='replace')[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} within {timeout} s:\n"
                                         f"{self._err.decode(errors='replace')[-3000:]}")
                self._changed.wait(min(left, 0.2))

    def signal(self, signum: int) -> float:
        """Send ``signum`` to the script; return the time it was sent."""
        self.proc.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout: float = EXIT_SECONDS) -> int:
        """The exit status; fails (after killing it) if it takes longer than ``timeout``."""
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the script did not exit within {timeout} s:\n"
                                 + self.stderr[-3000:]) from None
        self._reader.join(timeout=5)
        return status

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def start(tree: scripts.OSTree, script: str, env: Mapping[str, str], *,
          pause_at: str = "", stdin: int | None = None,
          stdout: int | None = None) -> Background:
    """Start ``script`` as :func:`scripts.run_script` would, without waiting."""
    tag = uuid.uuid4().hex
    full = dict(env)
    full[TAG_VARIABLE] = tag
    if pause_at:
        full[PAUSE_VARIABLE] = pause_at
    proc = subprocess.Popen(
        [scripts.PYTHON, scripts.LAUNCHER, tree.sysconfdir, tree.localstatedir,
         tree.os_dir, script],
        env=full, cwd=tree.os_dir,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE, umask=0o077)
    return Background(proc, tag)


# --- what a run may leave behind ---------------------------------------------

def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """Processes (pid, name) whose environment holds ``GIDB_TEST_TAG=tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        found.append((int(pid), name))
    return found


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def mounts_under(top: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if _under(p, top)]


def loops_backed_under(top: str) -> list[str]:
    """Loop devices whose backing file lies under ``top``, and loop devices
    over those (a partition's offset loop over a disk's loop device)."""
    backing_of = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing_of[f"/dev/{name}"] = f.read().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
    found: list[str] = []
    changed = True
    while changed:
        changed = False
        for dev, backing in backing_of.items():
            if dev not in found and (_under(backing, top) or backing in found):
                found.append(dev)
                changed = True
    # Loop devices over other loop devices first: they must be detached first.
    return sorted(found, key=lambda d: -_depth(d, backing_of))


def _depth(dev: str, backing_of: dict[str, str]) -> int:
    depth = 0
    while backing_of.get(dev, "") in backing_of and depth < 16:
        dev, depth = backing_of[dev], depth + 1
    return depth


CACHE_TEMPORARY = re.compile(r"\.tmp-|\.staging-")


def cache_temporaries(cache_dir: str) -> list[str]:
    """Temporary files and staging directories in the cache directory."""
    if not os.path.isdir(cache_dir):
        return []
    return sorted(n for n in os.listdir(cache_dir) if CACHE_TEMPORARY.search(n))


def held_locks(cache_dir: str) -> list[str]:
    """Lock files in the cache directory that someone still holds."""
    held: list[str] = []
    if not os.path.isdir(cache_dir):
        return held
    for name in os.listdir(cache_dir):
        if not name.endswith(".lock"):
            continue
        fd = os.open(os.path.join(cache_dir, name), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(name)
        finally:
            os.close(fd)
    return held


def mount_points_left(tmpdir: str) -> list[str]:
    """Temporary mount point directories (mounts.temporary_mountpoint) left in ``tmpdir``.

    Each is the private (0700) directory holding the mount point ``root``.
    """
    return sorted(os.path.join(tmpdir, n) for n in os.listdir(tmpdir)
                  if n.startswith("ganeti-debootstrap."))


@dataclass
class Leftovers:
    """Everything a run could leak; empty lists everywhere means nothing."""

    mounts: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    mount_points: list[str] = field(default_factory=list)
    cache_temporaries: list[str] = field(default_factory=list)
    held_locks: list[str] = field(default_factory=list)
    processes: list[tuple[int, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(vars(self).values())

    def count(self) -> int:
        return sum(len(v) for v in vars(self).values())


def leftovers(run: Background, *, scope: str, tmpdir: str, cache_dir: str) -> Leftovers:
    """What ``run`` left: mounts and loop devices under ``scope`` (the test's
    directory), mount points in ``tmpdir``, cache temporaries and held locks,
    and processes carrying its tag."""
    return Leftovers(
        mounts=sorted(set(mounts_under(scope) + mounts_under(tmpdir))),
        loops=loops_backed_under(scope),
        mount_points=mount_points_left(tmpdir),
        cache_temporaries=cache_temporaries(cache_dir),
        held_locks=held_locks(cache_dir),
        processes=tagged_processes(run.tag))


def release_leftovers(left: Leftovers) -> None:
    """Release what a killed run left: its processes, mounts, loop devices.

    Only what :func:`leftovers` found for the run is touched, by name.
    """
    for pid, _ in left.processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Killed processes may still hold the mounts for a moment.
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid, _ in left.processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    for point in sorted(set(left.mounts), key=lambda p: p.count("/"), reverse=True):
        subprocess.run(["umount", point], check=False, capture_output=True)
    for dev in left.loops:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
    for point in left.mount_points:
        with contextlib.suppress(OSError):
            inner = os.path.join(point, "root")
            if os.path.isdir(inner) and not os.path.islink(inner):
                os.rmdir(inner)
            os.rmdir(point)


def _arguments(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- a proxy that never answers ------------------------------------------------

@contextlib.contextmanager
def stalling_proxy() -> Iterator[tuple[str, threading.Event]]:
    """An HTTP proxy on 127.0.0.1 that accepts connections and never answers.

    Yields its URL and an Event set once a client connected (the bootstrap
    is then waiting for a download). Loopback only.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    connected = threading.Event()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)
            connected.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connected
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def closed_port() -> str:
    """A proxy URL on loopback where nothing listens: connections fail at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def child_running(run: Background, name: str, timeout: float = 60.0,
                  argument: str = "") -> int:
    """Wait until a process called ``name`` (with ``argument`` among its
    arguments, if given) carrying the run's tag exists; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, comm in tagged_processes(run.tag):
            if comm == name and (not argument or argument in _arguments(pid)):
                return pid
        if run.proc.poll() is not None:
            raise AssertionError(f"the script exited before {name} ran:\n"
                                 + run.stderr[-3000:])
        time.sleep(0.01)
    raise AssertionError(f"{name} did not start within {timeout} s:\n" + run.stderr[-3000:])
