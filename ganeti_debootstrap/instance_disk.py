"""The instance's disk as a whole: format it for a new root, or open an existing one.

create and import format disk 0 the same way (partition table, root
filesystem, swap partition or API 5 swap); export and rename find the root
filesystem that create made. create formats the data disks (disks 1..n,
OS parameter data_disks=format) here too. Everything acquired is
registered on the caller's ExitStack, so it is released in reverse order
whatever happens next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass

from . import blockdev, filesystems, image_copy, image_share, log, partitions
from .cache_images import FsImage
from .environment import Disk, Request
from .errors import DiskError
from .filesystems import FsEntry
from .osparams import OSParams
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
    # PARTITION_STYLE=none with the OS parameter swap: the size of the swap
    # file the root filesystem gets once it is filled (instance_files).
    swap_file_bytes: int = 0


def plan_layout(path: str, conf: Settings, size: int, swap_bytes: int = 0) -> partitions.Layout:
    """The layout disk 0 at ``path`` (``size`` bytes) gets; DiskError when it cannot fit.

    GRUB (BOOTLOADER=grub) needs room before the root partition, UEFI
    (grub-efi) an EFI system partition; swap takes the end of the disk.
    """
    return partitions.plan(conf.partition_style, conf.partition_alignment, size,
                           blockdev.logical_sector_size(path),
                           boot_area=conf.bootloader == "grub",
                           esp=conf.bootloader == "grub-efi", swap_bytes=swap_bytes)


def format_disk(stack: contextlib.ExitStack, request: Request, conf: Settings,
                fstype: str, arch: str,
                image: FsImage | None = None, swap_bytes: int = 0) -> FormattedDisk:
    """Check, partition and format ``request.disk_path`` (and API 5 swap).

    With ``image`` (and room for it), the root filesystem is that image
    copied, grown and given a new UUID instead of an empty mkfs.
    ``swap_bytes`` (OS parameter swap): a swap partition at the end of
    the disk, or with PARTITION_STYLE=none a swap file to make later
    (``swap_file_bytes``).
    """
    path = request.disk_path
    with log.phase("check disk"):
        blockdev.check_disk_usable(path)
        if request.swap_device:
            blockdev.check_disk_usable(request.swap_device)
        is_file = not blockdev.is_block_device(path)
        size = blockdev.size_bytes(path)
        blockdev.require_min_size(size, blockdev.MIN_DISK_MIB)
        # Refused here, before the table is written, when it cannot fit.
        plan_layout(path, conf, size, swap_bytes)
    with log.phase("partition"):
        # Written on the disk itself, file or device, before any loop
        # device exists over it: no loop device caches what is written
        # into a disk file directly below.
        layout = partitions.write_table(path, conf.partition_style,
                                        conf.partition_alignment, size, arch,
                                        boot_area=conf.bootloader == "grub",
                                        esp=conf.bootloader == "grub-efi",
                                        swap_bytes=swap_bytes)
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
            # From a copy on the disk file's filesystem where that lets the
            # blocks be shared (image_share.py).
            image_copy.write(image_share.beside(image, path), path, layout.offset_bytes,
                             skip)
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
        if layout.swap_size_sectors:
            # Through a loop device over its byte range on every node, as
            # the ESP; released at once: nothing else writes there.
            with blockdev.loop_device(path if is_file else dev,
                                      offset=layout.swap_offset_bytes,
                                      size=layout.swap_size_bytes) as swap_dev:
                swap = FsEntry(filesystems.make_swap(swap_dev), "swap")
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
                         esp, esp_dev,
                         swap_file_bytes=swap_bytes if layout.style == "none" else 0)


# --- data disks (OS parameter data_disks=format) ------------------------------

# The smallest data disk data_disks=format formats, by filesystem type, in
# MiB: room for data beside the filesystem's own metadata (an ext3/4
# journal alone takes 4 MiB at this size). mkfs.xfs (xfsprogs 5.19 on)
# refuses filesystems under 300 MiB, and mkfs.btrfs wants about 114 MiB
# for its default profiles; a type not listed gets the largest.
MIN_DATA_DISK_MIB: dict[str, int] = {"ext2": 64, "ext3": 64, "ext4": 64,
                                     "btrfs": 256, "xfs": 300}


def min_data_disk_mib(fstype: str) -> int:
    """The smallest data disk (MiB) that gets a ``fstype`` filesystem."""
    return MIN_DATA_DISK_MIB.get(fstype, max(MIN_DATA_DISK_MIB.values()))


def data_disks(request: Request, params: OSParams) -> tuple[Disk, ...]:
    """The disks create formats as data disks: 1..n with data_disks=format.

    Under OS API 5 Ganeti passes no OS parameters and no disk beyond the
    root and swap devices: nothing here.
    """
    if params.data_disks != "format":
        return ()
    return tuple(d for d in request.disks if d.index > 0)


def _identity(path: str) -> tuple[int, ...]:
    """What tells one disk from another: a device's number, a file's inode."""
    st = os.stat(path)
    if blockdev.is_block_device(path):
        return (st.st_rdev,)
    return (st.st_dev, st.st_ino)


def check_data_disks(request: Request, params: OSParams) -> None:
    """Refuse (DiskError) data disks create cannot format, before any disk is touched.

    Each needs a path (not only a URI), read-write access, no user (the
    checks disk 0 gets) and at least :func:`min_data_disk_mib`; and none
    may be disk 0 or another data disk under a second name.
    """
    disks = data_disks(request, params)
    if not disks:
        return
    fstype = params.data_filesystem
    fix = ("or set the OS parameter data_disks=none to leave disks 1 and up "
           "untouched")
    seen: dict[tuple[int, ...], str] = {_identity(request.disk_path): "disk 0"}
    for disk in disks:
        what = f"Data disk {disk.index}"
        if not disk.path:
            raise DiskError(
                f"{what} has no path (DISK_{disk.index}_PATH), only a URI "
                f"({disk.uri!r}); data_disks=format writes a filesystem onto it "
                f"from the node. Use a disk template with kernel access, {fix}.")
        if disk.access != "rw":
            raise DiskError(
                f"{what} ({disk.path}) is {disk.access!r}, not read-write "
                f"(DISK_{disk.index}_ACCESS); data_disks=format writes a "
                f"filesystem onto it. Make it read-write, {fix}.")
        blockdev.check_disk_usable(disk.path)
        ident = _identity(disk.path)
        if ident in seen:
            raise DiskError(
                f"{what} ({disk.path}) is the same disk as {seen[ident]}: "
                f"formatting it would destroy that one. Check the disks Ganeti "
                f"passed (DISK_n_PATH), {fix}.")
        seen[ident] = f"disk {disk.index}"
        size = blockdev.size_bytes(disk.path)
        need = min_data_disk_mib(fstype)
        if size < need * blockdev.MIB:
            raise DiskError(
                f"{what} ({disk.path}) is {size // blockdev.MIB} MiB ({size} "
                f"bytes), but data_disks=format needs at least {need} MiB for "
                f"its {fstype} filesystem (data_filesystem). Give it {need} MiB or "
                f"more (gnt-instance add --disk {disk.index}:size={need}M; "
                f"gnt-instance grow-disk on reinstall), {fix}.")


# A filesystem UUID as blkid shows those of the data filesystem types.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _kept_filesystem(path: str, fstype: str) -> FsEntry | None:
    """The ``fstype`` filesystem a data disk holds, if it can be kept as it is.

    The disk is the instance's own (its user's data): what blkid reads
    from it goes into fstab only as a well-formed UUID; anything else is
    formatted anew.
    """
    if filesystems.fs_type(path) != fstype:
        return None
    uuid = filesystems.probe_uuid(path)
    return FsEntry(uuid, fstype) if _UUID.fullmatch(uuid) else None


def format_data_disks(request: Request, params: OSParams) -> dict[int, FsEntry]:
    """Give each data disk a filesystem on the whole disk; {disk index: filesystem}.

    No partition table: gnt-instance grow-disk and an online resize of the
    filesystem are then all it takes to grow one. Old signatures (a
    partition table's backup at the end) are erased first. Each is
    attached only while it is formatted. On reinstall
    (INSTANCE_REINSTALL=1) a data disk already holding a filesystem of the
    type asked for keeps it, with its data: a reinstall renews the system
    on disk 0, not what the instance stored on its data disks. A new
    filesystem's UUID is Ganeti's UUID of the disk (DISK_N_UUID) where
    Ganeti passes one.
    """
    made: dict[int, FsEntry] = {}
    fstype = params.data_filesystem
    for disk in data_disks(request, params):
        # Checked again right before it is written (as disk 0 is).
        blockdev.check_disk_usable(disk.path)
        kept = _kept_filesystem(disk.path, fstype) if request.reinstall else None
        if kept is not None:
            made[disk.index] = kept
            logger.info("Data disk %d (%s): its %s filesystem %s is kept (reinstall)",
                        disk.index, disk.path, fstype, kept.uuid)
            continue
        with blockdev.attached(disk.path) as dev:
            partitions.erase_signatures(dev)
            # Ganeti's UUID of the disk, where given: import remakes the
            # filesystem with the new disk's and names it in fstab before
            # the disk is restored (import_disk.py).
            filesystems.make_filesystem(dev, fstype, uuid=disk.uuid)
            made[disk.index] = FsEntry(filesystems.uuid_of(dev), fstype)
        logger.info("Data disk %d (%s): %s filesystem %s", disk.index, disk.path,
                    fstype, made[disk.index].uuid)
    return made


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
