"""export composed: every command it runs, in order, and the release after a failure.

export runs through its entry point (export.run with the Request parsed
from Ganeti's environment) on a disk file holding what create made (an
msdos table, an ext4 root in partition 1), with every external command
faked (tests/fakenode.py). Nothing is mounted: dump reads the root's
device, attached read-only.
"""

from __future__ import annotations

import os

import pytest

from ganeti_debootstrap import environment, export
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
