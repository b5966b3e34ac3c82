"""mkfs, mkswap and blkid probing through the fake runner."""

from __future__ import annotations

import pytest

from ganeti_debootstrap import filesystems
from ganeti_debootstrap.errors import CommandError, DiskError

UUID = "8b8e6897-7440-4cd1-bc1b-d6b994d2cf7f"


@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
def test_root_filesystem_is_made_without_prompts(fake_runner, fstype):
    fake_runner.expect("mke2fs")
    filesystems.make_filesystem("/dev/loop1", fstype)
    assert fake_runner.commands() == [
        f"mke2fs -F -q -t {fstype} -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop1"]


def test_label_is_passed_to_mke2fs(fake_runner):
    fake_runner.expect("mke2fs")
    filesystems.make_filesystem("/dev/loop1", "ext4", label="root")
    assert fake_runner.calls[0][-3:] == ("-L", "root", "/dev/loop1")


def test_unknown_filesystem_is_refused_before_running_anything(fake_runner):
    with pytest.raises(DiskError, match="btrfs, ext2, ext3, ext4, xfs"):
        filesystems.make_filesystem("/dev/loop1", "zfs")
    assert fake_runner.calls == []


@pytest.mark.parametrize(("fstype", "command"), [
    ("xfs", f"mkfs.xfs -f -q -L root -m uuid={UUID} /dev/loop1"),
    ("btrfs", f"mkfs.btrfs -f -q -L root -U {UUID} /dev/loop1"),
    ("ext4", f"mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 -L root "
             f"-U {UUID} /dev/loop1"),
])
def test_each_root_type_has_its_own_mkfs_with_label_and_uuid(fake_runner, fstype, command):
    fake_runner.expect(command.split()[0])
    filesystems.make_filesystem("/dev/loop1", fstype, label="root", uuid=UUID)
    assert fake_runner.commands() == [command]


@pytest.mark.parametrize(("fstype", "fields"), [
    ("ext4", ("errors=remount-ro", 1)), ("ext2", ("errors=remount-ro", 1)),
    ("xfs", ("defaults", 0)), ("btrfs", ("defaults", 0))])
def test_fstab_checks_ext_roots_at_boot_and_leaves_xfs_and_btrfs_to_themselves(
        fstype, fields):
    assert filesystems.fstab_fields(fstype) == fields


def test_xfs_roots_are_mounted_nouuid_and_others_with_no_extra_option():
    assert filesystems.mount_options("xfs") == ("nouuid",)
    assert filesystems.mount_options("btrfs") == ()
    assert filesystems.mount_options("ext4") == ()


def test_uuid_is_probed_directly_on_the_device(fake_runner):
    fake_runner.expect("blkid", stdout=UUID + "\n")
    assert filesystems.uuid_of("/dev/loop1") == UUID
    assert fake_runner.commands() == ["blkid -p -o value -s UUID /dev/loop1"]


def test_missing_uuid_is_an_error(fake_runner):
    fake_runner.expect("blkid", returncode=2)
    with pytest.raises(DiskError, match="no filesystem with a UUID"):
        filesystems.uuid_of("/dev/loop1")


def test_filesystem_type_is_empty_when_there_is_none(fake_runner):
    fake_runner.expect("blkid", returncode=2)
    assert filesystems.fs_type("/dev/loop1") == ""


def test_filesystem_type_is_reported(fake_runner):
    fake_runner.expect("blkid", stdout="ext3\n")
    assert filesystems.fs_type("/dev/loop1") == "ext3"


def test_ambivalent_probe_is_an_error_not_an_empty_disk(fake_runner):
    fake_runner.expect("blkid", returncode=8)
    with pytest.raises(CommandError, match="wipefs /dev/loop1"):
        filesystems.fs_type("/dev/loop1")


def test_swap_is_made_and_its_uuid_returned(fake_runner):
    fake_runner.expect("mkswap")
    fake_runner.expect("blkid", stdout=UUID + "\n")
    assert filesystems.make_swap("/dev/xenvg/swap") == UUID
    assert fake_runner.commands() == [
        "mkswap -f /dev/xenvg/swap", "blkid -p -o value -s UUID /dev/xenvg/swap"]


CLEAN = """\
Filesystem volume name:   <none>
Filesystem UUID:          fcc273cf-fe8f-40c0-b7d6-d1a2d150c2bf
Filesystem features:      has_journal ext_attr resize_inode dir_index filetype extent 64bit
Filesystem state:         clean
Errors behavior:          Continue
"""

IN_USE = CLEAN.replace("extent 64bit", "needs_recovery extent 64bit").replace(
    "state:         clean", "state:         not clean")


def test_clean_superblock_is_reported_clean():
    state = filesystems.parse_ext_state(CLEAN)
    assert state.clean and not state.needs_recovery
    assert state.describe() == "clean"


def test_journal_needing_recovery_is_reported():
    state = filesystems.parse_ext_state(IN_USE)
    assert not state.clean and state.needs_recovery
    assert state.describe() == "not clean, journal needs recovery"


def test_ext_state_reads_the_superblock_with_dumpe2fs(fake_runner):
    fake_runner.expect("dumpe2fs", stdout=CLEAN)
    assert filesystems.ext_state("/dev/loop1").clean
    assert fake_runner.commands() == ["dumpe2fs -h /dev/loop1"]


def test_text_without_state_is_not_an_ext_filesystem():
    with pytest.raises(DiskError, match="no filesystem state"):
        filesystems.parse_ext_state("dumpe2fs: Bad magic number\n")
