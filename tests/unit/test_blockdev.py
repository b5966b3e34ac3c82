"""Disk checks and loop devices without root: fake runner, fake sysfs and mounts."""

from __future__ import annotations

import logging
import mmap
import shutil

import pytest

from ganeti_debootstrap import blockdev, mounts
from ganeti_debootstrap.errors import DiskError

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def fake_system(tmp_path, monkeypatch):
    """Empty sysfs and mount table, and no real sleeping."""
    sysfs = tmp_path / "sys"
    (sysfs / "block").mkdir(parents=True)
    (sysfs / "dev" / "block").mkdir(parents=True)
    monkeypatch.setattr(blockdev, "SYS_BLOCK", str(sysfs / "block"))
    monkeypatch.setattr(blockdev, "SYS_DEV_BLOCK", str(sysfs / "dev" / "block"))
    monkeypatch.setattr(blockdev, "PROC_SWAPS", str(tmp_path / "swaps"))
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("27 1 254:0 / / rw - ext4 /dev/vda rw\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(mountinfo))
    slept: list[float] = []
    monkeypatch.setattr(blockdev, "_sleep", slept.append)
    return sysfs, mountinfo, slept


def attach_loop(sysfs, name: str, devnum: str, backing: str) -> None:
    """Make sysfs show loop device ``name`` attached to ``backing``."""
    base = sysfs / "block" / name
    (base / "loop").mkdir(parents=True)
    (base / "loop" / "backing_file").write_text(backing + "\n")
    (base / "dev").write_text(devnum + "\n")
    (sysfs / "dev" / "block" / devnum).mkdir()


def test_missing_disk_is_refused(tmp_path):
    with pytest.raises(DiskError, match="does not exist.*activate-disks"):
        blockdev.check_disk_usable(str(tmp_path / "missing"))


def test_directory_is_refused(tmp_path):
    with pytest.raises(DiskError, match="is a directory"):
        blockdev.check_disk_usable(str(tmp_path))


def test_character_device_is_refused():
    with pytest.raises(DiskError, match="neither a block device nor a regular file"):
        blockdev.check_disk_usable("/dev/null")


def test_unused_disk_file_is_accepted(disk_file):
    blockdev.check_disk_usable(disk_file)


def test_disk_file_mounted_through_a_loop_device_is_refused(fake_system, disk_file):
    sysfs, mountinfo, _ = fake_system
    attach_loop(sysfs, "loop5", "7:5", disk_file)
    with open(mountinfo, "a") as f:
        f.write("40 27 7:5 / /mnt/old rw - ext4 /dev/loop5 rw\n")
    with pytest.raises(DiskError, match="/dev/loop5 is mounted on /mnt/old"):
        blockdev.check_disk_usable(disk_file)


def test_disk_file_whose_partition_is_mounted_is_refused(fake_system, disk_file):
    sysfs, mountinfo, _ = fake_system
    attach_loop(sysfs, "loop5", "7:5", disk_file)
    part = sysfs / "dev" / "block" / "7:5" / "loop5p1"
    part.mkdir()
    (part / "partition").write_text("1\n")
    (part / "dev").write_text("259:3\n")
    with open(mountinfo, "a") as f:
        f.write("40 27 259:3 / /mnt/old rw - ext4 /dev/loop5p1 rw\n")
    with pytest.raises(DiskError, match="in use: /dev/loop5p1 is mounted on /mnt/old"):
        blockdev.check_disk_usable(disk_file)


def test_disk_file_attached_but_unmounted_is_accepted(fake_system, disk_file):
    sysfs, mountinfo, _ = fake_system
    attach_loop(sysfs, "loop5", "7:5", disk_file)
    blockdev.check_disk_usable(disk_file)


def test_minimum_size_is_accepted_exactly():
    blockdev.require_min_size(512 * MIB, 512)


def test_small_disk_message_has_both_sizes():
    with pytest.raises(DiskError) as err:
        blockdev.require_min_size(511 * MIB + MIB // 2, 512)
    assert "511.5 MiB" in str(err.value)
    assert "at least 512 MiB" in str(err.value)


def test_size_of_a_file_is_its_length(disk_file):
    assert blockdev.size_bytes(disk_file) == 600 * MIB
    assert blockdev.logical_sector_size(disk_file) == 512


def test_file_disk_is_attached_to_a_loop_device_and_detached(fake_runner, disk_file):
    fake_runner.expect("losetup", "--find", "--show", stdout="/dev/loop3\n")
    fake_runner.expect("losetup", "--detach")
    with blockdev.attached(disk_file) as dev:
        assert dev == "/dev/loop3"
        assert fake_runner.commands() == [f"losetup --find --show {disk_file}"]
    assert fake_runner.commands()[1:] == ["losetup --detach /dev/loop3"]


def test_read_only_attach_asks_for_a_read_only_loop(fake_runner, disk_file):
    fake_runner.expect("losetup", "--find", "--show", stdout="/dev/loop3\n")
    fake_runner.expect("losetup", "--detach")
    with blockdev.attached(disk_file, read_only=True):
        pass
    assert fake_runner.commands()[0] == f"losetup --find --show --read-only {disk_file}"


def test_block_device_is_used_as_it_is(fake_runner, monkeypatch):
    monkeypatch.setattr(blockdev, "is_block_device", lambda path: True)
    with blockdev.attached("/dev/xenvg/disk0") as dev:
        assert dev == "/dev/xenvg/disk0"
    assert fake_runner.calls == []


def test_offset_loop_device_gets_offset_and_size(fake_runner):
    fake_runner.expect("losetup", "--find", "--show", stdout="/dev/loop4\n")
    fake_runner.expect("losetup", "--detach")
    with blockdev.loop_device("/dev/loop3", offset=1048576, size=627048448):
        pass
    assert fake_runner.commands() == [
        "losetup --find --show --offset 1048576 --sizelimit 627048448 /dev/loop3",
        "losetup --detach /dev/loop4"]


def test_a_loop_attached_by_an_interrupted_losetup_is_detached(fake_runner, fake_system,
                                                                disk_file):
    sysfs = fake_system[0]
    # Someone else's loop on the same file, there before: left alone.
    attach_loop(sysfs, "loop1", "7:1", disk_file)

    def attached_then_interrupted(argv):
        # losetup claimed loop5 for the file, then SIGTERM arrived before
        # its output (the device's name) was read.
        attach_loop(sysfs, "loop5", "7:5", disk_file)
        raise KeyboardInterrupt

    def detached(argv):
        shutil.rmtree(sysfs / "block" / argv[-1].removeprefix("/dev/") / "loop")
    fake_runner.expect("losetup", "--find", "--show", action=attached_then_interrupted)
    fake_runner.expect("losetup", "--detach", action=detached)
    with pytest.raises(KeyboardInterrupt):
        with blockdev.attached(disk_file):
            pytest.fail("the attach was interrupted")
    assert fake_runner.commands()[1:] == ["losetup --detach /dev/loop5"]
    assert blockdev.loops_backed_by(disk_file) == {"/dev/loop1"}


def test_loops_are_matched_to_their_backing_file_through_symlinks(fake_system, disk_file,
                                                                  tmp_path):
    sysfs = fake_system[0]
    attach_loop(sysfs, "loop2", "7:2", disk_file)
    attach_loop(sysfs, "loop3", "7:3", disk_file + ".other")
    (sysfs / "block" / "vda").mkdir()
    link = tmp_path / "link.img"
    link.symlink_to(disk_file)
    assert blockdev.loops_backed_by(str(link)) == {"/dev/loop2"}
    assert blockdev.loops_backed_by(str(tmp_path / "none.img")) == set()


def test_busy_detach_is_retried(fake_runner, fake_system):
    sysfs, _, slept = fake_system
    attach_loop(sysfs, "loop3", "7:3", "/some/file")

    def detached(argv):
        shutil.rmtree(sysfs / "block" / "loop3" / "loop")
    fake_runner.expect("losetup", "--detach", action=detached)
    fake_runner.expect("losetup", "--detach", returncode=1,
                       stderr="losetup: /dev/loop3: detach failed: Device or resource busy",
                       times=2)
    blockdev.detach_loop("/dev/loop3")
    assert fake_runner.commands() == ["losetup --detach /dev/loop3"] * 3
    assert slept == list(blockdev.DETACH_DELAYS[:2])


def test_detach_that_stays_busy_says_how_to_release_it(fake_runner, fake_system):
    attach_loop(fake_system[0], "loop3", "7:3", "/some/file")
    fake_runner.expect("losetup", "--detach", returncode=1, stderr="busy")
    with pytest.raises(DiskError, match="losetup -d /dev/loop3"):
        blockdev.detach_loop("/dev/loop3")
    assert len(fake_runner.calls) == len(blockdev.DETACH_DELAYS) + 1


def test_detach_failure_does_not_replace_the_original_error(fake_runner, disk_file, caplog,
                                                           fake_system):
    attach_loop(fake_system[0], "loop3", "7:3", disk_file)
    fake_runner.expect("losetup", "--find", "--show", stdout="/dev/loop3\n")
    fake_runner.expect("losetup", "--detach", returncode=1, stderr="busy")
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="original"):
        with blockdev.attached(disk_file):
            raise RuntimeError("original")
    assert "detaching /dev/loop3 also failed" in caplog.text


def test_detach_of_a_loop_someone_else_released_is_quiet(fake_runner, fake_system):
    fake_runner.expect("losetup", "--detach", returncode=1,
                       stderr="losetup: /dev/loop3: detach failed: No such device or address")
    blockdev.detach_loop("/dev/loop3")
    assert fake_runner.commands() == ["losetup --detach /dev/loop3"]


def test_deferred_detach_is_waited_for_then_logged(fake_runner, fake_system, monkeypatch,
                                                   caplog):
    sysfs, _, _ = fake_system
    # The kernel accepted the detach but a user still holds the device.
    attach_loop(sysfs, "loop3", "7:3", "/some/file")
    monkeypatch.setattr(blockdev, "DETACH_SETTLE_SECONDS", 0.0)
    fake_runner.expect("losetup", "--detach")
    with caplog.at_level(logging.WARNING):
        blockdev.detach_loop("/dev/loop3")
    assert "/dev/loop3 is still in use" in caplog.text


def test_losetup_printing_no_device_is_an_error(fake_runner, disk_file):
    fake_runner.expect("losetup", "--find", "--show", stdout="\n")
    with pytest.raises(DiskError, match="losetup -a"):
        with blockdev.attached(disk_file):
            pass


def make_holder(sysfs, devnum: str, holder: str, dm_name: str | None) -> None:
    """Make sysfs show ``holder`` built on ``devnum`` (a dm device if ``dm_name``)."""
    base = sysfs / "dev" / "block" / devnum
    (base / "holders").mkdir(parents=True, exist_ok=True)
    target = sysfs / "block" / holder
    (target / "dm").mkdir(parents=True) if dm_name else target.mkdir(parents=True)
    if dm_name:
        (target / "dm" / "name").write_text(dm_name + "\n")
    (base / "holders" / holder).symlink_to(target)


def test_holders_are_named_by_their_device_mapper_names(fake_system):
    sysfs, _, _ = fake_system
    make_holder(sysfs, "253:2", "dm-5", "xenvg-disk0-part1")
    make_holder(sysfs, "253:2", "drbd0", None)
    assert blockdev.holder_names((253, 2)) == ["xenvg-disk0-part1", "drbd0"]
    assert blockdev.holder_names((253, 3)) == []


def test_disk_with_a_holder_is_refused_naming_it_and_the_cleanup(fake_system):
    sysfs, _, _ = fake_system
    make_holder(sysfs, "253:2", "dm-5", "xenvg-disk0-part1")
    with pytest.raises(DiskError, match=r"xenvg-disk0-part1 is built on it\. .*"
                       r"'kpartx -d -p -part /dev/xenvg/disk0'"):
        blockdev._check_no_holders("/dev/xenvg/disk0", (253, 2))
    blockdev._check_no_holders("/dev/xenvg/disk1", (253, 3))


def test_a_disk_file_nobody_has_open_is_known_free_without_reading_proc(disk_file,
                                                                         monkeypatch):
    def no_scan(path):
        raise AssertionError("the /proc scan ran although the kernel said the file is free")
    monkeypatch.setattr(blockdev.procs, "processes_using", no_scan)
    assert blockdev.not_open_elsewhere(disk_file)
    blockdev.check_disk_usable(disk_file)


@pytest.mark.parametrize("how", ["read", "write", "mapping"])
def test_a_disk_file_open_elsewhere_is_not_known_free(disk_file, how):
    with open(disk_file, "rb" if how != "write" else "r+b") as f:
        if how == "mapping":
            with mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ) as _:
                f.close()
                assert not blockdev.not_open_elsewhere(disk_file)
        else:
            assert not blockdev.not_open_elsewhere(disk_file)
    assert blockdev.not_open_elsewhere(disk_file)
