"""rename composed: every command it runs, in order, and the release after a failure.

rename runs through its entry point (rename.run with the Request parsed
from Ganeti's environment) on a disk file holding what create made (an
msdos table, an ext4 root in partition 1), with every external command
faked (tests/fakenode.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ganeti_debootstrap import environment, rename
from ganeti_debootstrap.errors import CommandError
from ganeti_debootstrap.paths import Paths
from tests.fakenode import DISK0_MIB, FakeNode, ganeti_env, shown, undo
from tests.systemtree import make_tree, write

MIB = 2**20
ROOT_SIZE = (DISK0_MIB - 1) * MIB

# The disk is attached, its table read (blkid says there is one, sfdisk
# where partition 1 is), the partition attached over the file's byte range
# and checked to hold ext4, then mounted without setuid and device nodes.
SETUP = [
    "losetup --find --show DISK",
    "blkid -p -o value -s PTTYPE /dev/loop0",
    "sfdisk --json /dev/loop0",
    f"losetup --find --show --offset {MIB} --sizelimit {ROOT_SIZE} DISK",
    "blkid -p -o value -s TYPE /dev/loop1",
    "mount -t ext4 -o nosuid,nodev /dev/loop1 MNT",
]
LOOPS = ["/dev/loop0", "/dev/loop1"]
RELEASE = ["umount MNT", "losetup --detach /dev/loop1", "losetup --detach /dev/loop0"]


@pytest.fixture
def root(fake_node: FakeNode, disk0: str) -> Path:
    """The files of the instance's root filesystem, named web1.example.org."""
    files = fake_node.installed(disk0, MIB, ROOT_SIZE)
    make_tree(files)
    write(files / "etc/hostname", "web1.example.org\n")
    write(files / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tweb1.example.org\tweb1\n")
    return files


def run_rename(paths: Paths, disk: str) -> None:
    env = ganeti_env(disk, INSTANCE_NAME="web2.example.org",
                     OLD_INSTANCE_NAME="web1.example.org")
    rename.run(environment.parse("rename", [], env), paths)



def test_rename_runs_its_commands_in_order_and_renames_inside_the_root(
        fake_node, disk0, root, paths):
    run_rename(paths, disk0)
    assert shown(fake_node.fake, disk0) == SETUP + RELEASE
    assert fake_node.leftovers() == []
    assert (root / "etc/hostname").read_text() == "web2.example.org\n"
    assert "127.0.1.1\tweb2.example.org web2\n" in (root / "etc/hosts").read_text()


def test_a_refused_rename_changes_nothing_and_releases_in_reverse(
        fake_node, disk0, root, paths):
    write(root / "etc/hostname", "custom\n")
    with pytest.raises(rename.RenameError, match="'custom'"):
        run_rename(paths, disk0)
    assert shown(fake_node.fake, disk0) == SETUP + RELEASE
    assert fake_node.leftovers() == []
    assert (root / "etc/hostname").read_text() == "custom\n"
    assert "web1.example.org" in (root / "etc/hosts").read_text()


@pytest.mark.parametrize("step", range(len(SETUP)), ids=lambda k: SETUP[k].split()[0] + str(k))
def test_a_failed_step_releases_what_was_set_up_in_reverse(fake_node, disk0, root,
                                                           paths, step):
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_rename(paths, disk0)
    assert shown(fake_node.fake, disk0) == SETUP[:step + 1] + undo(SETUP[:step], LOOPS)
    assert fake_node.leftovers() == []
    assert (root / "etc/hostname").read_text() == "web1.example.org\n"
