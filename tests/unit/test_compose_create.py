"""create composed: every command it runs, in order, and the release after a failure.

create runs through its entry point (create.run with the Request parsed
from Ganeti's environment) on a disk file, with every external command
faked (tests/fakenode.py keeps their effects: loop devices, mounts, the
partition table, the filesystems). The bootstrap fills the mounted root
with a small system tree (tests/systemtree.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from ganeti_debootstrap import create, environment, mounts
from ganeti_debootstrap.errors import CommandError, DefinitionError, DiskError
from ganeti_debootstrap.paths import Paths
from tests.fakenode import DISK0_MIB, FakeNode, ganeti_env, shown, undo
from tests.scratch import make_paths
from tests.systemtree import make_tree

MIB = 2**20
DISK_MIB = DISK0_MIB
NO_CACHE = "GENERATE_CACHE=no\nBOOTSTRAP_TOOL=debootstrap\n"

# What create runs on a file disk (msdos table, no cache, no bootloader):
# the table is written on the file itself before any loop device exists,
# then the whole disk and the root partition get a loop device each (the
# partition's over the file's byte range).
SETUP = [
    "dpkg --print-architecture",
    "wipefs --all --force --quiet DISK",
    "sfdisk --quiet --no-reread --no-tell-kernel DISK",
    "losetup --find --show DISK",
    f"losetup --find --show --offset {MIB} --sizelimit {(DISK_MIB - 1) * MIB} DISK",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop1",
    "blkid -p -o value -s UUID /dev/loop1",
    "mount -t ext4 /dev/loop1 MNT",
    "debootstrap trixie MNT",
]
LOOPS = ["/dev/loop0", "/dev/loop1"]
RELEASE = ["umount MNT", "losetup --detach /dev/loop1", "losetup --detach /dev/loop0"]

# With GENERATE_CACHE=yes (CACHE_IMAGE=no: the archive only): the fresh
# bootstrap is archived from the instance's root before it is released;
# the next create unpacks that archive instead of bootstrapping.
CACHE = "CACHE_IMAGE=no\nBOOTSTRAP_TOOL=debootstrap\n"
STORE = ("tar --create --file CACHE/ENTRY.tar.tmp-XXXX --directory MNT --format=posix "
         "--numeric-owner --xattrs --xattrs-include=* --sparse --one-file-system .")
# Ganeti's OS API 5 (options instead of variables): no partition table by
# default, the root is the whole disk; the swap disk is formatted after it.
API5_SETUP = [
    "dpkg --print-architecture",
    "wipefs --all --force --quiet DISK",
    "losetup --find --show DISK",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop0",
    "blkid -p -o value -s UUID /dev/loop0",
    "losetup --find --show SWAP",
    "mkswap -f /dev/loop1",
    "blkid -p -o value -s UUID /dev/loop1",
    "mount -t ext4 /dev/loop0 MNT",
    "debootstrap trixie MNT",
]

# With a hook in CUSTOMIZE_DIR: the API filesystems are mounted inside the
# instance for it, and unmounted deepest first before the root.
HOOK_STEPS = [
    "mount -t proc -o nosuid,nodev,noexec proc MNT/proc",
    "mount -t sysfs -o nosuid,nodev,noexec sysfs MNT/sys",
    "mount --bind --make-private /dev MNT/dev",
    "mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=666 devpts MNT/dev/pts",
    "HOOKS/10-site",
]
UNPACK = ("tar --extract --file CACHE/ENTRY.tar --directory MNT --preserve-permissions "
          "--same-owner --numeric-owner --xattrs --xattrs-include=*")


@pytest.fixture
def disk(disk0: str) -> str:
    return disk0


@pytest.fixture
def debootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BOOTSTRAP_TOOL=debootstrap must be on PATH: a stub (the fake runs instead)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "debootstrap").write_text("#!/bin/sh\nexit 1\n")
    os.chmod(bindir / "debootstrap", 0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


@pytest.fixture
def paths(tmp_path: Path, debootstrap: None) -> Paths:
    return make_paths(tmp_path / "install", defaults=NO_CACHE)


def bootstrapped(argv: Sequence[str]) -> None:
    """What debootstrap leaves in its target directory (the last argument)."""
    make_tree(Path(argv[-1]))


def run_create(paths: Paths, disk: str) -> None:
    create.run(environment.parse("create", [], ganeti_env(disk)), paths)


def shown_with_cache(node: FakeNode, disk: str, paths: Paths) -> list[str]:
    """The commands, the cache entry's name shown as ENTRY, a temporary suffix as XXXX."""
    return [re.sub(r"/cache-[^ /]*?(\.tar)", r"/ENTRY\1", re.sub(r"\.tmp-\w+", ".tmp-XXXX", c))
            for c in shown(node.fake, disk, CACHE=paths.cache_dir)]


