"""The instance's disk as a whole: format it for a new root, or open an existing one.

create and import format disk 0 the same way (partition table, root
filesystem, API 5 swap); export and rename find the root filesystem that
create made. Everything acquired is registered on the caller's ExitStack,
so it is released in reverse order whatever happens next.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from . import blockdev, filesystems, log, partitions
from .environment import Request
from .errors import DiskError
from .instance_files import FsEntry
from .settings import Settings

# The root filesystems create makes and export knows how to dump.
ROOT_FILESYSTEMS = ("ext2", "ext3", "ext4")


@dataclass(frozen=True)
class FormattedDisk:
    """A freshly partitioned and formatted instance disk, still attached."""

    device: str  # the whole disk (block device or loop device over the file)
    root_device: str  # the root filesystem's device (partition 1, or the disk)
    root: FsEntry
    swap: FsEntry | None


def format_disk(stack: contextlib.ExitStack, request: Request, conf: Settings,
                fstype: str, arch: str) -> FormattedDisk:
    """Check, attach, partition and format ``request.disk_path`` (and API 5 swap)."""
    with log.phase("check disk"):
        blockdev.check_disk_usable(request.disk_path)
        if request.swap_device:
            blockdev.check_disk_usable(request.swap_device)
        dev = stack.enter_context(blockdev.attached(request.disk_path))
        size = blockdev.size_bytes(dev)
        blockdev.require_min_size(size, blockdev.MIN_DISK_MIB)
    with log.phase("partition"):
        layout = partitions.write_table(dev, conf.partition_style,
                                        conf.partition_alignment, size, arch)
        root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
    with log.phase("make filesystems"):
        filesystems.make_filesystem(root_dev, fstype)
        root = FsEntry(filesystems.uuid_of(root_dev), fstype)
        swap = None
        if request.swap_device:
            swap_dev = stack.enter_context(blockdev.attached(request.swap_device))
            swap = FsEntry(filesystems.make_swap(swap_dev), "swap")
    return FormattedDisk(dev, root_dev, root, swap)


def open_root(stack: contextlib.ExitStack, path: str,
              read_only: bool = False) -> tuple[str, str, str]:
    """Attach an existing instance disk; return (disk device, root device, fs type).

    Refuses a disk whose root is not an ext filesystem that create could
    have made, instead of producing an empty or partial result.
    """
    blockdev.check_disk_usable(path)
    dev = stack.enter_context(blockdev.attached(path, read_only=read_only))
    layout = partitions.read_layout(dev)
    root_dev = stack.enter_context(partitions.mapped_root(dev, layout, read_only=read_only))
    fstype = filesystems.fs_type(root_dev)
    if fstype not in ROOT_FILESYSTEMS:
        found = f"a {fstype} filesystem" if fstype else "no filesystem we recognise"
        raise DiskError(
            f"The disk {path} holds {found} where this OS definition puts the "
            f"instance's root ({'the whole disk' if layout.style == 'none' else 'partition 1 of its ' + layout.style + ' table'}); "
            f"only ext2/3/4 roots made by create can be used. Was this "
            f"instance installed with another OS definition?")
    return dev, root_dev, fstype
