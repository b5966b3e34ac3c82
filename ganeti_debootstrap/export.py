"""``export``: a level-0 dump(8) of the root filesystem to stdout.

This is the format the shell edition wrote and sites hold years of backups
in; import reads it back with restore(8). Standard output IS the backup:
nothing but dump's stream may reach it, so every log line and every other
command's output goes to stderr (runner.py makes sure of that).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys

from . import filesystems, instance_disk, log, runner
from .environment import Request
from .errors import DiskError
from .paths import Paths

logger = logging.getLogger(__name__)


def check_consistent(root_dev: str, path: str) -> None:
    """Refuse a filesystem that is in use or was not cleanly unmounted.

    dump reads the filesystem's blocks directly and does not replay the
    journal; a filesystem with a pending journal (``needs_recovery``) is
    mounted by the running instance (or crashed), and its dump would be
    inconsistent. Ganeti stops or snapshots the instance for exports.
    """
    state = filesystems.ext_state(root_dev)
    if state.needs_recovery or not state.clean:
        raise DiskError(
            f"The root filesystem on {path} is in use or was not cleanly "
            f"unmounted (state: {state.describe()}), so a dump of it would not "
            f"be consistent. Shut the instance down for the export (gnt-backup "
            f"export without --noshutdown), or run e2fsck on the stopped "
            f"instance's filesystem if it crashed.")


def estimate_bytes(root_dev: str) -> int:
    """The expected size of dump's stream, from dump's own estimate (-S)."""
    out = runner.output(["dump", "-0", "-S", root_dev])
    return int(out.split()[-1])


def check_size_fd(fd: int) -> None:
    """Refuse an EXP_SIZE_FD that is not open for writing, before the disk is opened."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise DiskError(f"EXP_SIZE_FD={fd} is not an open file descriptor "
                        f"({exc.strerror}). Ganeti passes an open descriptor; "
                        f"unset EXP_SIZE_FD when running export by hand.") from None
    if mode not in (os.O_WRONLY, os.O_RDWR):
        raise DiskError(f"EXP_SIZE_FD={fd} is open for reading only, so the "
                        f"expected size cannot be written to it. Pass a "
                        f"descriptor open for writing, or unset EXP_SIZE_FD.")


def write_expected_size(fd: int, size: int) -> None:
    """Tell Ganeti the stream size for its progress display (EXP_SIZE_FD)."""
    data = f"{size}\n".encode()
    try:
        os.write(fd, data)
    except OSError as exc:
        raise DiskError(f"Cannot write the expected size to EXP_SIZE_FD={fd}: "
                        f"{exc.strerror}. Ganeti passes an open descriptor; "
                        f"unset EXP_SIZE_FD when running export by hand.") from None


def run(request: Request, paths: Paths) -> None:
    """Dump the root filesystem of the exported disk to stdout."""
    if request.exp_size_fd is not None:
        check_size_fd(request.exp_size_fd)
    with contextlib.ExitStack() as stack:
        with log.phase("open disk"):
            _, root_dev, _ = instance_disk.open_root(stack, request.disk_path,
                                                     read_only=True)
            check_consistent(root_dev, request.disk_path)
        if request.exp_size_fd is not None:
            size = estimate_bytes(root_dev)
            logger.debug("expected stream size: %d bytes", size)
            write_expected_size(request.exp_size_fd, size)
        with log.phase("dump"):
            sys.stdout.flush()
            runner.run(["dump", "-0", "-q", "-f", "-", root_dev],
                       stdout=sys.stdout.fileno(),
                       hint="The backup stream is incomplete; do not use it.")
