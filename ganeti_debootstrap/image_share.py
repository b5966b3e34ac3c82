"""A copy of a cache image beside Ganeti's file storage, so that its blocks can be shared.

A reflink shares blocks within one filesystem only. Ganeti's file storage
is often a filesystem of its own (XFS with reflink, Btrfs), while the cache
lives under /var/cache on the root filesystem: then create keeps a copy of
the image on the storage's filesystem and clones the disk from it. The
first create after the image changed pays one copy (about the time of one
warm create on a block device); every later one shares the blocks and
writes metadata only.

Where: ``<storage dir>/.ganeti-instance-debootstrap/``. Ganeti keeps a file
disk at ``<storage dir>/<instance>/<disk file>``; no instance is named with
a leading dot, and the directory stays on the storage's filesystem unless
the instance's own directory is a mount point (then nothing is shared).

A copy is kept only where it can pay and be trusted:

- the disk is a regular file on another filesystem than the image;
- that filesystem shares blocks (a probe clone in the directory works);
- the storage directory and everything above it belong to root and are not
  writable by group or others, as the cache directory must be (trust.py):
  the copy goes into every instance made from it. The directory is made
  0700; a copy is used only if it is a regular file of root's, of the
  image's length.

In step with the cache: a copy's name carries the identity of the image it
was made from (inode, length, modification time). A refresh or a remade
image changes that identity, so the next create makes a new copy; each time
a copy is used, copies whose image is gone or changed are removed. The
administrator may delete the directory at any time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time

from . import fsutil, image_copy, trust
from .cache_images import FsImage
from .errors import DefinitionError

log = logging.getLogger(__name__)

DIR_NAME = ".ganeti-instance-debootstrap"
_TEMP_PREFIX = ".new-"
_PROBE_BYTES = 4096
# ioctl FICLONE = _IOW(0x94, 9, int): the whole of one file shares another's blocks.
_FICLONE = 0x40049409
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)
# A temporary file older than this was left by a create that was killed.
_STALE_TEMP_SECONDS = 3600


def _identity(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def copy_name(image_path: str, st: os.stat_result) -> str:
    """The copy's file name: the image's name and the identity of its version."""
    return f"{os.path.basename(image_path)}.{_identity(st)}"


def storage_dir(disk_path: str) -> str:
    """The directory Ganeti keeps this disk file's instance directory in."""
    return os.path.dirname(os.path.dirname(os.path.realpath(disk_path)))


def beside(image: FsImage, disk_path: str) -> FsImage:
    """The image to copy onto ``disk_path``: a copy on its filesystem where
    that lets the blocks be shared, else ``image`` itself."""
    try:
        st_image = os.stat(image.path)
        st_disk = os.stat(disk_path)
    except OSError:
        return image
    if not stat.S_ISREG(st_disk.st_mode) or st_disk.st_dev == st_image.st_dev:
        return image
    storage = storage_dir(disk_path)
    try:
        if os.stat(storage).st_dev != st_disk.st_dev:
            return image
        trust.check_existing_part(storage, _purpose(storage))
    except (OSError, DefinitionError) as exc:
        log.info("Not keeping a copy of the cache image beside the disk file: %s", exc)
        return image
    directory = os.path.join(storage, DIR_NAME)
    try:
        if not _usable_directory(directory):
            return image
        copy = os.path.join(directory, copy_name(image.path, st_image))
        if not _usable_copy(copy, image.size):
            if not _shares_blocks(directory):
                log.debug("The filesystem of %s does not share blocks; no copy kept",
                          directory)
                return image
            _make_copy(image, copy)
        _remove_stale(directory, os.path.dirname(image.path), os.path.basename(copy))
    except OSError as exc:
        log.warning("Could not keep a copy of the cache image in %s (%s); copying "
                    "from the cache instead", directory, exc.strerror or exc)
        return image
    return FsImage(copy, image.fstype, image.size)


def _purpose(storage: str) -> trust.Purpose:
    return trust.Purpose(
        action=f"keep a copy of the cache image in {storage}",
        reason="The copy is put as root into every new instance",
        consequence="put their own programs, run as root, into every instance",
        error=DefinitionError,
        alternative="")


def _usable_directory(directory: str) -> bool:
    """Make the copies' directory (0700) if needed; whether it can be trusted."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != 0
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        log.warning("Not using %s for a copy of the cache image: it is not a "
                    "directory of root's that only root can write. Remove it; the "
                    "next create makes it again.", directory)
        return False
    return True


def _usable_copy(path: str, size: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_size == size


def _shares_blocks(directory: str) -> bool:
    """Whether a clone between two files of ``directory`` works (a probe)."""
    names = []
    try:
        for _ in range(2):
            with fsutil.temporary_file(directory, _TEMP_PREFIX) as name:
                names.append(name)
        with open(names[0], "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
        with open(names[0], "rb") as src, open(names[1], "wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            except OSError as exc:
                if exc.errno in _NO_CLONE:
                    return False
                raise
        return True
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _make_copy(image: FsImage, copy: str) -> None:
    """Copy the image's data (holes kept) under a temporary name, then rename it."""
    start = time.monotonic()
    directory = os.path.dirname(copy)
    with fsutil.temporary_file(directory, _TEMP_PREFIX) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, image.size)
        finally:
            os.close(fd)
        image_copy.write(image, temp)
        os.rename(temp, copy)
    fsutil.fsync_path(directory)
    log.info("Copied the cache image to %s (%.1f s), on the disk files' filesystem: "
             "instances share its blocks from now on", copy, time.monotonic() - start)


def _remove_stale(directory: str, cache_dir: str, keep: str) -> None:
    """Remove copies whose image in ``cache_dir`` is gone or has changed."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(_TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.lstat(path).st_mtime > _STALE_TEMP_SECONDS:
                    os.unlink(path)
            continue
        if name == keep:
            continue
        image_name, _, identity = name.rpartition(".")
        try:
            current = _identity(os.stat(os.path.join(cache_dir, image_name)))
        except FileNotFoundError:
            current = ""
        if identity != current:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.debug("Removed %s: its cache image is gone or has changed", name)
