"""Making and probing filesystems: mkfs for the root, mkswap, UUIDs, types.

The root may be ext2/3/4 (mke2fs), XFS (mkfs.xfs, xfsprogs) or Btrfs
(mkfs.btrfs, btrfs-progs); each type's mkfs command, fstab fields and
mount options are said here, once.

Probing uses ``blkid -p`` (low-level probe of the device itself): there is
no udev on every node, and blkid's cache could describe what the disk held
before we wrote to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from . import runner
from .errors import CommandError, DiskError

# The root filesystems create makes and export dumps (the ``filesystem`` OS
# parameter), the default first.
RootType = Literal["ext4", "ext3", "ext2", "xfs", "btrfs"]
ROOT_TYPES: tuple[RootType, ...] = get_args(RootType)
# The ext family: made by mke2fs, checked by e2fsck, dumped by dump(8).
EXT_TYPES: tuple[RootType, ...] = ("ext4", "ext3", "ext2")


def fstab_fields(fstype: str) -> tuple[str, int]:
    """The root's fstab options and fsck pass for ``fstype``.

    ext: remount read-only on errors rather than carrying on writing, and
    fsck at boot (pass 1). XFS and Btrfs check themselves when mounted
    (log replay, checksums); their fsck programs do nothing at boot
    (fsck.xfs, fsck.btrfs are no-ops), so pass 0 as their documentation
    says.
    """
    if fstype in EXT_TYPES:
        return "errors=remount-ro", 1
    return "defaults", 0


def mount_options(fstype: str) -> tuple[str, ...]:
    """Options the node adds whenever it mounts an instance's root of ``fstype``.

    XFS refuses a second filesystem with the UUID of one already mounted; a
    tenant's disk may carry any UUID (a copy of another instance, or of a
    filesystem of the node), so XFS roots are mounted ``nouuid`` (harmless
    for the fresh UUIDs create gives).
    """
    return ("nouuid",) if fstype == "xfs" else ()


@dataclass(frozen=True)
class FsEntry:
    """A filesystem create made: its UUID and type (``swap`` for swap)."""

    uuid: str
    fstype: str


# blkid's exit status when it found nothing to report.
_BLKID_NOTHING = 2

# mke2fs extended options for an instance's root:
# - lazy_itable_init=1 (mke2fs's own default where the kernel supports it):
#   inode tables are not zeroed now but by the instance kernel's ext4lazyinit
#   thread, slowly, after first boot. Zeroing them here would cost about
#   1/64 of the disk in writes (16 GiB for a 1 TiB disk) while Ganeti holds
#   the instance's locks, and would allocate every block of a thin volume.
#   Safe: with uninit_bg/metadata_csum the kernel ignores uninitialised
#   tables. (ext2/ext3 have neither, and mke2fs zeroes their tables anyway.)
# - lazy_journal_init=0: the journal is zeroed now. It is small and bounded
#   (at most 1 GiB), and stale blocks of an earlier filesystem in a new
#   journal are what could be replayed wrongly after a crash.
# - discard is left on (the default): on thin LVM or a sparse file it gives
#   the old contents' space back to the pool, and where the device promises
#   that discarded blocks read as zeroes mke2fs can skip zeroing entirely.
_MKE2FS_EXTENDED = "lazy_itable_init=1,lazy_journal_init=0"


def make_ext(dev: str, fstype: str, label: str = "", uuid: str = "") -> list[str]:
    """mke2fs making an empty ext2/3/4 filesystem on ``dev``."""
    # -F: no question about an existing filesystem or a file that is not a
    # block device (nobody answers prompts under Ganeti); -q: quiet log.
    argv = ["mke2fs", "-F", "-q", "-t", fstype, "-E", _MKE2FS_EXTENDED]
    if label:
        argv += ["-L", label]
    if uuid:
        argv += ["-U", uuid]
    return [*argv, dev]


def make_xfs(dev: str, label: str = "", uuid: str = "") -> list[str]:
    """mkfs.xfs making an empty XFS filesystem on ``dev``."""
    # -f: overwrite whatever signature the disk had (no prompt under
    # Ganeti); -q: no geometry table in the log. Discard stays on, as for
    # ext: a thin volume gets the old contents' space back. Labels are at
    # most 12 bytes (checked by mkfs.xfs).
    argv = ["mkfs.xfs", "-f", "-q"]
    if label:
        argv += ["-L", label]
    if uuid:
        argv += ["-m", f"uuid={uuid}"]
    return [*argv, dev]


def make_btrfs(dev: str, label: str = "", uuid: str = "") -> list[str]:
    """mkfs.btrfs making an empty Btrfs filesystem on ``dev``."""
    # -f: overwrite an existing signature; -q: quiet. The defaults (DUP
    # metadata on one device, the free space tree) are kept.
    argv = ["mkfs.btrfs", "-f", "-q"]
    if label:
        argv += ["-L", label]
    if uuid:
        argv += ["-U", uuid]
    return [*argv, dev]


def make_filesystem(dev: str, fstype: str, label: str = "", uuid: str = "") -> None:
    """Make an empty ``fstype`` (one of ROOT_TYPES) filesystem on ``dev``."""
    if fstype not in ROOT_TYPES:
        raise DiskError(f"Cannot make a {fstype!r} filesystem: the root "
                        f"filesystem must be one of {', '.join(sorted(ROOT_TYPES))} "
                        f"(OS parameter 'filesystem').")
    if fstype == "xfs":
        argv = make_xfs(dev, label, uuid)
    elif fstype == "btrfs":
        argv = make_btrfs(dev, label, uuid)
    else:
        argv = make_ext(dev, fstype, label, uuid)
    runner.run(argv)


def make_esp(dev: str) -> str:
    """Make the FAT filesystem of an EFI system partition on ``dev``; return its UUID."""
    # -I: the loop device over the partition's range may look like a whole
    # disk to mkfs.fat's checks; -n: the label installers give it.
    runner.run(["mkfs.vfat", "-I", "-n", "EFI", dev])
    return uuid_of(dev)


def make_swap(dev: str) -> str:
    """Make a swap area on ``dev``; return its UUID."""
    # -f: the swap disk Ganeti gives may be a whole disk that once held a
    # partition table, which mkswap otherwise refuses to overwrite.
    runner.run(["mkswap", "-f", dev])
    return uuid_of(dev)


def _probe(dev: str, tag: str) -> str:
    """One blkid tag of ``dev`` probed directly; "" when there is none."""
    result = runner.run(["blkid", "-p", "-o", "value", "-s", tag, dev],
                        capture=True, check=False)
    if result.returncode == _BLKID_NOTHING:
        return ""
    if result.returncode != 0:
        raise CommandError(result.argv, result.returncode, "",
                           f"blkid could not tell what {dev} holds; an "
                           f"ambivalent result means several signatures "
                           f"(see 'wipefs {dev}').")
    return result.stdout.decode("utf-8", "replace").strip()


def fs_type(dev: str) -> str:
    """The filesystem type on ``dev`` ("ext4", "swap"...), "" when none."""
    return _probe(dev, "TYPE")


def partition_table_type(dev: str) -> str:
    """The partition table on ``dev`` ("dos", "gpt"...), "" when none."""
    return _probe(dev, "PTTYPE")


def probe_uuid(dev: str) -> str:
    """The UUID of what ``dev`` holds as blkid shows it, "" when none."""
    return _probe(dev, "UUID")


def uuid_of(dev: str) -> str:
    """The UUID of the filesystem or swap area on ``dev``."""
    uuid = probe_uuid(dev)
    if not uuid:
        raise DiskError(f"{dev} holds no filesystem with a UUID (blkid -p found "
                        f"none), although one was expected there.")
    return uuid


@dataclass(frozen=True)
class ExtState:
    """What an ext2/3/4 superblock says about the filesystem's consistency."""

    state: str  # dumpe2fs's "Filesystem state": "clean", "not clean", ...
    needs_recovery: bool  # the journal holds transactions not yet replayed

    @property
    def clean(self) -> bool:
        return self.state == "clean"

    def describe(self) -> str:
        journal = ", journal needs recovery" if self.needs_recovery else ""
        return f"{self.state}{journal}"


