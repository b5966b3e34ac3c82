"""The instance's disk as a whole: format it for a new root, or open an existing one.

create and import format disk 0 the same way (partition table, root
filesystem, API 5 swap); export and rename find the root filesystem that
create made. Everything acquired is registered on the caller's ExitStack,
so it is released in reverse order whatever happens next.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from . import blockdev, filesystems, image_copy, log, partitions
from .cache_images import FsImage
from .environment import Request
from .errors import DiskError
from .filesystems import FsEntry
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FormattedDisk:
    """A freshly partitioned and formatted instance disk, still attached."""

    device: str  # the whole disk (block device or loop device over the file)
    root_device: str  # the root filesystem's device (partition 1, or the disk)
    root: FsEntry
    swap: FsEntry | None
    from_image: bool = False  # the root filesystem is a copy of a cache image
    # BOOTLOADER=grub-efi: the EFI system partition (fresh FAT) and a loop
    # device over it, attached as long as the disk is.
    esp: FsEntry | None = None
    esp_device: str = ""


def format_disk(stack: contextlib.ExitStack, request: Request, conf: Settings,
                fstype: str, arch: str,
                image: FsImage | None = None) -> FormattedDisk:
    """Check, partition and format ``request.disk_path`` (and API 5 swap).

    With ``image`` (and room for it), the root filesystem is that image
    copied, grown and given a new UUID instead of an empty mkfs.
    """
    path = request.disk_path
    with log.phase("check disk"):
        blockdev.check_disk_usable(path)
        if request.swap_device:
            blockdev.check_disk_usable(request.swap_device)
        is_file = not blockdev.is_block_device(path)
        size = blockdev.size_bytes(path)
        blockdev.require_min_size(size, blockdev.MIN_DISK_MIB)
    with log.phase("partition"):
        # Written on the disk itself, file or device, before any loop
        # device exists over it: no loop device caches what is written
        # into a disk file directly below.
        # GRUB (BOOTLOADER=grub) needs room before the root partition.
        layout = partitions.write_table(path, conf.partition_style,
                                        conf.partition_alignment, size, arch,
                                        boot_area=conf.bootloader == "grub",
                                        esp=conf.bootloader == "grub-efi")
    use_image = image is not None and image_copy.fits(image, layout.size_bytes)
    if image is not None and not use_image:
        logger.info("The root partition (%d MiB) is smaller than the cache's "
                    "filesystem image (%d MiB): unpacking the archive instead",
                    layout.size_bytes // 2**20, image.size // 2**20)
    # The image's journal is left out of the copy when a new one of the
    # partition's size replaces it.
    skip = image_copy.journal_to_replace(image, layout.size_bytes) if use_image and image else ()
    if use_image and is_file:
        assert image is not None
        with log.phase("copy filesystem image"):
            image_copy.write(image, path, layout.offset_bytes, skip)
    dev = stack.enter_context(blockdev.attached(path))
    if is_file and layout.style != "none":
        # A file disk's partition is reached through a loop device over the
        # file's byte range, on every node: simpler than kpartx over a loop.
        root_dev = stack.enter_context(blockdev.loop_device(
            path, offset=layout.offset_bytes, size=layout.size_bytes))
    else:
        root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
    with log.phase("make filesystems"):
        if use_image:
            assert image is not None
            if not is_file:
                image_copy.write(image, root_dev, skip=skip)
            uuid = image_copy.grow_and_renew(root_dev, fstype, journal_copied=not skip)
        else:
            filesystems.make_filesystem(root_dev, fstype)
            uuid = filesystems.uuid_of(root_dev)
        swap = None
        if request.swap_device:
            swap_dev = stack.enter_context(blockdev.attached(request.swap_device))
            swap = FsEntry(filesystems.make_swap(swap_dev), "swap")
        esp, esp_dev = None, ""
        if layout.esp_size_sectors:
            # Through a loop device over its byte range on every node: the
            # FAT is written by mkfs.vfat and mtools, never mounted.
            esp_dev = stack.enter_context(blockdev.loop_device(
                path if is_file else dev, offset=layout.esp_offset_bytes,
                size=layout.esp_size_bytes))
            esp = FsEntry(filesystems.make_esp(esp_dev), "vfat")
    return FormattedDisk(dev, root_dev, FsEntry(uuid, fstype), swap, use_image,
                         esp, esp_dev)


def open_root(stack: contextlib.ExitStack, path: str,
              read_only: bool = False) -> tuple[str, str, str]:
    """Attach an existing instance disk; return (disk device, root device, fs type).

    Refuses a disk whose root is not a filesystem that create could have
    made (filesystems.ROOT_TYPES), instead of producing an empty or partial
    result.
    """
    blockdev.check_disk_usable(path)
    is_file = not blockdev.is_block_device(path)
    dev = stack.enter_context(blockdev.attached(path, read_only=read_only))
    layout = partitions.read_layout(dev)
    if is_file and layout.style != "none":
        # As create does: the partition of a file disk through one loop
        # device over the file's byte range. A loop device over the disk's
        # loop device reads every block through two page caches: dump of a
        # 2 GiB instance took 1.9 s that way against 1.2 s.
        root_dev = stack.enter_context(blockdev.loop_device(
            path, offset=layout.offset_bytes, size=layout.size_bytes, read_only=read_only))
    else:
        root_dev = stack.enter_context(partitions.mapped_root(dev, layout,
                                                              read_only=read_only))
    fstype = filesystems.fs_type(root_dev)
    if fstype not in filesystems.ROOT_TYPES:
        found = f"a {fstype} filesystem" if fstype else "no filesystem we recognise"
        where = ("the whole disk" if layout.style == "none"
                 else f"partition 1 of its {layout.style} table")
        raise DiskError(
            f"The disk {path} holds {found} where this OS definition puts the "
            f"instance's root ({where}); "
            f"only {', '.join(filesystems.ROOT_TYPES)} roots made by create can "
            f"be used. Was this "
            f"instance installed with another OS definition?")
    return dev, root_dev, fstype
