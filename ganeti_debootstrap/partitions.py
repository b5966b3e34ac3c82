"""The instance disk's partition table, and a device for its root partition.

Three styles: ``none`` (the filesystem on the whole disk), ``msdos`` (one
bootable partition) and ``gpt`` (one root partition). The partition starts
at PARTITION_ALIGNMENT (in 512-byte sectors) and runs to the end of the
disk. With room for a BIOS boot loader (BOOTLOADER=grub), a gpt table also
gets a BIOS boot partition, numbered 2, in the gap before the root, which
stays partition 1. For UEFI (BOOTLOADER=grub-efi) a gpt table gets an EFI
system partition instead, numbered 2, at the alignment, and the root
follows it. With swap (OS parameter swap), a swap partition of that size
takes the end of the disk and the root ends before it; it is listed last
(partition 2, or 3 after a BIOS boot or EFI system partition). Partition 1
is reached through kpartx where the node has device-mapper (the shell
edition's way), else through a loop device over the partition's byte
range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import blockdev, filesystems, runner
from .errors import CommandError, DiskError
from .log import released
from .settings import PartitionStyle

log = logging.getLogger(__name__)


# The root partition may be smaller than the disk minimum by the alignment
# and the table: accept alignments up to 64 MiB on a minimum-size disk.
MIN_PARTITION_MIB = blockdev.MIN_DISK_MIB - 64

# GPT keeps a backup of its header (1 sector) and partition entries (128
# entries of 128 bytes) at the end of the disk, and the primary copy after
# the protective MBR: partition 1 must stay clear of both.
_GPT_ENTRIES_BYTES = 128 * 128

# An msdos entry holds 32-bit sector numbers.
_MSDOS_MAX_SECTORS = 2**32 - 1

# Discoverable Partitions Specification root partition types, by dpkg
# architecture: systemd-gpt-auto-generator and friends find the root by
# them. Other architectures get the generic "Linux filesystem" type.
GPT_ROOT_TYPES = {
    "amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "i386": "44479540-F297-41B2-9AF7-D131D5F0458A",
    "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    "armhf": "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3",
    "armel": "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3",
    "ppc64el": "C31C45E6-3F39-412E-80FB-4809C4980599",
    "riscv64": "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
    "s390x": "5EEAD9A9-FE09-4A1E-A1D7-520D00531306",
}
GPT_LINUX_FILESYSTEM = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MSDOS_LINUX = "83"
# The swap partition (OS parameter swap): msdos "Linux swap", and the GPT
# type systemd-gpt-auto-generator activates as swap too.
MSDOS_SWAP = "82"
GPT_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
# Where GRUB for BIOS embeds its core image on a gpt disk (on msdos it uses
# the unpartitioned gap after the MBR instead).
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
# The space a BIOS boot loader needs before the root partition: GRUB's
# core.img with the partition table, the root's filesystem and search
# modules is 28 KiB for ext2/3/4 and XFS but 71 KiB for Btrfs (its module
# pulls in zstd, lzo and gzip; GRUB 2.12); GRUB's manual asks for at least
# 31 KiB and advises 1 MiB. Twice the largest measured size leaves room for
# a GRUB that grows in upgrades.
MIN_BOOT_AREA_BYTES = 144 * 1024
# The EFI system partition (BOOTLOADER=grub-efi): GPT type, and its size.
# It holds GRUB's EFI image (about 1 MiB); 64 MiB leaves room for more
# loaders and keeps FAT16 (mkfs.vfat's choice at this size).
GPT_EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_BYTES = 64 * 1024 * 1024

DM_CONTROL = "/dev/mapper/control"
MAPPER_DIR = "/dev/mapper"
# kpartx names partition N of DEV "<name of DEV>-partN" with this separator.
KPARTX_SEPARATOR = "-part"
# Without udev the mapping's node can take a moment to appear.
MAPPING_WAIT_SECONDS = 5.0

_sleep = time.sleep  # replaced by unit tests


@dataclass(frozen=True)
class Layout:
    """Where the root filesystem lives on a disk.

    ``style`` is "none", "msdos" or "gpt"; the root spans ``size_sectors``
    sectors of ``sector_size`` bytes from ``start_sector`` (0 and the whole
    disk for "none").
    """

    style: PartitionStyle
    start_sector: int
    size_sectors: int
    sector_size: int = 512
    # The BIOS boot partition (gpt with room for a boot loader): partition
    # 2, in the gap before the root; size 0 when there is none.
    boot_start_sector: int = 0
    boot_size_sectors: int = 0
    # The EFI system partition (gpt, BOOTLOADER=grub-efi): partition 2,
    # from the alignment up to the root; size 0 when there is none.
    esp_start_sector: int = 0
    esp_size_sectors: int = 0
    # The swap partition (OS parameter swap): the last one, at the end of
    # the disk; size 0 when there is none.
    swap_start_sector: int = 0
    swap_size_sectors: int = 0

    @property
    def offset_bytes(self) -> int:
        return self.start_sector * self.sector_size

    @property
    def size_bytes(self) -> int:
        return self.size_sectors * self.sector_size

    @property
    def esp_offset_bytes(self) -> int:
        return self.esp_start_sector * self.sector_size

    @property
    def esp_size_bytes(self) -> int:
        return self.esp_size_sectors * self.sector_size

    @property
    def swap_offset_bytes(self) -> int:
        return self.swap_start_sector * self.sector_size

    @property
    def swap_size_bytes(self) -> int:
        return self.swap_size_sectors * self.sector_size


def _gpt_table_sectors(sector_size: int) -> int:
    """Sectors one copy of a GPT (header and entries) takes."""
    return 1 + -(-_GPT_ENTRIES_BYTES // sector_size)


def gpt_root_type(arch: str) -> str:
    """The GPT partition type GUID for a root filesystem of ``arch``."""
    return GPT_ROOT_TYPES.get(arch, GPT_LINUX_FILESYSTEM)


def _first_usable(style: str, sector_size: int) -> int:
    """The first sector a partition of ``style`` may use."""
    if style == "gpt":
        # After the protective MBR and the primary table.
        return 1 + _gpt_table_sectors(sector_size)
    return 1


def check_boot_area(style: str, alignment_sectors: int,
                    sector_size: int = 512) -> int:
    """Sectors a BIOS boot loader gets before the root partition.

    The gap after the table (msdos), or the BIOS boot partition made there
    (gpt). Raises DiskError when PARTITION_ALIGNMENT leaves too little
    room, and ValueError for style "none", which has no room at all.
    """
    if style == "none":
        raise ValueError("a disk without partition table has no boot area")
    start = alignment_sectors * 512 // sector_size
    room = start - _first_usable(style, sector_size)
    if room * sector_size < MIN_BOOT_AREA_BYTES:
        # The smallest alignment that fits, in whole 4 KiB (8 sectors).
        first_bytes = _first_usable(style, sector_size) * sector_size
        need = -(-(first_bytes + MIN_BOOT_AREA_BYTES) // 4096) * 8
        raise DiskError(
            f"PARTITION_ALIGNMENT={alignment_sectors} leaves "
            f"{max(room, 0) * sector_size // 1024} KiB before the root partition "
            f"for GRUB (BOOTLOADER=grub), which needs "
            f"{MIN_BOOT_AREA_BYTES // 1024} KiB there. Use PARTITION_ALIGNMENT="
            f"2048 (one MiB, the usual), or at least {need}.")
    return room


def _refuse_swap(swap_bytes: int, root_bytes: int, disk_size: int, where: str) -> None:
    """Refuse (DiskError) swap that leaves less than MIN_PARTITION_MIB for the root."""
    if root_bytes >= MIN_PARTITION_MIB * blockdev.MIB:
        return
    raise DiskError(
        f"The swap asked for (OS parameter swap: {swap_bytes // blockdev.MIB} MiB, "
        f"{where}) leaves {max(root_bytes, 0) // blockdev.MIB} MiB for the root "
        f"filesystem of this {disk_size // blockdev.MIB} MiB disk 0, but at least "
        f"{MIN_PARTITION_MIB} MiB are needed. Give less swap (-O swap=SIZE, or "
        f"swap=0 for none) or a larger disk 0.")


def plan(style: PartitionStyle, alignment_sectors: int, disk_size: int,
         sector_size: int = 512, boot_area: bool = False, esp: bool = False,
         swap_bytes: int = 0) -> Layout:
    """The layout write_table makes on a disk of ``disk_size`` bytes.

    ``alignment_sectors`` counts 512-byte sectors, as PARTITION_ALIGNMENT
    always has. ``boot_area`` leaves room for a BIOS boot loader (see
    :func:`check_boot_area`): on gpt, a BIOS boot partition. ``esp`` (gpt
    only) puts an EFI system partition of ESP_BYTES at the alignment and
    the root right after it. ``swap_bytes``: a swap partition of exactly
    that size (rounded up to whole sectors) at the end of the disk, its
    start aligned; for style "none" (a swap file in the root filesystem)
    only checked to leave the root room. Raises DiskError when a partition
    cannot fit.
    """
    if esp and (style != "gpt" or boot_area):
        raise ValueError("an EFI system partition goes on gpt, without BIOS boot area")
    total = disk_size // sector_size
    if style == "none":
        if boot_area:
            raise ValueError("a disk without partition table has no boot area")
        if swap_bytes:
            _refuse_swap(swap_bytes, disk_size - swap_bytes, disk_size,
                         "a swap file in the root filesystem")
        return Layout("none", 0, total, sector_size)
    setting = f"PARTITION_ALIGNMENT={alignment_sectors}"
    if (alignment_sectors * 512) % sector_size:
        raise DiskError(
            f"{setting} (512-byte sectors) is not a whole number of this "
            f"disk's {sector_size}-byte sectors. Use a multiple of "
            f"{sector_size // 512} (2048, one MiB, suits every disk).")
    start = alignment_sectors * 512 // sector_size
    first_usable = _first_usable(style, sector_size)
    # gpt: before the backup copy of the table at the end of the disk.
    end_reserved = _gpt_table_sectors(sector_size) if style == "gpt" else 0
    if start < first_usable:
        raise DiskError(
            f"{setting} puts the partition inside the {style} table itself "
            f"(it needs the first {first_usable} sectors). Use 2048, the "
            f"usual one MiB alignment.")
    esp_start, esp_size = start, (ESP_BYTES // sector_size if esp else 0)
    start += esp_size
    size = total - end_reserved - start
    if style == "msdos" and start + size > _MSDOS_MAX_SECTORS:
        limit = _MSDOS_MAX_SECTORS * sector_size // blockdev.MIB
        raise DiskError(
            f"The disk is {disk_size // blockdev.MIB} MiB, more than an msdos "
            f"partition table can address ({limit} MiB). Set "
            f"PARTITION_STYLE=gpt (or none) for disks this large.")
    if (size + esp_size) * sector_size < MIN_PARTITION_MIB * blockdev.MIB:
        left = max(size, 0) * sector_size // blockdev.MIB
        raise DiskError(
            f"{setting} leaves {left} MiB for the root partition of this "
            f"{disk_size // blockdev.MIB} MiB disk, but at least "
            f"{MIN_PARTITION_MIB} MiB are needed. Lower PARTITION_ALIGNMENT "
            f"(2048 sectors, one MiB, is usual) or grow the disk.")
    swap_start = swap_size = 0
    if swap_bytes:
        # Exactly the size asked for, starting on the alignment (the few
        # sectors after it, less than one alignment, stay unused).
        swap_size = -(-swap_bytes // sector_size)
        align = max(alignment_sectors * 512 // sector_size, 1)
        swap_start = max((start + size - swap_size) // align * align, 0)
        size = swap_start - start
        _refuse_swap(swap_bytes, size * sector_size, disk_size,
                     "a swap partition at the end of the disk")
    layout = Layout(style, start, size, sector_size, swap_start_sector=swap_start,
                    swap_size_sectors=swap_size)
    if esp:
        return dataclasses.replace(layout, esp_start_sector=esp_start,
                                   esp_size_sectors=esp_size)
    if not boot_area:
        return layout
    room = check_boot_area(style, alignment_sectors, sector_size)
    if style == "msdos":
        return layout
    return dataclasses.replace(layout, boot_start_sector=first_usable,
                               boot_size_sectors=room)


def sfdisk_script(layout: Layout, arch: str = "") -> str:
    """The sfdisk(8) input that creates ``layout`` (msdos or gpt)."""
    if layout.style == "msdos":
        return ("label: dos\nunit: sectors\n\n"
                f"start={layout.start_sector}, size={layout.size_sectors}, "
                f"type={MSDOS_LINUX}, bootable\n" + _swap_line(layout, MSDOS_SWAP))
    if layout.style == "gpt":
        # sfdisk would otherwise put first-lba at its own 1 MiB grain and
        # refuse a smaller alignment that GPT itself allows.
        first_lba = 1 + _gpt_table_sectors(layout.sector_size)
        script = ("label: gpt\nunit: sectors\n"
                  f"first-lba: {first_lba}\n\n"
                  f"start={layout.start_sector}, size={layout.size_sectors}, "
                  f"type={gpt_root_type(arch)}\n")
        if layout.boot_size_sectors:
            # Listed second, so numbered 2 although it comes first on the
            # disk: the root stays partition 1 (export, import and rename
            # look for it there, as kpartx's "-part1" mapping does).
            script += (f"start={layout.boot_start_sector}, "
                       f"size={layout.boot_size_sectors}, type={GPT_BIOS_BOOT}\n")
        if layout.esp_size_sectors:
            # Numbered 2 as well, for the same reason.
            script += (f"start={layout.esp_start_sector}, "
                       f"size={layout.esp_size_sectors}, type={GPT_EFI_SYSTEM}\n")
        return script + _swap_line(layout, GPT_SWAP)
    raise ValueError(f"no partition table for style {layout.style!r}")


def _swap_line(layout: Layout, kind: str) -> str:
    """The sfdisk line of the swap partition (listed last), "" without one."""
    if not layout.swap_size_sectors:
        return ""
    return (f"start={layout.swap_start_sector}, size={layout.swap_size_sectors}, "
            f"type={kind}\n")


def erase_signatures(dev: str) -> None:
    """Erase every filesystem, RAID and partition table signature on ``dev``.

    A stale filesystem or GPT backup header left at the disk's start or
    end would make blkid (and the instance's boot) see two things at once.
    wipefs finds GPT's backup header too, which sfdisk's own wipe leaves.
    """
    # --force: on a disk file (create partitions a file disk directly)
    # wipefs otherwise keeps a partition table, taking the file for a
    # partition ("nested" table).
    runner.run(["wipefs", "--all", "--force", "--quiet", dev])


def write_table(dev: str, style: PartitionStyle, alignment_sectors: int, disk_size: int,
                arch: str = "", boot_area: bool = False, esp: bool = False,
                swap_bytes: int = 0) -> Layout:
    """Write a new partition table (or, for "none", erase every old one).

    One partition from ``alignment_sectors`` (512-byte sectors) to the end
    of the disk: type 83 and bootable for msdos, the root type of the dpkg
    architecture ``arch`` for gpt; ``boot_area``, ``esp``, ``swap_bytes``:
    see :func:`plan`. Returns where the root filesystem goes.
    """
    layout = plan(style, alignment_sectors, disk_size,
                  blockdev.logical_sector_size(dev), boot_area, esp, swap_bytes)
    erase_signatures(dev)
    if style == "none":
        return layout
    # --no-reread --no-tell-kernel: the kernel's view is not used (see
    # mapped_root), and asking for it makes sfdisk sync every filesystem
    # of the node twice.
    runner.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", dev],
               stdin=sfdisk_script(layout, arch).encode())
    return layout


def read_layout(dev: str) -> Layout:
    """Where the root filesystem of an existing instance disk lives.

    Partition 1 of an msdos or gpt table, or the whole disk ("none") when
    it holds a filesystem directly. DiskError when it holds neither.
    """
    # Ask blkid first: sfdisk --json on a disk without a table fails with
    # a message in the log that would mislead whoever reads it later.
    if filesystems.partition_table_type(dev):
        return _layout_from_json(dev, runner.output(["sfdisk", "--json", dev]))
    if filesystems.fs_type(dev):
        sector_size = blockdev.logical_sector_size(dev)
        return Layout("none", 0, blockdev.size_bytes(dev) // sector_size, sector_size)
    raise DiskError(
        f"The disk {dev} holds neither a partition table nor a filesystem. It "
        f"was not installed by this OS definition, or it is empty.")


def _layout_from_json(dev: str, text: str) -> Layout:
    try:
        table = json.loads(text)["partitiontable"]
        label = table["label"]
        sector_size = int(table.get("sectorsize", 512))
        parts = table.get("partitions", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise DiskError(f"Cannot read the partition table of {dev}: sfdisk "
                        f"--json printed something unexpected ({exc}).") from None
    styles: dict[str, PartitionStyle] = {"dos": "msdos", "gpt": "gpt"}
    if label not in styles:
        raise DiskError(f"The disk {dev} has a {label} partition table; only "
                        f"msdos and gpt tables (or none) are supported.")
    if not parts:
        raise DiskError(f"The partition table of {dev} has no partition; there "
                        f"is no root filesystem to use.")
    # The root is partition 1, which sfdisk lists first (a BIOS boot
    # partition before it on the disk is numbered 2 and listed after it).
    first = parts[0]
    if str(first.get("type", "")).upper() == GPT_BIOS_BOOT:
        raise DiskError(f"Partition 1 of {dev} is a BIOS boot partition, not a "
                        f"root filesystem; this OS definition puts the root in "
                        f"partition 1. The disk was not partitioned by it.")
    return Layout(styles[label], int(first["start"]), int(first["size"]), sector_size)


def device_mapper_available() -> bool:
    """Whether this node's kernel has device-mapper (so kpartx can work)."""
    # Opening the control node is what libdevmapper does first; it fails
    # with ENODEV when the driver is missing, and loads the module if the
    # node exists but the module is not loaded yet.
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def kpartx_installed() -> bool:
    """Whether kpartx is on the PATH the scripts' commands run with.

    A node with device-mapper but without kpartx (the package is only
    recommended by Ganeti's) still gets its partition mapped, through an
    offset loop device like a node without device-mapper.
    """
    return shutil.which("kpartx", path=runner.base_environment()["PATH"]) is not None


@contextlib.contextmanager
def mapped_root(dev: str, layout: Layout, read_only: bool = False) -> Iterator[str]:
    """A block device for the root filesystem of ``layout`` on ``dev``.

    "none": ``dev`` itself. Otherwise a kpartx mapping of partition 1 on
    nodes with device-mapper and kpartx, else a loop device over its byte
    range; released on exit. The log says which one was used.
    """
    # The kernel's own partition devices (/dev/sda1) are never used, even
    # where they exist: the table was just written without telling the
    # kernel, so its view may be stale, and Ganeti's disks (LVM, DRBD, loop)
    # have none anyway. kpartx and the offset loop read the table as it is.
    if layout.style == "none":
        log.info("Root filesystem: the whole disk %s (no partition table)", dev)
        yield dev
    elif device_mapper_available() and kpartx_installed():
        with _kpartx_mapping(dev, read_only) as part:
            log.info("Partition 1 of %s: %s (kpartx)", dev, part)
            yield part
    else:
        with blockdev.loop_device(dev, offset=layout.offset_bytes,
                                  size=layout.size_bytes, read_only=read_only) as part:
            log.info("Partition 1 of %s: %s (offset loop device)", dev, part)
            yield part


def _kpartx_name(dev: str, listing: str) -> str:
    """The mapping name kpartx gives partition 1, from ``kpartx -l``.

    kpartx names mappings after the device-mapper name of a mapped device
    (LVM: "vg-lv") and after the device node otherwise, so the name is
    taken from kpartx itself rather than guessed.
    """
    suffix = f"{KPARTX_SEPARATOR}1"
    for line in listing.splitlines():
        name = line.split(" : ", 1)[0].strip()
        if name.endswith(suffix):
            return name
    raise DiskError(f"kpartx finds no partition 1 on {dev} (it listed: "
                    f"{listing.strip() or 'nothing'}); the partition table "
                    f"is not what this OS definition writes.")


@contextlib.contextmanager
def _kpartx_mapping(dev: str, read_only: bool) -> Iterator[str]:
    """Map partition 1 of ``dev`` with kpartx; remove the mappings on exit."""
    sep = ["-p", KPARTX_SEPARATOR]
    name = _kpartx_name(dev, runner.output(["kpartx", "-l", *sep, dev]))
    add = ["kpartx", "-a", "-s", *(["-r"] if read_only else []), *sep, dev]
    # The add inside: kpartx can fail after creating some mappings.
    with released(f"removing the partition mappings of {dev}", lambda: _kpartx_delete(dev)):
        runner.run(add)
        part = os.path.join(MAPPER_DIR, name)
        _wait_for_node(part)
        yield part


def _wait_for_node(path: str) -> None:
    """Wait until a mapping's device node exists (udev or libdevmapper makes it)."""
    deadline = time.monotonic() + MAPPING_WAIT_SECONDS
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise DiskError(f"kpartx reported success but {path} did not appear "
                            f"within {MAPPING_WAIT_SECONDS:.0f} s. Check that udev "
                            f"is running (udevadm settle) and 'dmsetup ls'.")
        _sleep(0.05)


def _kpartx_delete(dev: str) -> None:
    """Remove the partition mappings of ``dev``, retrying while one is busy."""
    argv = ["kpartx", "-d", "-p", KPARTX_SEPARATOR, dev]
    failures = 0
    while True:
        try:
            runner.run(argv)
            return
        except CommandError as exc:
            if failures == len(blockdev.DETACH_DELAYS):
                raise DiskError(
                    f"Cannot remove the partition mappings of {dev}: still "
                    f"busy. Release their user (mount; fuser -v "
                    f"{MAPPER_DIR}/*), then run '{' '.join(argv)}'.") from exc
            log.debug("mappings of %s busy, retrying", dev)
            _sleep(blockdev.DETACH_DELAYS[failures])
            failures += 1