def cache_files(paths: Paths) -> list[str]:
    return sorted(n for n in os.listdir(paths.cache_dir) if not n.endswith(".lock"))



def test_create_runs_its_commands_in_order(fake_node, disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create(paths, disk)
    assert shown(fake_node.fake, disk) == SETUP + RELEASE
    assert fake_node.leftovers() == []
    root = fake_node.root_files(disk, MIB)
    assert (root / "etc/hostname").read_text() == "web1.example.org\n"
    uuid = fake_node.filesystems[(os.path.realpath(disk), MIB)].uuid
    assert f"UUID={uuid}\t/\text4" in (root / "etc/fstab").read_text()


@pytest.mark.parametrize("fstype,mkfs,options", [
    ("xfs", "mkfs.xfs -f -q", "nouuid"), ("btrfs", "mkfs.btrfs -f -q", "")])
def test_an_xfs_or_btrfs_root_is_made_by_its_mkfs_and_mounted_with_its_options(
        fake_node, disk, paths, fstype, mkfs, options):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    create.run(environment.parse("create", [], ganeti_env(disk, OSP_FILESYSTEM=fstype)), paths)
    mount = f"mount -t {fstype} -o {options} /dev/loop1 MNT" if options else \
        f"mount -t {fstype} /dev/loop1 MNT"
    assert shown(fake_node.fake, disk) == [
        *SETUP[:5], f"{mkfs} /dev/loop1", SETUP[6], mount, SETUP[8]] + RELEASE
    assert fake_node.leftovers() == []
    uuid = fake_node.filesystems[(os.path.realpath(disk), MIB)].uuid
    fstab = (fake_node.root_files(disk, MIB) / "etc/fstab").read_text()
    assert f"UUID={uuid}\t/\t{fstype}\tdefaults\t0\t0\n" in fstab


@pytest.mark.parametrize("step", range(len(SETUP)), ids=lambda k: SETUP[k].split()[0] + str(k))
def test_a_failed_step_releases_what_was_set_up_in_reverse(fake_node, disk, paths,
                                                           step):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_create(paths, disk)
    assert shown(fake_node.fake, disk) == SETUP[:step + 1] + undo(SETUP[:step], LOOPS)
    assert fake_node.leftovers() == []



def test_a_fresh_bootstrap_is_stored_as_the_cache_then_unpacked_by_the_next_create(
        tmp_path, fake_node, disk, debootstrap):
    paths = make_paths(tmp_path / "install", defaults=CACHE)
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create(paths, disk)
    first = fake_node.fake.faked
    assert shown_with_cache(fake_node, disk, paths) == SETUP + [STORE] + RELEASE
    assert [n for n in cache_files(paths) if n.endswith(".tar")], "no archive stored"
    run_create(paths, disk)
    assert shown_with_cache(fake_node, disk, paths)[first:] == SETUP[:-1] + [UNPACK] + RELEASE
    assert fake_node.leftovers() == []
    root = fake_node.root_files(disk, MIB)
    assert (root / "etc/hostname").read_text() == "web1.example.org\n"
    assert (root / "usr/lib/systemd/systemd").exists(), "the archive was not unpacked"


def origin_of(fake_node: FakeNode, disk: str) -> dict:
    path = fake_node.root_files(disk, MIB) / "etc/ganeti-instance-debootstrap/origin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    return json.loads(path.read_text())


def test_the_instance_records_the_cache_entry_it_came_from(
        tmp_path, fake_node, disk, debootstrap, caplog):
    paths = make_paths(tmp_path / "install", defaults=CACHE)
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    with caplog.at_level(logging.INFO):
        run_create(paths, disk)
    first = origin_of(fake_node, disk)
    entry = [n for n in cache_files(paths) if n.endswith(".tar")][0][:-len(".tar")]
    assert first["source"] == "bootstrap" and first["entry"] == entry
    assert first["bootstrapped"] and first["created"] is None
    assert f"its system bootstrapped {first['bootstrapped']}, kept as the cache {entry}" \
        in caplog.text
    with open(os.path.join(paths.cache_dir, entry + ".inputs.json")) as f:
        record = json.load(f)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_create(paths, disk)
    warm = origin_of(fake_node, disk)
    assert warm == {**warm, "source": "cache archive", "entry": entry,
                    "suite": "trixie", "arch": "amd64", "mirror": "", "components": [],
                    "extra_pkgs": [], "tool": "debootstrap",
                    "created": record["created"], "refreshed": None}
    assert "bootstrapped" not in warm
    assert (f"its system from the cache archive {entry} (made {record['created']}, "
            f"last refreshed never)") in caplog.text


def test_an_instance_bootstrapped_without_a_cache_says_so(fake_node, disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create(paths, disk)
    origin = origin_of(fake_node, disk)
    assert origin["source"] == "bootstrap" and origin["entry"] is None
    assert origin["bootstrapped"].endswith("Z") and origin["suite"] == "trixie"


def test_a_cache_that_cannot_be_stored_leaves_nothing_and_the_create_completes(
        tmp_path, fake_node, disk, debootstrap, caplog):
    paths = make_paths(tmp_path / "install", defaults=CACHE)
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.fail_at(len(SETUP))
    with caplog.at_level(logging.WARNING):
        run_create(paths, disk)
    assert shown_with_cache(fake_node, disk, paths) == SETUP + [STORE] + RELEASE
    assert "Could not store the bootstrap cache" in caplog.text
    assert cache_files(paths) == []
    assert fake_node.leftovers() == []


@pytest.mark.parametrize("step", range(len(SETUP)), ids=lambda k: SETUP[k].split()[0] + str(k))
def test_a_failed_step_of_a_create_from_the_cache_releases_in_reverse(
        tmp_path, fake_node, disk, debootstrap, step):
    """As above, with the cache's unpacking in place of the bootstrap."""
    paths = make_paths(tmp_path / "install", defaults=CACHE)
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create(paths, disk)
    first = fake_node.fake.faked
    steps = SETUP[:-1] + [UNPACK]
    fake_node.fake.fail_at(first + step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_create(paths, disk)
    assert shown_with_cache(fake_node, disk, paths)[first:] == (
        steps[:step + 1] + undo(steps[:step], LOOPS))
    assert fake_node.leftovers() == []
    assert [n for n in cache_files(paths) if n.endswith(".tar")], "the cache was removed"



@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    """A CUSTOMIZE_DIR holding one hook (the fake runs in its place)."""
    directory = tmp_path / "hooks"
    directory.mkdir(mode=0o755)
    (directory / "10-site").write_text("#!/bin/sh\n")
    os.chmod(directory / "10-site", 0o755)
    return directory


def test_hooks_run_with_the_api_filesystems_mounted_then_unmounted_deepest_first(
        tmp_path, fake_node, disk, debootstrap, hooks):
    paths = make_paths(tmp_path / "install", defaults=NO_CACHE + f"CUSTOMIZE_DIR={hooks}\n")
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.expect(str(hooks / "10-site"))
    run_create(paths, disk)
    assert shown(fake_node.fake, disk, HOOKS=str(hooks)) == SETUP + HOOK_STEPS + [
        "umount MNT/dev/pts", "umount MNT/dev", "umount MNT/sys", "umount MNT/proc",
    ] + RELEASE
    assert fake_node.leftovers() == []


@pytest.mark.parametrize("step", range(len(HOOK_STEPS)),
                         ids=lambda k: HOOK_STEPS[k].split()[0] + str(k))
def test_a_failed_step_of_the_hooks_releases_what_was_set_up_in_reverse(
        tmp_path, fake_node, disk, debootstrap, hooks, step):
    paths = make_paths(tmp_path / "install", defaults=NO_CACHE + f"CUSTOMIZE_DIR={hooks}\n")
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.expect(str(hooks / "10-site"))
    fake_node.fake.fail_at(len(SETUP) + step)
    # A failed hook is a HookError naming it; a failed mount, a CommandError.
    with pytest.raises(DefinitionError, match="exit status 1"):
        run_create(paths, disk)
    steps = SETUP + HOOK_STEPS
    assert shown(fake_node.fake, disk, HOOKS=str(hooks)) == (
        steps[:len(SETUP) + step + 1] + undo(steps[:len(SETUP) + step], LOOPS))
    assert fake_node.leftovers() == []


def test_a_root_that_cannot_be_unmounted_is_reported_and_the_loops_still_released(
        fake_node, disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.expect("umount", returncode=1, stderr="umount: target is busy.")
    with pytest.raises(DiskError, match="Cannot unmount .*target is busy"):
        run_create(paths, disk)
    tries = 1 + len(mounts.UNMOUNT_DELAYS)
    assert shown(fake_node.fake, disk) == SETUP + ["umount MNT"] * tries + RELEASE[1:]
    assert fake_node.loops == {}



@pytest.fixture
def swap(tmp_path: Path, disk: str) -> str:
    path = tmp_path / "disks" / "swap.img"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    return str(path)


def run_create_api5(paths: Paths, disk: str, swap: str) -> None:
    argv = ["-i", "web1.example.org", "-b", disk, "-s", swap]
    create.run(environment.parse("create", argv, {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}),
               paths)


def test_an_api5_create_formats_root_then_swap_and_releases_swap_first(
        fake_node, disk, swap, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create_api5(paths, disk, swap)
    assert shown(fake_node.fake, disk, SWAP=swap) == API5_SETUP + [
        "umount MNT", "losetup --detach /dev/loop1", "losetup --detach /dev/loop0"]
    assert fake_node.leftovers() == []
    fstab = (fake_node.root_files(disk, 0) / "etc/fstab").read_text()
    swap_uuid = fake_node.filesystems[(os.path.realpath(swap), 0)].uuid
    assert f"UUID={swap_uuid}\tnone\tswap" in fstab


@pytest.mark.parametrize("step", range(len(API5_SETUP)),
                         ids=lambda k: API5_SETUP[k].split()[0] + str(k))
def test_a_failed_step_of_an_api5_create_releases_in_reverse(fake_node, disk, swap, paths,
                                                              step):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_create_api5(paths, disk, swap)
    assert shown(fake_node.fake, disk, SWAP=swap) == (
        API5_SETUP[:step + 1] + undo(API5_SETUP[:step], LOOPS))
    assert fake_node.leftovers() == []


# --- swap (OS parameter swap) and data disks (data_disks=format) ------------------

SWAP_MIB = 64
# msdos with swap=64M: the root partition ends where the swap partition,
# the disk's last 64 MiB, starts; the swap partition gets a loop device
# over its byte range only while mkswap writes it.
SWAP_SETUP = [
    "dpkg --print-architecture",
    "wipefs --all --force --quiet DISK",
    "sfdisk --quiet --no-reread --no-tell-kernel DISK",
    "losetup --find --show DISK",
    f"losetup --find --show --offset {MIB} --sizelimit {(DISK_MIB - 1 - SWAP_MIB) * MIB} DISK",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop1",
    "blkid -p -o value -s UUID /dev/loop1",
    f"losetup --find --show --offset {(DISK_MIB - SWAP_MIB) * MIB} "
    f"--sizelimit {SWAP_MIB * MIB} DISK",
    "mkswap -f /dev/loop2",
    "blkid -p -o value -s UUID /dev/loop2",
    "losetup --detach /dev/loop2",
    "mount -t ext4 /dev/loop1 MNT",
    "debootstrap trixie MNT",
]
SWAP_LOOPS = ["/dev/loop0", "/dev/loop1", "/dev/loop2"]


def run_create_with(paths: Paths, disk: str, **variables: str) -> None:
    create.run(environment.parse("create", [], ganeti_env(disk, **variables)), paths)


def failing_steps(steps: Sequence[str]) -> list[int]:
    """The steps to fail in turn: all but a detach (retried, so it does not fail)."""
    return [k for k, step in enumerate(steps) if not step.startswith("losetup --detach")]


def test_swap_makes_a_swap_partition_at_the_end_named_in_fstab(fake_node, disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create_with(paths, disk, OSP_SWAP=f"{SWAP_MIB}M")
    assert shown(fake_node.fake, disk) == SWAP_SETUP + RELEASE
    assert fake_node.leftovers() == []
    table = fake_node.tables[(os.path.realpath(disk), 0)]
    assert table.splitlines()[-1] == (f"start={(DISK_MIB - SWAP_MIB) * 2048}, "
                                      f"size={SWAP_MIB * 2048}, type=82")
    swap = fake_node.filesystems[(os.path.realpath(disk), (DISK_MIB - SWAP_MIB) * MIB)]
    assert swap.fstype == "swap"
    fstab = (fake_node.root_files(disk, MIB) / "etc/fstab").read_text()
    assert f"UUID={swap.uuid}\tnone\tswap\tsw\t0\t0" in fstab.splitlines()


@pytest.mark.parametrize("step", failing_steps(SWAP_SETUP),
                         ids=lambda k: SWAP_SETUP[k].split()[0] + str(k))
def test_a_failed_step_of_a_create_with_swap_releases_in_reverse(fake_node, disk, paths,
                                                                  step):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_create_with(paths, disk, OSP_SWAP=f"{SWAP_MIB}M")
    assert shown(fake_node.fake, disk) == (
        SWAP_SETUP[:step + 1] + undo(SWAP_SETUP[:step], SWAP_LOOPS))
    assert fake_node.leftovers() == []


SWAP_FILE_SETUP = [
    "dpkg --print-architecture",
    "wipefs --all --force --quiet DISK",
    "losetup --find --show DISK",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop0",
    "blkid -p -o value -s UUID /dev/loop0",
    "mount -t ext4 /dev/loop0 MNT",
    "debootstrap trixie MNT",
    "mkswap -f MNT/swapfile",
    "blkid -p -o value -s UUID MNT/swapfile",
]


def test_swap_without_partition_table_is_a_swap_file_in_the_root(tmp_path, fake_node, disk,
                                                                  debootstrap):
    paths = make_paths(tmp_path / "install", defaults=NO_CACHE + "PARTITION_STYLE=none\n")
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create_with(paths, disk, OSP_SWAP="8M")
    assert shown(fake_node.fake, disk) == SWAP_FILE_SETUP + [
        "umount MNT", "losetup --detach /dev/loop0"]
    assert fake_node.leftovers() == []
    root = fake_node.root_files(disk, 0)
    st = (root / "swapfile").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 8 * MIB
    assert "/swapfile\tnone\tswap\tsw\t0\t0" in (root / "etc/fstab").read_text().splitlines()
    assert not [t for t in fake_node.tables if t[0] == os.path.realpath(disk)]


@pytest.fixture
def data_disk(tmp_path: Path) -> str:
    path = tmp_path / "disks" / "data1.img"
    with open(path, "wb") as f:
        f.truncate(128 * MIB)
    return str(path)


# data_disks=format: disk 1 is formatted whole (attached only meanwhile)
# before disk 0 is touched, then create goes on as without it.
DATA_SETUP = [
    "dpkg --print-architecture",
    "losetup --find --show DATA1",
    "wipefs --all --force --quiet /dev/loop0",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop0",
    "blkid -p -o value -s UUID /dev/loop0",
    "losetup --detach /dev/loop0",
    *SETUP[1:],
]
DATA_LOOPS = ["/dev/loop0", *LOOPS]
DATA_VARIABLES = {"DISK_COUNT": "2", "DISK_1_ACCESS": "rw", "OSP_DATA_DISKS": "format"}


def test_data_disks_are_formatted_first_and_mounted_by_uuid_with_nofail(
        fake_node, disk, data_disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create_with(paths, disk, DISK_1_PATH=data_disk, **DATA_VARIABLES)
    assert shown(fake_node.fake, disk, DATA1=data_disk) == DATA_SETUP + RELEASE
    assert fake_node.leftovers() == []
    data = fake_node.filesystems[(os.path.realpath(data_disk), 0)]
    assert data.fstype == "ext4"
    assert not [t for t in fake_node.tables if t[0] == os.path.realpath(data_disk)]
    root = fake_node.root_files(disk, MIB)
    assert (f"UUID={data.uuid}\t/srv/disk1\text4\tdefaults,nofail\t0\t2"
            in (root / "etc/fstab").read_text().splitlines())
    assert (root / "srv/disk1").is_dir()


@pytest.mark.parametrize("step", failing_steps(DATA_SETUP),
                         ids=lambda k: DATA_SETUP[k].split()[0] + str(k))
def test_a_failed_step_of_a_create_with_data_disks_releases_in_reverse(
        fake_node, disk, data_disk, paths, step):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_create_with(paths, disk, DISK_1_PATH=data_disk, **DATA_VARIABLES)
    assert shown(fake_node.fake, disk, DATA1=data_disk) == (
        DATA_SETUP[:step + 1] + undo(DATA_SETUP[:step], DATA_LOOPS))
    assert fake_node.leftovers() == []


def test_a_mounted_data_disk_is_refused_before_any_disk_is_touched(
        fake_node, disk, data_disk, paths):
    # The data disk's file attached and mounted on the node.
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.losetup(["losetup", "--find", "--show", data_disk])
    fake_node.mounted["/mnt/elsewhere"] = (os.path.realpath(data_disk), 0)
    fake_node.write_mountinfo()
    with pytest.raises(DiskError, match=f"{data_disk} is in use: .* mounted on /mnt/elsewhere"):
        run_create_with(paths, disk, DISK_1_PATH=data_disk, **DATA_VARIABLES)
    assert shown(fake_node.fake, disk) == ["dpkg --print-architecture"]


def test_a_too_small_data_disk_is_refused_before_any_disk_is_touched(
        fake_node, disk, data_disk, paths):
    os.truncate(data_disk, 16 * MIB)
    with pytest.raises(DiskError, match="Data disk 1 .* is 16 MiB .* at least 64 MiB"):
        run_create_with(paths, disk, DISK_1_PATH=data_disk, **DATA_VARIABLES)
    assert shown(fake_node.fake, disk) == ["dpkg --print-architecture"]
    assert fake_node.leftovers() == []


def test_swap_leaving_the_root_no_room_is_refused_before_any_disk_is_touched(
        fake_node, disk, paths):
    with pytest.raises(DiskError, match="swap: 900 MiB.* leaves 123 MiB"):
        run_create_with(paths, disk, OSP_SWAP="900M")
    assert shown(fake_node.fake, disk) == ["dpkg --print-architecture"]


def test_a_reinstall_keeps_a_data_disk_holding_the_filesystem_asked_for(
        fake_node, disk, data_disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    kept = fake_node.make_filesystem((os.path.realpath(data_disk), 0), "ext4")
    (kept.files / "database").write_text("the instance's data")
    run_create_with(paths, disk, DISK_1_PATH=data_disk, INSTANCE_REINSTALL="1",
                    **DATA_VARIABLES)
    assert shown(fake_node.fake, disk, DATA1=data_disk) == [
        "dpkg --print-architecture",
        "blkid -p -o value -s TYPE DATA1",
        "blkid -p -o value -s UUID DATA1",
        *SETUP[1:], *RELEASE]
    assert (kept.files / "database").read_text() == "the instance's data"
    root = fake_node.root_files(disk, MIB)
    assert (f"UUID={kept.uuid}\t/srv/disk1\text4\tdefaults,nofail\t0\t2"
            in (root / "etc/fstab").read_text().splitlines())


def test_a_reinstall_formats_a_data_disk_of_another_type(fake_node, disk, data_disk, paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.make_filesystem((os.path.realpath(data_disk), 0), "ext2")
    run_create_with(paths, disk, DISK_1_PATH=data_disk, INSTANCE_REINSTALL="1",
                    **DATA_VARIABLES)
    assert shown(fake_node.fake, disk, DATA1=data_disk)[:3] == [
        "dpkg --print-architecture", "blkid -p -o value -s TYPE DATA1",
        "losetup --find --show DATA1"]
    assert fake_node.filesystems[(os.path.realpath(data_disk), 0)].fstype == "ext4"


def test_a_reinstall_formats_a_data_disk_whose_uuid_is_not_one(fake_node, disk, data_disk,
                                                                paths):
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    fake_node.make_filesystem((os.path.realpath(data_disk), 0), "ext4").uuid = "x\nnone"
    run_create_with(paths, disk, DISK_1_PATH=data_disk, INSTANCE_REINSTALL="1",
                    **DATA_VARIABLES)
    assert shown(fake_node.fake, disk, DATA1=data_disk)[1:4] == [
        "blkid -p -o value -s TYPE DATA1", "blkid -p -o value -s UUID DATA1",
        "losetup --find --show DATA1"]
    fstab = (fake_node.root_files(disk, MIB) / "etc/fstab").read_text()
    assert "x\nnone" not in fstab


def test_a_data_disks_filesystem_gets_ganetis_uuid_of_the_disk(
        fake_node, disk, data_disk, paths):
    """So that import can name it in fstab before the disk is restored."""
    ganeti_uuid = "6F1C6A3E-0B7D-4E1A-9C61-2B3D4E5F6A7B"
    fake_node.fake.expect("debootstrap", action=bootstrapped)
    run_create_with(paths, disk, DISK_1_PATH=data_disk, DISK_1_UUID=ganeti_uuid,
                    **DATA_VARIABLES)
    mkfs = [line for line in shown(fake_node.fake, disk, DATA1=data_disk)
            if line.startswith("mke2fs") and "/dev/loop0" in line]
    assert mkfs == [f"mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 "
                    f"-U {ganeti_uuid.lower()} /dev/loop0"]
