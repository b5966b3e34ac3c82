"""export composed: every command it runs, in order, and the release after a failure.

export runs through its entry point (export.run with the Request parsed
from Ganeti's environment) on a disk file holding what create made (an
msdos table, an ext4 root in partition 1), with every external command
faked (tests/fakenode.py). Nothing is mounted: dump reads the root's
device, attached read-only.
"""

from __future__ import annotations

import os
import sys

import pytest

from ganeti_debootstrap import backupstream, environment, export
from ganeti_debootstrap.errors import CommandError, DiskError
from ganeti_debootstrap.paths import Paths
from tests.fakenode import DISK0_MIB, FakeNode, ganeti_env, shown, undo

MIB = 2**20
ROOT_SIZE = (DISK0_MIB - 1) * MIB

CLEAN = ("Filesystem volume name:   <none>\n"
         "Filesystem state:         clean\n"
         "Filesystem features:      has_journal ext_attr dir_index filetype extent\n")

SETUP = [
    "losetup --find --show --read-only DISK",
    "blkid -p -o value -s PTTYPE /dev/loop0",
    "sfdisk --json /dev/loop0",
    f"losetup --find --show --read-only --offset {MIB} --sizelimit {ROOT_SIZE} DISK",
    "blkid -p -o value -s TYPE /dev/loop1",
    "dumpe2fs -h /dev/loop1",
    "dump -0 -q -f - /dev/loop1",
]
LOOPS = ["/dev/loop0", "/dev/loop1"]
RELEASE = ["losetup --detach /dev/loop1", "losetup --detach /dev/loop0"]


@pytest.fixture
def exported(fake_node: FakeNode, disk0: str) -> FakeNode:
    """disk0 installed; dumpe2fs finds its root clean, dump writes a stream."""
    fake_node.installed(disk0, MIB, ROOT_SIZE)
    fake_node.fake.expect("dumpe2fs", "-h", stdout=CLEAN)
    fake_node.fake.expect("dump", "-0", "-q", "-f", "-")
    return fake_node


def run_export(paths: Paths, disk: str) -> None:
    env = ganeti_env(disk, EXPORT_DISK_PATH=disk, EXPORT_INDEX="0")
    export.run(environment.parse("export", [], env), paths)


def test_export_runs_its_commands_in_order(exported, disk0, paths):
    run_export(paths, disk0)
    assert shown(exported.fake, disk0) == SETUP + RELEASE
    assert exported.leftovers() == []


def test_a_root_in_use_is_refused_before_dump_and_released(exported, disk0, paths):
    exported.fake.expect("dumpe2fs", "-h",
                         stdout=CLEAN.replace("extent", "extent needs_recovery"))
    with pytest.raises(DiskError, match="in use or was not cleanly unmounted"):
        run_export(paths, disk0)
    assert shown(exported.fake, disk0) == SETUP[:-1] + RELEASE
    assert exported.leftovers() == []


@pytest.mark.parametrize("step", range(len(SETUP)), ids=lambda k: SETUP[k].split()[0] + str(k))
def test_a_failed_step_releases_what_was_set_up_in_reverse(exported, disk0, paths, step):
    exported.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_export(paths, disk0)
    assert shown(exported.fake, disk0) == SETUP[:step + 1] + undo(SETUP[:step], LOOPS)
    assert exported.leftovers() == []
    assert os.path.getsize(disk0) == DISK0_MIB * MIB


SIZES = ("Block count:              262144\n"
         "Free blocks:              200000\n"
         "Block size:               4096\n"
         "Inode count:              65536\n"
         "Free inodes:              60000\n"
         "Overhead clusters:        10000\n")


