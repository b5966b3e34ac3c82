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


# dump's records keep dump's default size (10 KiB). Larger ones (-b 64)
# dump faster, but restore 0.4b50 (trixie) reading them from a pipe stops
# with "Tape blocksize is too large, use '-b 64'": the shell edition's
# import, and ours on such a node, could not read the backup.


def check_consistent(root_dev: str, path: str) -> dict[str, str]:
    """Refuse a filesystem that is in use or was not cleanly unmounted.

    dump reads the filesystem's blocks directly and does not replay the
    journal; a filesystem with a pending journal (``needs_recovery``) is
    mounted by the running instance (or crashed), and its dump would be
    inconsistent. Ganeti stops or snapshots the instance for exports.
    Returns the superblock's fields (``dumpe2fs -h``) for estimate_bytes.
    """
    header = runner.output(["dumpe2fs", "-h", root_dev])
    state = filesystems.parse_ext_state(header)
    if state.needs_recovery or not state.clean:
        raise DiskError(
            f"The root filesystem on {path} is in use or was not cleanly "
            f"unmounted (state: {state.describe()}), so a dump of it would not "
            f"be consistent. Shut the instance down for the export (gnt-backup "
            f"export without --noshutdown), or run e2fsck on the stopped "
            f"instance's filesystem if it crashed.")
    return filesystems.superblock_fields(header)


# dump(8) writes 1 KiB records: one header per inode, then its data blocks
# (holes left out), with a continuation header for every 512 records, and
# two maps of one bit per inode at the start.
_TP_BSIZE = 1024


def _backup_groups(groups: int, sparse: bool) -> int:
    """Block groups holding a superblock and descriptor copy (0, 1, powers of 3, 5, 7)."""
    if not sparse:
        return groups
    found = {0, 1} & set(range(groups))
    for base in (3, 5, 7):
        n = base
        while n < groups:
            found.add(n)
            n *= base
    return len(found)


def overhead_blocks(fields: dict[str, str]) -> int:
    """Blocks of metadata (inode tables, bitmaps, descriptors, journal).

    The superblock's own count (``Overhead clusters``, kept by e2fsprogs
    since 1.47) when there is one, else computed from the layout.
    """
    stored = int(fields.get("Overhead clusters", "0") or 0)
    if stored:
        return stored
    blocks = int(fields["Block count"])
    block_size = int(fields["Block size"])
    per_group = int(fields["Blocks per group"])
    first = int(fields.get("First block", "0"))
    groups = -(-(blocks - first) // per_group)
    features = fields.get("Filesystem features", "").split()
    desc_size = int(fields.get("Group descriptor size", "64" if "64bit" in features else "32"))
    gdt = -(-groups * desc_size // block_size)
    reserved_gdt = int(fields.get("Reserved GDT blocks", "0"))
    backups = _backup_groups(groups, "sparse_super" in features)
    inode_tables = -(-int(fields["Inode count"]) * int(fields.get("Inode size", "128"))
                     // block_size)
    journal = int(fields.get("Total journal blocks", "0")) \
        if "has_journal" in features and "Journal device" not in fields else 0
    return inode_tables + 2 * groups + backups * (1 + gdt + reserved_gdt) + journal + first


def estimate_bytes(fields: dict[str, str]) -> int:
    """The expected size of dump's stream, from the superblock alone.

    Data: the blocks in use less the metadata; one 1 KiB header per inode in
    use; the two inode maps. dump's own estimate (``dump -S``) reads the
    whole inode table and every directory first, a second pass over the
    filesystem; this one costs nothing more than the superblock read for
    the consistency check and is within about 1 % of the stream (measured
    on instances of 2 to 20 GiB, 210 MiB to 1 GiB of data: +0.2 to +1.0 %;
    the unit test keeps those numbers).
    """
    block_size = int(fields["Block size"])
    used_blocks = (int(fields["Block count"]) - int(fields["Free blocks"])
                   - overhead_blocks(fields))
    inodes = int(fields["Inode count"])
    used_inodes = inodes - int(fields["Free inodes"])
    maps = 2 * -(-inodes // (8 * _TP_BSIZE)) * _TP_BSIZE
    return max(used_blocks, 0) * block_size + used_inodes * _TP_BSIZE + maps


def expected_size(fields: dict[str, str], root_dev: str) -> int:
    """estimate_bytes, or dump's own estimate where the superblock does not add up.

    The superblock is the tenant's: it may be missing a field, hold a
    malformed number or give a negative size. Then dump -S, the second pass
    over the filesystem, answers instead of a traceback.
    """
    try:
        size = estimate_bytes(fields)
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        logger.info("The superblock gives no size estimate (%s: %s); asking dump",
                    type(exc).__name__, exc)
        size = -1
    if size > 0:
        return size
    out = runner.output(["dump", "-0", "-S", root_dev])
    try:
        return int(out.split()[-1])
    except (IndexError, ValueError):
        raise DiskError(f"dump -S printed no size for {root_dev} ({out.strip()[:80]!r}): "
                        f"the filesystem is damaged. Run e2fsck on the stopped "
                        f"instance's disk, then export again.") from None


_BY_HAND = ("Ganeti passes an open descriptor; unset EXP_SIZE_FD when running "
            "export by hand.")


def check_size_fd(fd: int) -> None:
    """Refuse an EXP_SIZE_FD that is not open for writing, before the disk is opened."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise DiskError(f"EXP_SIZE_FD={fd} is not an open file descriptor "
                        f"({exc.strerror}). {_BY_HAND}") from None
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
                        f"{exc.strerror}. {_BY_HAND}") from None


def run(request: Request, paths: Paths) -> None:
    """Dump the root filesystem of the exported disk to stdout."""
    if request.exp_size_fd is not None:
        check_size_fd(request.exp_size_fd)
    with contextlib.ExitStack() as stack:
        with log.phase("open disk"):
            _, root_dev, fstype = instance_disk.open_root(stack, request.disk_path,
                                                          read_only=True)
            if fstype not in filesystems.EXT_TYPES:
                # dump(8) reads ext filesystems only.
                raise DiskError(f"The instance's root on {request.disk_path} is "
                                f"{fstype}: export writes dump(8) streams of ext2/3/4 "
                                f"roots only. Back it up from inside the instance.")
            fields = check_consistent(root_dev, request.disk_path)
        if request.exp_size_fd is not None:
            size = expected_size(fields, root_dev)
            logger.debug("expected stream size: %d bytes", size)
            write_expected_size(request.exp_size_fd, size)
        with log.phase("dump"):
            sys.stdout.flush()
            runner.run(["dump", "-0", "-q", "-f", "-", root_dev],
                       stdout=sys.stdout.fileno(),
                       hint="The backup stream is incomplete; do not use it.")