def ext_state(dev: str) -> ExtState:
    """The state recorded in the superblock of the ext filesystem on ``dev``."""
    out = runner.output(["dumpe2fs", "-h", dev])
    return parse_ext_state(out)


def superblock(dev: str) -> dict[str, str]:
    """The superblock (and journal) fields ``dumpe2fs -h`` shows for ``dev``."""
    return superblock_fields(runner.output(["dumpe2fs", "-h", dev]))


def superblock_number(fields: dict[str, str], dev: str, name: str) -> int:
    """The number ``name`` of ``dev``'s ``superblock`` fields; DiskError if absent."""
    if name not in fields:
        raise DiskError(f"dumpe2fs -h {dev} shows no {name!r}")
    return int(fields[name])


def superblock_fields(dumpe2fs_header: str) -> dict[str, str]:
    """The ``name: value`` lines of ``dumpe2fs -h`` (the first of each name)."""
    fields: dict[str, str] = {}
    for line in dumpe2fs_header.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def parse_ext_state(dumpe2fs_header: str) -> ExtState:
    """ExtState from the text of ``dumpe2fs -h``."""
    fields = superblock_fields(dumpe2fs_header)
    if "Filesystem state" not in fields:
        raise DiskError("dumpe2fs printed no filesystem state; the device "
                        "does not hold an ext filesystem.")
    features = fields.get("Filesystem features", "").split()
    return ExtState(fields["Filesystem state"], "needs_recovery" in features)