def run_export_with_size_fd(paths: Paths, disk: str) -> int:
    """export with EXP_SIZE_FD, as Ganeti runs it; returns the size it wrote."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader:
        try:
            env = ganeti_env(disk, EXPORT_DISK_PATH=disk, EXPORT_INDEX="0",
                             EXP_SIZE_FD=str(write_fd))
            export.run(environment.parse("export", [], env), paths)
        finally:
            os.close(write_fd)
        return int(reader.read())


def test_the_expected_size_comes_from_the_superblock_without_a_second_pass(
        exported, disk0, paths):
    exported.fake.expect("dumpe2fs", "-h", stdout=CLEAN + SIZES)
    size = run_export_with_size_fd(paths, disk0)
    assert size == (262144 - 200000 - 10000) * 4096 + (65536 - 60000) * 1024 + 2 * 8 * 1024
    assert shown(exported.fake, disk0) == SETUP + RELEASE


def test_a_superblock_without_numbers_has_dump_estimate_the_size_first(exported, disk0, paths):
    exported.fake.expect("dump", "-0", "-S", stdout="123456\n")
    assert run_export_with_size_fd(paths, disk0) == 123456
    assert shown(exported.fake, disk0) == SETUP[:-1] + [
        "dump -0 -S /dev/loop1", "dump -0 -q -f - /dev/loop1"] + RELEASE


# --- data disks (EXPORT_INDEX > 0) ---------------------------------------

DATA_SETUP = [
    "losetup --find --show --read-only DISK",
    "blkid -p -o value -s TYPE /dev/loop0",
]
DATA_RELEASE = ["losetup --detach /dev/loop0"]
TAR_SETUP = DATA_SETUP + [
    "mount -t xfs -o ro,nosuid,nodev,noexec,nouuid /dev/loop0 MNT",
    "tar --format=posix --xattrs --xattrs-include=* --xattrs-exclude=trusted.SGI_ACL_* "
    "--acls --numeric-owner --sparse -C MNT -cf - .",
]


@pytest.fixture
def disk1(tmp_path) -> str:
    """Data disk 1: 8 MiB, sparse, with data in two places."""
    path = tmp_path / "disks" / "disk1.img"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(MIB)
        f.write(b"one" * 1000)
        f.seek(6 * MIB)
        f.write(b"two")
    return str(path)


def run_export_data_disk(paths: Paths, disk0: str, disk1: str, out_path) -> bytes:
    env = ganeti_env(disk0, DISK_COUNT="2", DISK_1_PATH=disk1, EXPORT_INDEX="1",
                     EXPORT_DISK_PATH=disk1)
    with open(out_path, "wb") as out:
        saved = sys.stdout
        sys.stdout = out  # type: ignore[assignment]
        try:
            export.run(environment.parse("export", [], env), paths)
        finally:
            sys.stdout = saved
    with open(out_path, "rb") as f:
        return f.read()


def test_a_data_disk_with_no_filesystem_exports_its_data_raw(fake_node, disk0, disk1,
                                                             paths, tmp_path):
    stream = run_export_data_disk(paths, disk0, disk1, tmp_path / "out")
    assert shown(fake_node.fake, disk1) == DATA_SETUP + DATA_RELEASE
    assert fake_node.leftovers() == []
    assert backupstream.detect(stream[:1024]) == "raw"
    assert backupstream.RawHeader.decode(stream).size == 8 * MIB
    assert len(stream) < MIB  # the holes are left out
    restored = tmp_path / "restored"
    restored.write_bytes(bytes(8 * MIB))
    with open(restored, "r+b") as out:
        rest = tmp_path / "rest"
        rest.write_bytes(stream)
        with open(rest, "rb") as inp:
            backupstream.read_raw(inp.fileno(), b"", out.fileno(), 8 * MIB)
    assert restored.read_bytes() == open(disk1, "rb").read()  # noqa: SIM115


def test_a_data_disk_with_xfs_exports_a_tar_of_its_tree_mounted_read_only(
        fake_node, disk0, disk1, paths, tmp_path):
    fake_node.make_filesystem((os.path.realpath(disk1), 0), "xfs")
    fake_node.fake.expect("tar", "--format=posix")
    run_export_data_disk(paths, disk0, disk1, tmp_path / "out")
    assert shown(fake_node.fake, disk1) == TAR_SETUP + ["umount MNT"] + DATA_RELEASE
    assert fake_node.leftovers() == []


@pytest.mark.parametrize("step", range(len(TAR_SETUP)),
                         ids=lambda k: TAR_SETUP[k].split()[0] + str(k))
def test_a_failed_step_of_a_tar_export_releases_in_reverse(fake_node, disk0, disk1, paths,
                                                            tmp_path, step):
    fake_node.make_filesystem((os.path.realpath(disk1), 0), "xfs")
    fake_node.fake.expect("tar", "--format=posix")
    fake_node.fake.fail_at(step)
    with pytest.raises((CommandError, DiskError)):
        run_export_data_disk(paths, disk0, disk1, tmp_path / "out")
    assert shown(fake_node.fake, disk1) == TAR_SETUP[:step + 1] + undo(TAR_SETUP[:step],
                                                                        ["/dev/loop0"])
    assert fake_node.leftovers() == []


def test_an_unmountable_filesystem_is_refused_saying_why(fake_node, disk0, disk1, paths,
                                                         tmp_path):
    fake_node.make_filesystem((os.path.realpath(disk1), 0), "btrfs")
    fake_node.fake.expect("mount", returncode=32, stderr="wrong fs type, bad superblock")
    with pytest.raises(DiskError, match="not cleanly unmounted .* replaying"):
        run_export_data_disk(paths, disk0, disk1, tmp_path / "out")
    assert fake_node.leftovers() == []
