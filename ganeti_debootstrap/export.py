"""``export``: one disk of the instance as a backup stream on stdout.

Ganeti runs export once per disk (EXPORT_INDEX). What the stream holds
depends on what the disk holds (backupstream.py tells the kinds apart):

- an ext2/3/4 filesystem (disk 0's root, or a data disk's): a level-0
  dump(8), the format the shell edition wrote and sites hold years of
  backups in; import reads it back with restore(8);
- another filesystem (XFS, Btrfs): a GNU tar archive of its tree, mounted
  read-only, with owners, modes, links, device nodes, ACLs, extended
  attributes and capabilities;
- a data disk with no filesystem we know: its bytes, holes left out
  (backupstream's raw format).

Standard output IS the backup: nothing but the stream may reach it, so
every log line and every other command's output goes to stderr (runner.py
makes sure of that).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from . import backupstream, blockdev, filesystems, instance_disk, log, mounts, runner
from .backupstream import Kind
from .environment import Request
from .errors import CommandError, DiskError
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
            f"The filesystem on {path} is in use or was not cleanly "
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


# The filesystems exported as dump streams; every other filesystem a root
# or data disk holds is exported as tar.
DUMP_TYPES = ("ext2", "ext3", "ext4")
# The filesystems a data disk is exported from as tar: what import can make
# and mount. Any other content of a data disk is exported raw.
TAR_TYPES = ("xfs", "btrfs")

# Mounting the tenant's filesystem to read it: read-only (and on a read-only
# device: a filesystem whose log needs replaying is refused, not replayed),
# nothing on it runs or opens a device of the node.
# (XFS gets nouuid from mounts.instance_root, as every instance root does.)
READ_ONLY_OPTIONS = ("ro", "nosuid", "nodev", "noexec")


def stream_kind(fstype: str, index: int) -> Kind:
    """The kind of stream a disk holding ``fstype`` ("" for none) exports as."""
    if fstype in DUMP_TYPES:
        return "dump"
    if fstype in TAR_TYPES or (index == 0 and fstype in filesystems.ROOT_TYPES):
        return "tar"
    return "raw"


def tar_command(mount_point: str) -> list[str]:
    """GNU tar writing the tree below ``mount_point`` to stdout."""
    return ["tar", *backupstream.TAR_OPTIONS, "--sparse", "-C", mount_point, "-cf", "-", "."]


# What GNU tar writes for each entry of a POSIX archive: the pax extended
# header (its own header block, one block of mtime, atime and ctime), then
# the ustar header block; more for ACLs and xattrs.
_TAR_BLOCK = 512
_TAR_ENTRY = 3 * _TAR_BLOCK
_TAR_RECORD = 20 * _TAR_BLOCK


def _tree_entries(top: str) -> Iterator[os.stat_result]:
    """lstat of every entry below ``top`` (itself included), no link followed."""
    stack = [top]
    yield os.lstat(top)
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                yield st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)


def tar_size_estimate(top: str) -> int:
    """The size of tar_command's archive of ``top``, from one pass over its inodes.

    Per entry its headers, per file (the first of its hard links) the data
    blocks it has: --sparse stores the data and leaves the holes out.
    """
    total = 0
    seen: set[int] = set()
    sparse_files = 0
    for st in _tree_entries(top):
        total += _TAR_ENTRY
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        data = min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size
        total += -(-data // _TAR_BLOCK) * _TAR_BLOCK
        if st.st_size > st.st_blocks * 512:
            sparse_files += 1  # the sparse map in the extended header
    total += sparse_files * _TAR_BLOCK + 2 * _TAR_BLOCK
    return -(-total // _TAR_RECORD) * _TAR_RECORD


@dataclass
class Source:
    """What export found on the disk: the stream kind and where to read it."""

    kind: Kind
    device: str  # the filesystem's device (dump, tar) or the disk itself (raw)
    fstype: str
    fields: dict[str, str]  # dump: the superblock's fields


def open_source(stack: contextlib.ExitStack, request: Request) -> Source:
    """Attach the exported disk read-only and tell what it holds."""
    path = request.disk_path
    if request.disk_index == 0:
        _, device, fstype = instance_disk.open_root(stack, path, read_only=True)
        if stream_kind(fstype, 0) == "tar" and device == path:
            # The disk itself, writable: mounted through a read-only loop
            # device, so that a log needing replay is refused, not replayed.
            device = stack.enter_context(blockdev.loop_device(path, read_only=True))
    else:
        # A data disk: a whole-disk filesystem, or anything else (raw).
        blockdev.check_disk_usable(path)
        device = stack.enter_context(blockdev.loop_device(path, read_only=True))
        fstype = filesystems.fs_type(device)
    kind = stream_kind(fstype, request.disk_index)
    logger.info("Disk %d (%s) holds %s: exported as a %s stream", request.disk_index,
                path, f"a {fstype} filesystem" if fstype else "no filesystem", kind)
    fields: dict[str, str] = {}
    if kind == "dump":
        fields = check_consistent(device, path)
    return Source(kind, path if kind == "raw" else device, fstype, fields)


def mounted_read_only(stack: contextlib.ExitStack, source: Source, path: str) -> str:
    """Mount the tar source's filesystem read-only on a private mount point."""
    try:
        return stack.enter_context(mounts.instance_root(
            source.device, source.fstype, path,
            READ_ONLY_OPTIONS))
    except CommandError as exc:
        raise DiskError(
            f"The {source.fstype} filesystem on {path} could not be mounted read-only "
            f"to export it: it is in use, was not cleanly unmounted (its log needs "
            f"replaying) or is damaged.\n{exc.stderr_tail.strip()}\nShut the "
            f"instance down for the export (gnt-backup export without "
            f"--noshutdown), or repair the stopped instance's filesystem "
            f"(xfs_repair, btrfs check) if it crashed.") from None


