"""The one place where external commands run.

Every command is an argv list (never a shell string), runs with a fixed
locale and stdin from /dev/null unless it is fed the data stream, and sends
its standard output to our standard error: export's standard output is the
backup itself, and one stray line from a child would corrupt it.

Tests replace the runner with a recording fake through :func:`replaced`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from .errors import CommandError, MissingProgramError

log = logging.getLogger(__name__)

# Which Debian package provides each program we call, so that a missing one
# is a one-sentence error an administrator can act on.
PACKAGES: Mapping[str, str] = {
    "blkid": "util-linux", "blockdev": "util-linux", "losetup": "mount",
    "mount": "mount", "umount": "mount", "partx": "util-linux",
    "sfdisk": "fdisk", "wipefs": "util-linux", "findmnt": "util-linux",
    "mkswap": "util-linux", "kpartx": "kpartx", "dmsetup": "dmsetup",
    "mke2fs": "e2fsprogs", "mkfs.ext2": "e2fsprogs", "mkfs.ext3": "e2fsprogs",
    "mkfs.ext4": "e2fsprogs", "e2fsck": "e2fsprogs", "tune2fs": "e2fsprogs",
    "resize2fs": "e2fsprogs", "dumpe2fs": "e2fsprogs", "e2image": "e2fsprogs",
    "mkfs.xfs": "xfsprogs", "xfs_admin": "xfsprogs", "xfs_growfs": "xfsprogs",
    "xfs_repair": "xfsprogs", "xfs_db": "xfsprogs", "mkfs.btrfs": "btrfs-progs",
    "btrfstune": "btrfs-progs", "btrfs": "btrfs-progs",
    "dump": "dump", "restore": "dump", "debootstrap": "debootstrap",
    "mmdebstrap": "mmdebstrap", "tar": "tar", "chroot": "coreutils",
    "run-parts": "debianutils", "udevadm": "udev", "fuser": "psmisc",
    "ssh-keygen": "openssh-client", "dpkg": "dpkg",
    "mkfs.vfat": "dosfstools", "mmd": "mtools", "mcopy": "mtools",
    "grub-mkimage": "grub-common", "env": "coreutils",
}

# Output kept from a failed command for its error message: Ganeti shows the
# last 20 lines of a failed script's log, so the tail must fit in that.
STDERR_TAIL_LINES = 12

# How long a stopped command gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS = 5.0

# A finished command's stderr pipe reaches end-of-file at once, unless
# processes it left running in the background (a hook's daemon, even one
# that escaped its process group with setsid) inherited it. Waiting for
# them would hang the script for as long as they run: after this long the
# rest of their output is still forwarded, but nobody waits for it. Dealing
# with such processes is the caller's business (hooks.leftovers_stopped).
OUTPUT_DRAIN_SECONDS = 2.0


@dataclass(frozen=True)
class Result:
    """What a finished command left: its status and captured output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes


class Runner(Protocol):
    """Anything that can run a command the way :func:`run` promises."""

    def __call__(self, argv: Sequence[str], *, stdin: IO[bytes] | bytes | None,
                 stdout: IO[bytes] | int | None, capture: bool, check: bool,
                 env: Mapping[str, str] | None, cwd: str | None,
                 timeout: float | None, hint: str) -> Result: ...


def base_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment children get: ours with a fixed locale, plus extras."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        env.update(extra)
    return env


def _forward_stderr(pipe: IO[bytes], tail: collections.deque[str]) -> None:
    """Copy a child's stderr to ours line by line, keeping the last lines."""
    err = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    for raw in iter(pipe.readline, b""):
        if err is not None:
            err.write(raw)
            err.flush()
        tail.append(raw.decode("utf-8", "replace").rstrip("\n"))
    pipe.close()


def real_runner(argv: Sequence[str], *, stdin: IO[bytes] | bytes | None,
                stdout: IO[bytes] | int | None, capture: bool, check: bool,
                env: Mapping[str, str] | None, cwd: str | None,
                timeout: float | None, hint: str) -> Result:
    """Run argv for real; see :func:`run` for the meaning of the options."""
    argv = [os.fspath(a) for a in argv]
    log.debug("running: %s", shlex.join(argv))
    data: bytes | None = None
    stdin_arg: IO[bytes] | int
    if isinstance(stdin, bytes):
        data, stdin_arg = stdin, subprocess.PIPE
    elif stdin is None:
        stdin_arg = subprocess.DEVNULL
    else:
        stdin_arg = stdin
    if capture:
        stdout_arg: IO[bytes] | int = subprocess.PIPE
    elif stdout is None:
        stdout_arg = sys.stderr.fileno()
    else:
        stdout_arg = stdout
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    try:
        # Its own process group, so that a timeout or a signal stops the
        # command together with whatever it started (a hook's children).
        proc = subprocess.Popen(argv, stdin=stdin_arg, stdout=stdout_arg,
                                stderr=subprocess.PIPE, cwd=cwd,
                                env=base_environment(env), process_group=0)
    except FileNotFoundError:
        if cwd is not None and not os.path.isdir(cwd):
            raise
        name = os.path.basename(argv[0])
        raise MissingProgramError(argv[0], PACKAGES.get(name)) from None
    # The thread owns stderr; communicate() then deals with stdin and stdout.
    err_pipe, proc.stderr = proc.stderr, None
    assert err_pipe is not None
    forwarder = threading.Thread(target=_forward_stderr, args=(err_pipe, tail),
                                 daemon=True)
    forwarder.start()
    try:
        out, _ = proc.communicate(data, timeout=timeout)
    except BaseException:
        # Interrupted (a signal) or timed out: never leave the child, or
        # anything it started, behind.
        _stop_group(proc)
        forwarder.join(timeout=5)
        raise
    forwarder.join(timeout=OUTPUT_DRAIN_SECONDS)
    if forwarder.is_alive():
        log.warning("%s exited, but processes it started keep its output open; "
                    "not waiting for them", argv[0])
    result = Result(tuple(argv), proc.returncode, out or b"")
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, "\n".join(tail), hint)
    return result


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child's process group, then kill what is left of it."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            # The leader is gone; members it left may linger: kill them too.
            os.killpg(proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        break
    proc.wait()


_current: Runner = real_runner


def run(argv: Sequence[str | os.PathLike[str]], *, stdin: IO[bytes] | bytes | None = None,
        stdout: IO[bytes] | int | None = None, capture: bool = False,
        check: bool = True, env: Mapping[str, str] | None = None,
        cwd: str | None = None, timeout: float | None = None,
        hint: str = "") -> Result:
    """Run a command and wait for it.

    stdin: None for /dev/null, bytes to feed, or a file to read from.
    stdout: where the child's output goes unless ``capture`` is set; by
    default our stderr. ``check`` raises CommandError (with the stderr tail
    and ``hint``) on a non-zero exit. ``env`` adds to the environment.
    """
    return _current([os.fspath(a) for a in argv], stdin=stdin, stdout=stdout,
                    capture=capture, check=check, env=env, cwd=cwd,
                    timeout=timeout, hint=hint)


def output(argv: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """Run a command and return its standard output as text, stripped."""
    res = run(argv, capture=True, **kwargs)  # type: ignore[arg-type]
    return res.stdout.decode("utf-8", "replace").strip()


@contextlib.contextmanager
def replaced(fake: Runner) -> Iterator[Runner]:
    """Use ``fake`` instead of the real runner inside the block (for tests)."""
    global _current
    saved, _current = _current, fake
    try:
        yield fake
    finally:
        _current = saved
