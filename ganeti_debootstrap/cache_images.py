"""The fast form of a cache entry: a ready-made, minimal filesystem image.

Unpacking the tar archive costs a filesystem's worth of small writes and a
long writeback at unmount. Instead, each archive gets (on first use, per
filesystem type) an image ``<stem>.<fstype>.img`` beside it: the tree made
into a filesystem by ``mke2fs -d`` and shrunk to its minimum (ext), or the
archive unpacked into a fresh XFS or Btrfs mounted from the image (mkfs.xfs
cannot fill a filesystem from a directory; ``mkfs.btrfs --rootdir`` of
btrfs-progs 6.2 loses device nodes' numbers; neither shrinks well: the
image is sized for the tree with room to spare). create copies
only the image's allocated extents onto the root partition, grows the
filesystem to fill the partition and gives it a fresh UUID (image_copy.py,
beside the disk code).

The tar archive stays the form administrators inspect and repack: the image
records the archive's size and mtime it was made from, and is made again
when they change. ``CACHE_IMAGE=no`` turns this off. The images' names,
temporary names and format version are cache_store's; images whose archive
is gone are removed by its expiry, leftovers of killed runs when the key's
lock is taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from dataclasses import dataclass

from . import blockdev, filesystems, mounts, runner
from .cache_store import (FORMAT_VERSION, TMP_TAG, Cache, CacheEntry, extract_archive, image_name,
                          image_record_name)
from .errors import CacheError
from .fsutil import atomic_write, fsync_path, temporary_file

log = logging.getLogger(__name__)

# mke2fs options shared by every image. The usage type "default" and 4 KiB
# blocks are forced: mke2fs would otherwise pick its "small" profile (1 KiB
# blocks, many inodes) for a few hundred MiB, which cannot be grown into a
# normal filesystem. Discard is off so that mke2fs writes (rather than
# punches and assumes zero) every metadata block it relies on: only the
# image's data extents are copied to the instance disk, whose old contents
# remain everywhere else. Inode tables stay lazily initialised (flagged as
# such, the kernel zeroes them after mount) and the journal is written.
_COMMON_OPTIONS = ("-F", "-q", "-T", "default", "-b", "4096",
                   "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=0")
# metadata_csum_seed makes the UUID change at each create instant: without
# it every checksum in the filesystem depends on the UUID and is rewritten.
_FEATURES = {"ext4": ("-O", "metadata_csum_seed"), "ext3": (), "ext2": ()}

# Room for mke2fs -d before the image is shrunk to its minimum (the XFS
# image keeps it: the free room of a small instance disk).
_HEADROOM = 1.5
_EXTRA_BYTES = 128 * 2**20

# mkfs.xfs for an image: -K (no discard). mkfs.xfs still leaves the log's
# unwritten blocks as holes: image_copy zeroes them on the instance disk
# (zeroed_ranges), whose old contents stay everywhere else. The log's size is
# fixed here for every size the image is grown to: 64 MiB, what mkfs.xfs
# gives filesystems from 1 GiB up to about 128 GiB.
_XFS_IMAGE_OPTIONS = ("-K", "-l", "size=64m")
_XFS_LOG_BYTES = 64 * 2**20
# mkfs for an image unpacked through a mount, per type. mkfs.btrfs: -K as
# for XFS.
_MOUNTED_IMAGE_MKFS = {"xfs": ("mkfs.xfs", "-f", "-q", *_XFS_IMAGE_OPTIONS),
                       "btrfs": ("mkfs.btrfs", "-f", "-q", "-K")}


@dataclass(frozen=True)
class FsImage:
    """A usable filesystem image of a cache entry."""

    path: str
    fstype: str
    size: int  # bytes of filesystem (the image file's length)


def image_path(entry: CacheEntry, fstype: str) -> str:
    return os.path.join(os.path.dirname(entry.path), image_name(entry.key.stem, fstype))


def record_path(entry: CacheEntry, fstype: str) -> str:
    return os.path.join(os.path.dirname(entry.path), image_record_name(entry.key.stem, fstype))


def _source_stamp(entry: CacheEntry) -> dict[str, int]:
    st = os.stat(entry.path)
    return {"format": FORMAT_VERSION, "archive_size": st.st_size,
            "archive_mtime_ns": st.st_mtime_ns}


def lookup(entry: CacheEntry, fstype: str) -> FsImage | None:
    """The image of ``entry`` for ``fstype`` if it was made from the archive as it is.

    Changes nothing (a shared lock on the key is enough).
    """
    path, record = image_path(entry, fstype), record_path(entry, fstype)
    try:
        with open(record, encoding="utf-8") as f:
            data = json.load(f)
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    stamp = _source_stamp(entry)
    if any(data.get(k) != v for k, v in stamp.items()) or data.get("size") != st.st_size:
        return None
    return FsImage(path, fstype, st.st_size)


def _tree_bytes(root: str) -> tuple[int, int]:
    """Allocated bytes and inode count of a tree (hard links counted once)."""
    total, inodes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            total += max(st.st_blocks * 512, 4096 if not stat.S_ISLNK(st.st_mode) else 0)
    return total, inodes


def build(store: Cache, entry: CacheEntry, fstype: str,
          tree: str | None = None) -> FsImage:
    """Make the image of ``entry`` for ``fstype`` (caller holds the key's lock).

    ``tree`` is the archived tree itself when the caller still has it (the
    create that just bootstrapped and stored it): no unpacking then (XFS
    and Btrfs images get the archive unpacked into them either way).
    Temporaries of killed runs were removed when the lock was taken.
    """
    with contextlib.ExitStack() as stack:
        if tree is None and fstype not in _MOUNTED_IMAGE_MKFS:
            tree = stack.enter_context(store.staging_dir(entry.key))
            store.extract(entry, tree)
        with temporary_file(store.directory, tmp_prefix(entry, fstype)) as tmp:
            make(tree, tmp, fstype, entry.path)
            image = install(entry, fstype, tmp)
    return image


def tmp_prefix(entry: CacheEntry, fstype: str) -> str:
    """The name prefix of an image of ``entry`` being made."""
    return image_name(entry.key.stem, fstype) + TMP_TAG


def make(tree: str | None, path: str, fstype: str, archive: str) -> None:
    """Make the ``fstype`` image of a tree in the (temporary) file ``path``.

    ext images are made from ``tree`` (mke2fs -d); XFS and Btrfs ones get
    the tar ``archive`` unpacked into them, mounted. ``archive`` names
    the tree in errors either way.
    """
    if fstype in _MOUNTED_IMAGE_MKFS:
        _fill_mounted(archive, fstype, path)
        _checked(path, fstype, archive)
        return
    if tree is None:
        raise ValueError(f"an {fstype} image is made from a tree")
    used, inodes = _tree_bytes(tree)
    size = _image_size(used)
    os.truncate(path, size)
    # Inodes as mke2fs would give the final filesystem (one per 16
    # KiB), but never fewer than the tree needs with room to spare.
    inode_count = max(size // 16384, inodes * 2)
    runner.run(["mke2fs", *_COMMON_OPTIONS, *_FEATURES[fstype], "-t", fstype,
                "-N", str(inode_count), "-d", tree, path],
               hint="Making the cache's filesystem image failed; "
                    "set CACHE_IMAGE=no to unpack the archive instead.")
    finish(path, archive)


def finish(path: str, what: str) -> None:
    """Shrink the image file ``path`` to its minimum, check it, sync it (0600)."""
    # resize2fs insists on a freshly checked filesystem before it
    # shrinks one to its minimum size.
    runner.run(["e2fsck", "-f", "-y", path])
    runner.run(["resize2fs", "-M", path])
    blocks = filesystems.superblock_number(filesystems.superblock(path), path,
                                           "Block count")
    os.truncate(path, blocks * 4096)
    _checked(path, "ext4", what)


def _checked(path: str, fstype: str, what: str) -> None:
    """Check the finished image read-only (its type's fsck), make it 0600, sync it."""
    argv = _CHECKS[fstype](path)
    if runner.run(argv, check=False).returncode != 0:
        raise CacheError(f"The filesystem image made from {what} does not pass "
                         f"{argv[0]}; set CACHE_IMAGE=no and report this.")
    os.chmod(path, 0o600)
    fsync_path(path)


def working_copy(image: FsImage, path: str, room: int) -> None:
    """Copy ``image`` into the file ``path`` grown by ``room`` bytes, to change it.

    The copy shares the image's blocks where the filesystem can (reflink)
    and keeps its holes; ``finish`` shrinks it again.
    """
    runner.run(["cp", "--reflink=auto", "--sparse=always", image.path, path])
    os.truncate(path, image.size + room - room % 4096)
    runner.run(["resize2fs", path])


def install(entry: CacheEntry, fstype: str, path: str) -> FsImage:
    """Rename the finished image ``path`` into place as ``entry``'s ``fstype`` image.

    Its record, written first, names the archive as it is now: the
    caller holds the key's lock exclusively.
    """
    final, record = image_path(entry, fstype), record_path(entry, fstype)
    record_data: dict[str, object] = dict(_source_stamp(entry))
    record_data.update(size=os.path.getsize(path), fstype=fstype)
    atomic_write(record, json.dumps(record_data, indent=2) + "\n",
                 tmp_prefix=os.path.basename(record) + TMP_TAG)
    os.replace(path, final)
    log.info("Made the filesystem image %s (%.0f MiB)", final,
             os.path.getsize(final) / 2**20)
    return FsImage(final, fstype, os.path.getsize(final))


# The read-only check each image passes before it is used.
_CHECKS = {
    "ext4": lambda p: ["e2fsck", "-fn", p], "ext3": lambda p: ["e2fsck", "-fn", p],
    "ext2": lambda p: ["e2fsck", "-fn", p], "xfs": lambda p: ["xfs_repair", "-n", "-f", p],
    "btrfs": lambda p: ["btrfs", "check", "--readonly", p],
}


def _image_size(used: int) -> int:
    size = int(used * _HEADROOM) + _EXTRA_BYTES
    return size - size % 4096


def _fill_mounted(archive: str, fstype: str, tmp: str) -> None:
    """``tmp``: an XFS or Btrfs image with the tar ``archive`` unpacked into it."""
    # The archive's size is close to the tree's (tar pads each file to
    # 512 bytes, images' blocks are 4 KiB: the headroom covers both).
    size = _image_size(os.path.getsize(archive))
    os.truncate(tmp, size + (_XFS_LOG_BYTES if fstype == "xfs" else 0))
    runner.run([*_MOUNTED_IMAGE_MKFS[fstype], tmp],
               hint=f"Making the cache's {fstype} image failed; set CACHE_IMAGE=no "
                    f"to unpack the archive instead.")
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(blockdev.attached(tmp))
        root = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(dev, root, fstype))
        extract_archive(archive, root)


def ensure(store: Cache, entry: CacheEntry, fstype: str) -> FsImage:
    """The current image of ``entry`` for ``fstype``, made if needed (lock held)."""
    found = lookup(entry, fstype)
    if found is not None:
        return found
    if os.path.exists(image_path(entry, fstype)):
        log.info("The filesystem image %s is older than its archive; making it again",
                 image_path(entry, fstype))
    return build(store, entry, fstype)