def export_raw(source: Source, size_fd: int | None) -> None:
    """The disk's bytes, holes left out, in backupstream's raw format."""
    with open(source.device, "rb") as disk:
        fd = disk.fileno()
        size = os.lseek(fd, 0, os.SEEK_END)
        extents = list(backupstream.data_extents(fd, size))
        if size_fd is not None:
            write_expected_size(size_fd, backupstream.raw_stream_size(extents))
        with log.phase("copy raw disk"):
            sys.stdout.flush()
            written = backupstream.write_raw(fd, size, extents, sys.stdout.fileno())
    logger.info("wrote %d bytes of raw disk image (%d bytes of disk)", written, size)


def run(request: Request, paths: Paths) -> None:
    """Write the exported disk to stdout as a backup stream."""
    if request.exp_size_fd is not None:
        check_size_fd(request.exp_size_fd)
    with contextlib.ExitStack() as stack:
        with log.phase("open disk"):
            source = open_source(stack, request)
        if source.kind == "raw":
            export_raw(source, request.exp_size_fd)
            return
        if source.kind == "tar":
            with log.phase("mount"):
                top = mounted_read_only(stack, source, request.disk_path)
            if request.exp_size_fd is not None:
                size = tar_size_estimate(top)
                logger.debug("expected stream size: %d bytes", size)
                write_expected_size(request.exp_size_fd, size)
            with log.phase("tar"):
                sys.stdout.flush()
                runner.run(tar_command(top), stdout=sys.stdout.fileno(),
                           hint="The backup stream is incomplete; do not use it.")
            return
        root_dev = source.device
        if request.exp_size_fd is not None:
            size = expected_size(source.fields, root_dev)
            logger.debug("expected stream size: %d bytes", size)
            write_expected_size(request.exp_size_fd, size)
        with log.phase("dump"):
            sys.stdout.flush()
            runner.run(["dump", "-0", "-q", "-f", "-", root_dev],
                       stdout=sys.stdout.fileno(),
                       hint="The backup stream is incomplete; do not use it.")
