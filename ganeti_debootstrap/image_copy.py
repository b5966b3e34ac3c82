"""Putting a cache's filesystem image onto an instance's root partition.

What create does with an image cache_images.py made: copy only the image's
allocated extents onto the root partition (in the kernel: a reflink or
copy_file_range into a disk file, direct writes or sendfile onto a block
device), leaving out a journal that is about to be replaced; then grow the
filesystem to fill the partition and give it a fresh UUID and the journal
mkfs would give that size. XFS and Btrfs grow only while mounted: their
UUID is renewed here, on the unmounted copy, and create grows them once
the root is mounted (grow_mounted). It sits beside instance_disk.py, which decides
whether an image fits and calls it: this is disk code, not cache code.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import uuid
from collections.abc import Iterator

from . import filesystems, runner
from .cache_images import FsImage
from .errors import CacheError, DiskError

log = logging.getLogger(__name__)


def _data_extents(fd: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of a sparse file that hold data."""
    pos = 0
    while pos < length:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        yield start, end - start
        pos = end


def _without(extents: list[tuple[int, int]],
             skip: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """``extents`` (offset, length) with the byte ranges of ``skip`` cut out."""
    for cut_start, cut_length in skip:
        cut_end = cut_start + cut_length
        kept = []
        for start, length in extents:
            end = start + length
            if end <= cut_start or start >= cut_end:
                kept.append((start, length))
                continue
            if start < cut_start:
                kept.append((start, cut_start - start))
            if end > cut_end:
                kept.append((cut_end, end - cut_end))
        extents = kept
    return extents


# Where the superblock keeps a copy of the journal inode's block map
# (s_jnl_blocks, with s_jnl_backup_type 1 = "inode blocks"): offsets in the
# superblock, which starts 1024 bytes into the filesystem.
_SB_OFFSET = 1024
_SB_MAGIC = 0x38
_SB_LOG_BLOCK_SIZE = 0x18
_SB_FEATURE_COMPAT = 0x5C
_SB_JOURNAL_INUM = 0xE0
_SB_JNL_BACKUP_TYPE = 0xFD
_SB_JNL_BLOCKS = 0x10C
_EXT4_MAGIC = 0xEF53
_COMPAT_HAS_JOURNAL = 0x4
_EXTENT_MAGIC = 0xF30A
_EXT_INIT_MAX_LEN = 32768


def journal_extents(path: str) -> tuple[tuple[int, int], ...] | None:
    """Byte ranges (offset, length) of the internal journal of the ext3/4 image
    ``path``, from the superblock's backup of the journal inode's extent map.

    None when they cannot be known that way (no journal, no backup, not a
    flat extent map): the image is then copied whole. cache_images.build
    runs e2fsck, which keeps that backup equal to the journal inode.
    """
    with open(path, "rb") as f:
        f.seek(_SB_OFFSET)
        sb = f.read(1024)
    if len(sb) < 1024 or int.from_bytes(sb[_SB_MAGIC:_SB_MAGIC + 2], "little") != _EXT4_MAGIC:
        return None
    compat = int.from_bytes(sb[_SB_FEATURE_COMPAT:_SB_FEATURE_COMPAT + 4], "little")
    inum = int.from_bytes(sb[_SB_JOURNAL_INUM:_SB_JOURNAL_INUM + 4], "little")
    if not compat & _COMPAT_HAS_JOURNAL or inum != 8 or sb[_SB_JNL_BACKUP_TYPE] != 1:
        return None
    block_size = 1024 << int.from_bytes(sb[_SB_LOG_BLOCK_SIZE:_SB_LOG_BLOCK_SIZE + 4],
                                        "little")
    iblock = sb[_SB_JNL_BLOCKS:_SB_JNL_BLOCKS + 60]
    magic, entries, _, depth = (int.from_bytes(iblock[i:i + 2], "little")
                                for i in (0, 2, 4, 6))
    if magic != _EXTENT_MAGIC or depth != 0 or not 1 <= entries <= 4:
        return None
    ranges = []
    for i in range(entries):
        entry = iblock[12 + 12 * i:24 + 12 * i]
        length = int.from_bytes(entry[4:6], "little")
        if length > _EXT_INIT_MAX_LEN:
            length -= _EXT_INIT_MAX_LEN
        start = (int.from_bytes(entry[6:8], "little") << 32) | int.from_bytes(entry[8:12],
                                                                                "little")
        ranges.append((start * block_size, length * block_size))
    return tuple(ranges)


def journal_to_replace(image: FsImage, partition_bytes: int,
                       block_size: int = 4096) -> tuple[tuple[int, int], ...]:
    """The image's journal byte ranges when the grown filesystem gets a new one.

    The image's journal (sized for the small image) is replaced by the one
    mkfs would give the partition's size (grow_and_renew); its blocks are
    then free, and copying them (16 MiB of zeros) is a waste. Empty when
    the journal is kept or its place is not known: then it is copied.
    """
    if image.fstype not in JOURNALLED:
        return ()
    ranges = journal_extents(image.path)
    if not ranges:
        return ()
    have = sum(length for _, length in ranges) // block_size
    if have == default_journal_blocks(partition_bytes // block_size):
        return ()
    # Its first block, the journal's superblock, is copied: dumpe2fs and
    # tune2fs read it (a clean, empty journal) before it is removed.
    (first, length), rest = ranges[0], ranges[1:]
    if length > block_size:
        return ((first + block_size, length - block_size), *rest)
    return rest


def write(image: FsImage, dest: str, offset: int = 0,
          skip: tuple[tuple[int, int], ...] = ()) -> int:
    """Copy the image's data extents to ``dest`` at byte ``offset``; return bytes copied.

    ``skip``: byte ranges of the image not to copy (the journal, when
    grow_and_renew replaces it: see journal_to_replace). The holes of the
    image inside ranges that must read as zeroes (an XFS log: see
    zeroed_ranges) are zeroed on ``dest`` without writing data.

    ``dest`` is the disk file or a block device. Direct I/O is preferred: the
    data goes to the disk once, at its speed, and nothing is left dirty in
    the page cache for the loop device (or resize2fs's fsync) to write back
    later; measured here it makes a warm create about 45 ms faster. Where
    the destination refuses O_DIRECT (tmpfs, an unaligned offset), the copy
    stays in the kernel (copy_file_range, else sendfile). What lies between
    the extents keeps the disk's old contents: the image's metadata never
    relies on it (see cache_images._COMMON_OPTIONS).
    """
    copied = 0
    src = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = _open_direct(dest, offset)
        direct = out is not None
        if out is None:
            out = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
        try:
            extents = _without(list(_data_extents(src, image.size)), skip)
            if stat.S_ISREG(os.fstat(out).st_mode):
                # Shared, not copied, where the disk file's filesystem can.
                cloned, extents = _clone(src, out, extents, offset)
                copied += cloned
            if direct:
                copied += _copy_direct(src, out, extents, offset)
            else:
                in_kernel_copy = stat.S_ISREG(os.fstat(out).st_mode)
                for start, length in extents:
                    done, in_kernel_copy = _copy_range(src, out, start, length, offset,
                                                       in_kernel_copy)
                    copied += done
            for start, length in _holes(src, zeroed_ranges(image)):
                _zero(out, offset + start, length)
            # The instance disk holds the system when create returns.
            os.fsync(out)
        finally:
            os.close(out)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = (f"The storage holding it is full: a disk file is sparse and "
                   f"needs room as it fills (df {os.path.dirname(dest)}). Free "
                   f"space there, then reinstall.")
        else:
            fix = ("Check the disk and the image (remove the image to have it "
                   "made again), or set CACHE_IMAGE=no to unpack the archive "
                   "instead.")
        raise DiskError(
            f"Copying the cache's filesystem image {image.path} onto the instance "
            f"disk {dest} failed: {exc.strerror}. {fix}") from None
    finally:
        os.close(src)
    return copied


# ioctl FICLONERANGE = _IOW(0x94, 13, struct file_clone_range): the
# destination range comes to share the source's blocks (copy on write for
# later writes to either file). XFS with reflink and Btrfs do it, within one
# filesystem only.
_FICLONERANGE = 0x4020940D
_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
# Why a clone cannot be done between these two files: another filesystem
# (EXDEV), no sharing there (EOPNOTSUPP, ENOTTY, ENOSYS), an unaligned range
# (EINVAL). The extents are then copied.
_NO_CLONE = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL)


def _clone(src: int, out: int, extents: list[tuple[int, int]],
           offset: int) -> tuple[int, list[tuple[int, int]]]:
    """Clone ``extents`` of ``src`` into ``out`` at ``offset`` + their place.

    Returns the bytes cloned and the extents left to copy (all of them when
    the first clone is refused; the rest when a later one is).
    """
    cloned = 0
    for i, (start, length) in enumerate(extents):
        arg = _CLONE_RANGE.pack(src, start, length, offset + start)
        try:
            fcntl.ioctl(out, _FICLONERANGE, arg)
        except OSError as exc:
            if exc.errno not in _NO_CLONE:
                raise
            if i == 0:
                log.debug("The instance disk's filesystem cannot share the image's "
                          "blocks (%s); copying them", exc.strerror)
            return cloned, extents[i:]
        cloned += length
    if cloned:
        log.info("Shared the image's %.0f MiB with the disk file (reflink)", cloned / 2**20)
    return cloned, []


# Direct I/O needs offsets, lengths and memory aligned to the device's
# logical block size; 4096 covers 512-byte and 4Kn disks. The image's data
# extents are whole 4 KiB filesystem blocks.
_DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 4 << 20


def _open_direct(dest: str, offset: int) -> int | None:
    """``dest`` opened for direct I/O, or None where that cannot work."""
    if offset % _DIRECT_ALIGN:
        return None
    try:
        return os.open(dest, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this filesystem
            raise
        return None


def _copy_direct(src: int, out: int, extents: list[tuple[int, int]], offset: int) -> int:
    """Copy extents through one page-aligned buffer with direct writes."""
    copied = 0
    with mmap.mmap(-1, _DIRECT_CHUNK) as buf:
        view = memoryview(buf)
        try:
            for start, length in extents:
                if start % _DIRECT_ALIGN or length % _DIRECT_ALIGN:
                    raise CacheError(f"The filesystem image {_file_name(src)} has an "
                                     f"extent not on a 4 KiB boundary; remove it so "
                                     f"that it is made again.")
                done = 0
                while done < length:
                    n = os.preadv(src, [view[:min(_DIRECT_CHUNK, length - done)]],
                                  start + done)
                    if n == 0:
                        raise CacheError(f"The filesystem image {_file_name(src)} "
                                         f"ended early; remove it so that it is "
                                         f"made again.")
                    written = os.pwritev(out, [view[:n]], offset + start + done)
                    done += written
                copied += done
        finally:
            view.release()
    return copied


# copy_file_range cannot copy between some filesystems: EXDEV between
# filesystems of different types (Linux 5.19 and later; the disk file's
# filesystem is often not the cache's), ENOSYS, EOPNOTSUPP or EINVAL where
# a kernel or filesystem lacks it. sendfile copies in the kernel too.
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _copy_range(src: int, out: int, start: int, length: int, offset: int,
                in_kernel_copy: bool) -> tuple[int, bool]:
    """Copy one extent; returns the bytes copied and whether copy_file_range
    may still be used (False once it proved impossible for this pair)."""
    done = 0
    while done < length:
        n = 0
        if in_kernel_copy:
            try:
                n = os.copy_file_range(src, out, length - done, start + done,
                                       offset + start + done)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                log.debug("copy_file_range onto the disk failed (%s); using sendfile",
                          exc.strerror)
                in_kernel_copy = False
        if not in_kernel_copy:
            os.lseek(out, offset + start + done, os.SEEK_SET)
            n = os.sendfile(out, src, start + done, length - done)
        if n == 0:
            raise CacheError(f"Copying the filesystem image {_file_name(src)} stopped "
                             f"early; is the instance disk smaller than it claims?")
        done += n
    return done, in_kernel_copy


def _file_name(fd: int) -> str:
    """What an open file descriptor names, for messages."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def grow_and_renew(root_dev: str, fstype: str, journal_copied: bool = True) -> str:
    """Grow the copied filesystem to fill ``root_dev`` and give it a new UUID.

    ``journal_copied`` False: write() left the journal's blocks out, so it
    is replaced whatever its size. Returns the new UUID. Every instance
    made from one image must not share the filesystem UUID (fstab, the
    boot loader and udev find it by UUID). XFS and Btrfs get their UUID
    only: they grow once mounted (grow_mounted).
    """
    # Chosen here rather than "random", so that no blkid run is needed to
    # learn it (fstab and the boot loader need it next).
    new_uuid = str(uuid.uuid4())
    if fstype == "xfs":
        # On a v5 (CRC) XFS this writes the superblocks only: the metadata
        # keeps the image's UUID as its meta_uuid (Linux 4.3, GRUB 2.04).
        # xfs_admin refuses a dirty log; the image's is clean.
        runner.run(["xfs_admin", "-U", new_uuid, root_dev])
        return new_uuid
    if fstype == "btrfs":
        # -M changes the fsid in the superblocks only (0.02 s), keeping the
        # image's as metadata_uuid (Linux 5.0; GRUB 2.06 and 2.12 read it
        # and find the root by the new fsid). -U rewrote every tree block
        # instead: 0.25 s for a 200 MiB system, about a third of a warm
        # create.
        runner.run(["btrfstune", "-M", new_uuid, root_dev])
        return new_uuid
    # -f: the image was checked when it was made; resize2fs would otherwise
    # insist on a fresh e2fsck of the copy first.
    runner.run(["resize2fs", "-f", root_dev])
    argv = ["tune2fs", "-U", new_uuid]
    if fstype in JOURNALLED:
        argv += _journal_resize_options(root_dev, force=not journal_copied)
    runner.run([*argv, root_dev])
    return new_uuid


def grow_mounted(mount_point: str, fstype: str) -> None:
    """Grow a copied XFS or Btrfs root, mounted at ``mount_point``, to its device.

    Both grow only while mounted (ext is grown unmounted, by grow_and_renew).
    """
    if fstype == "xfs":
        runner.run(["xfs_growfs", "-d", mount_point])
    elif fstype == "btrfs":
        runner.run(["btrfs", "filesystem", "resize", "max", mount_point])


# The filesystem types whose images have a journal.
JOURNALLED = ("ext3", "ext4")


def default_journal_blocks(blocks: int) -> int:
    """The journal mke2fs gives a filesystem of ``blocks`` blocks, in blocks.

    e2fsprogs' own table (ext2fs_default_journal_size; a test checks it
    against the node's mke2fs): 4 MiB of 4 KiB blocks up to 128 MiB,
    doubling with the filesystem up to 1 GiB for 128 GiB and more.
    """
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192),
                        (4096 * 1024, 16384), (8192 * 1024, 32768),
                        (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return size
    return 262144


def _journal_resize_options(root_dev: str, force: bool = False) -> list[str]:
    """tune2fs options giving the grown filesystem the journal mkfs would.

    The image's journal was sized for the small image (16 MiB); a 200 GiB
    root would keep it, where mkfs gives 1 GiB and the shell edition's
    instances had that. Removing the journal and adding one of the right
    size costs milliseconds: tune2fs zeroes it with the disk's write-zeroes
    operation, and places it mid-disk as mke2fs does.
    """
    info = filesystems.superblock(root_dev)
    blocks = filesystems.superblock_number(info, root_dev, "Block count")
    block_size = filesystems.superblock_number(info, root_dev, "Block size")
    have = int(info.get("Total journal blocks", "0"))
    want = default_journal_blocks(blocks)
    if have == want and not force:
        return []
    return ["-O", "^has_journal", "-J", f"size={want * block_size // 2**20}"]


# The XFS superblock (big-endian, at the start of the filesystem): where
# its log lies. Offsets of struct xfs_dsb: magic, blocksize, logstart,
# agblocks, logblocks (and agblklog, a byte at 124).
_XFS_MAGIC = b"XFSB"
_XFS_SB = struct.Struct(">4sI8x16x16xQ24x4xI4x4xI")
_XFS_AGBLKLOG = 124


def xfs_log_range(path: str) -> tuple[int, int] | None:
    """Byte range (offset, length) of the internal log of the XFS image ``path``."""
    with open(path, "rb") as f:
        sb = f.read(512)
    if len(sb) < 512 or sb[:4] != _XFS_MAGIC:
        return None
    _, block_size, logstart, agblocks, logblocks = _XFS_SB.unpack_from(sb)
    agblklog = sb[_XFS_AGBLKLOG]
    agno, agbno = logstart >> agblklog, logstart & ((1 << agblklog) - 1)
    return (agno * agblocks + agbno) * block_size, logblocks * block_size


def zeroed_ranges(image: FsImage) -> tuple[tuple[int, int], ...]:
    """Ranges of the image that must read as zeroes on the disk where it has holes.

    XFS's log: log recovery, and xfs_admin before it sets the UUID, find
    the log's head by the cycle numbers of its blocks, so blocks mkfs left
    unwritten must not keep the disk's old bytes. Zeroing them (a
    FALLOC_FL_ZERO_RANGE on a disk file, BLKZEROOUT on a device: no data
    written where the storage can) is cheaper than copying 64 MiB of zeroes.
    """
    if image.fstype != "xfs":
        return ()
    log_range = xfs_log_range(image.path)
    return (log_range,) if log_range else ()


def _holes(fd: int, ranges: tuple[tuple[int, int], ...]) -> Iterator[tuple[int, int]]:
    """(offset, length) of the holes of file ``fd`` inside ``ranges``."""
    for start, length in ranges:
        end, pos = start + length, start
        while pos < end:
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:  # ENXIO: past the end of the file
                return
            if hole >= end:
                break
            try:
                data = min(os.lseek(fd, hole, os.SEEK_DATA), end)
            except OSError:  # ENXIO: a hole to the end of the file
                data = end
            yield hole, data - hole
            pos = data


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _zero(out: int, start: int, length: int) -> None:
    """Make ``length`` bytes of ``out`` at ``start`` read as zeroes."""
    if stat.S_ISBLK(os.fstat(out).st_mode):
        fcntl.ioctl(out, _BLKZEROOUT, struct.pack("=QQ", start, length))
        return
    if _libc.fallocate(out, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, start, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    zeros = bytes(min(length, 1 << 20))
    done = 0
    while done < length:
        done += os.pwrite(out, zeros[:min(len(zeros), length - done)], start + done)


def fits(image: FsImage, partition_bytes: int) -> bool:
    """Whether the image fits the partition (else the archive is unpacked)."""
    return image.size <= partition_bytes
