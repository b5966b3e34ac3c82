"""Partition tables and partition mapping without root, through the fake runner."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from ganeti_debootstrap import blockdev, environment, instance_disk, partitions
from ganeti_debootstrap.errors import CommandError, DiskError
from ganeti_debootstrap.settings import PartitionStyle, Settings
from tests.fakenode import ganeti_env

MIB = 1024 * 1024
DISK = 600 * MIB
SECTORS = DISK // 512


@pytest.fixture(autouse=True)
def no_devices(tmp_path, monkeypatch):
    """No real device is opened, slept on or looked up in sysfs."""
    monkeypatch.setattr(blockdev, "logical_sector_size", lambda dev: 512)
    monkeypatch.setattr(blockdev, "SYS_BLOCK", str(tmp_path / "no-sysfs"))
    monkeypatch.setattr(blockdev, "_sleep", lambda s: None)
    monkeypatch.setattr(partitions, "_sleep", lambda s: None)
    monkeypatch.setattr(partitions, "device_mapper_available", lambda: False)


@pytest.fixture
def mapper(tmp_path, monkeypatch) -> str:
    """A node with device-mapper; mapping nodes appear in a temporary dir."""
    path = tmp_path / "mapper"
    path.mkdir()
    monkeypatch.setattr(partitions, "MAPPER_DIR", str(path))
    monkeypatch.setattr(partitions, "device_mapper_available", lambda: True)
    monkeypatch.setattr(partitions, "kpartx_installed", lambda: True)
    return str(path)


def test_msdos_partition_spans_the_disk_from_the_alignment():
    layout = partitions.plan("msdos", 2048, DISK)
    assert layout == partitions.Layout("msdos", 2048, SECTORS - 2048, 512)
    assert layout.offset_bytes == MIB
    assert layout.size_bytes == DISK - MIB


def test_gpt_partition_leaves_the_last_33_sectors_for_the_backup_table():
    layout = partitions.plan("gpt", 4096, DISK)
    assert layout.start_sector == 4096
    assert layout.start_sector + layout.size_sectors == SECTORS - 33


def test_whole_disk_layout_starts_at_zero():
    assert partitions.plan("none", 2048, DISK) == partitions.Layout("none", 0, SECTORS, 512)


def test_alignment_counts_512_byte_sectors_on_4k_disks():
    layout = partitions.plan("gpt", 2048, DISK, sector_size=4096)
    assert layout.start_sector == 256
    assert layout.offset_bytes == MIB
    # 4 sectors of entries and a header at the end.
    assert layout.start_sector + layout.size_sectors == DISK // 4096 - 5


def test_alignment_not_a_whole_4k_sector_is_refused():
    with pytest.raises(DiskError, match="PARTITION_ALIGNMENT=63"):
        partitions.plan("msdos", 63, DISK, sector_size=4096)


@pytest.mark.parametrize("style,alignment", [("msdos", 0), ("gpt", 33)])
def test_alignment_inside_the_table_is_refused(style, alignment):
    with pytest.raises(DiskError, match=f"PARTITION_ALIGNMENT={alignment}.*inside"):
        partitions.plan(style, alignment, DISK)


def test_smallest_alignments_the_tables_allow_are_accepted():
    assert partitions.plan("msdos", 1, DISK).start_sector == 1
    assert partitions.plan("gpt", 34, DISK).start_sector == 34


def test_alignment_leaving_too_little_is_refused_with_sizes():
    with pytest.raises(DiskError) as err:
        partitions.plan("msdos", 200 * 2048, DISK)
    message = str(err.value)
    assert "leaves 400 MiB" in message
    assert f"at least {partitions.MIN_PARTITION_MIB} MiB" in message


def test_alignment_beyond_the_disk_is_refused():
    with pytest.raises(DiskError, match="leaves 0 MiB"):
        partitions.plan("gpt", SECTORS + 8, DISK)


def test_minimum_disk_with_default_alignment_fits():
    styles: tuple[PartitionStyle, ...] = ("msdos", "gpt")
    for style in styles:
        partitions.plan(style, 2048, blockdev.MIN_DISK_MIB * MIB)


def test_msdos_cannot_address_beyond_2_tib():
    with pytest.raises(DiskError, match="PARTITION_STYLE=gpt"):
        partitions.plan("msdos", 2048, 3 * 1024**4)
    partitions.plan("gpt", 2048, 3 * 1024**4)


def test_msdos_script_makes_one_bootable_linux_partition():
    script = partitions.sfdisk_script(partitions.Layout("msdos", 2048, 1226752))
    assert script == ("label: dos\nunit: sectors\n\n"
                      "start=2048, size=1226752, type=83, bootable\n")


@pytest.mark.parametrize("arch,guid", [
    ("amd64", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
    ("arm64", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
    ("mips64el", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    ("", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
])
def test_gpt_script_uses_the_root_type_of_the_architecture(arch, guid):
    script = partitions.sfdisk_script(partitions.Layout("gpt", 2048, 1226719), arch)
    assert script == ("label: gpt\nunit: sectors\nfirst-lba: 34\n\n"
                      f"start=2048, size=1226719, type={guid}\n")


def test_whole_disk_style_only_erases_old_signatures(fake_runner):
    fake_runner.expect("wipefs")
    layout = partitions.write_table("/dev/loop0", "none", 2048, DISK)
    assert fake_runner.commands() == ["wipefs --all --force --quiet /dev/loop0"]
    assert layout.style == "none"


@pytest.mark.parametrize("style", ["msdos", "gpt"])
def test_table_is_written_without_telling_the_kernel(fake_runner, style):
    fake_runner.expect("wipefs")
    fake_runner.expect("sfdisk")
    layout = partitions.write_table("/dev/loop0", style, 2048, DISK, "amd64")
    assert fake_runner.commands() == [
        "wipefs --all --force --quiet /dev/loop0",
        "sfdisk --quiet --no-reread --no-tell-kernel /dev/loop0"]
    assert fake_runner.stdins[1] == partitions.sfdisk_script(layout, "amd64").encode()


def test_refused_alignment_writes_nothing(fake_runner):
    with pytest.raises(DiskError):
        partitions.write_table("/dev/loop0", "msdos", SECTORS, DISK)
    assert fake_runner.calls == []


def sfdisk_json(label: str, start: int, size: int, sector_size: int = 512) -> str:
    return json.dumps({"partitiontable": {
        "label": label, "id": "0x1234", "device": "/dev/loop0", "unit": "sectors",
        "sectorsize": sector_size,
        "partitions": [{"node": "/dev/loop0p1", "start": start, "size": size,
                        "type": "83", "bootable": True}]}})


@pytest.mark.parametrize("label,style", [("dos", "msdos"), ("gpt", "gpt")])
def test_layout_is_read_from_the_partition_table(fake_runner, label, style):
    fake_runner.expect("blkid", stdout=label + "\n")
    fake_runner.expect("sfdisk", "--json", stdout=sfdisk_json(label, 4096, 1224704))
    assert partitions.read_layout("/dev/loop0") == partitions.Layout(style, 4096, 1224704)
    assert fake_runner.commands() == [
        "blkid -p -o value -s PTTYPE /dev/loop0", "sfdisk --json /dev/loop0"]


def test_disk_without_table_but_with_filesystem_is_whole_disk(fake_runner, monkeypatch):
    monkeypatch.setattr(blockdev, "size_bytes", lambda dev: DISK)
    fake_runner.expect("blkid", "-p", "-o", "value", "-s", "PTTYPE", returncode=2)
    fake_runner.expect("blkid", "-p", "-o", "value", "-s", "TYPE", stdout="ext4\n")
    assert partitions.read_layout("/dev/loop0") == partitions.Layout("none", 0, SECTORS)
    assert fake_runner.commands() == [
        "blkid -p -o value -s PTTYPE /dev/loop0", "blkid -p -o value -s TYPE /dev/loop0"]


def test_disk_with_neither_table_nor_filesystem_is_refused(fake_runner):
    fake_runner.expect("blkid", returncode=2)
    with pytest.raises(DiskError, match="neither a partition table nor a filesystem"):
        partitions.read_layout("/dev/loop0")


def test_unsupported_table_is_refused(fake_runner):
    fake_runner.expect("blkid", stdout="sun\n")
    fake_runner.expect("sfdisk", "--json", stdout=sfdisk_json("sun", 0, 100))
    with pytest.raises(DiskError, match="sun partition table"):
        partitions.read_layout("/dev/loop0")


def test_whole_disk_layout_maps_nothing(fake_runner):
    with partitions.mapped_root("/dev/loop0", partitions.Layout("none", 0, SECTORS)) as dev:
        assert dev == "/dev/loop0"
    assert fake_runner.calls == []


def test_without_device_mapper_the_partition_is_an_offset_loop_device(fake_runner):
    fake_runner.expect("losetup", "--find", "--show", stdout="/dev/loop1\n")
    fake_runner.expect("losetup", "--detach")
    layout = partitions.Layout("msdos", 2048, SECTORS - 2048)
    with partitions.mapped_root("/dev/loop0", layout) as dev:
        assert dev == "/dev/loop1"
    assert fake_runner.commands() == [
        f"losetup --find --show --offset {MIB} --sizelimit {DISK - MIB} /dev/loop0",
        "losetup --detach /dev/loop1"]


def test_with_device_mapper_the_partition_is_a_kpartx_mapping(fake_runner, mapper):
    fake_runner.expect("kpartx", "-l", stdout="loop0-part1 : 0 1226752 /dev/loop0 2048\n")
    fake_runner.expect("kpartx", "-a",
                       action=lambda argv: open(os.path.join(mapper, "loop0-part1"), "w").close())
    fake_runner.expect("kpartx", "-d")
    layout = partitions.Layout("msdos", 2048, SECTORS - 2048)
    with partitions.mapped_root("/dev/loop0", layout) as dev:
        assert dev == os.path.join(mapper, "loop0-part1")
    assert fake_runner.commands() == [
        "kpartx -l -p -part /dev/loop0",
        "kpartx -a -s -p -part /dev/loop0",
        "kpartx -d -p -part /dev/loop0"]


def test_with_device_mapper_but_no_kpartx_the_partition_is_an_offset_loop_device(
        fake_runner, mapper, monkeypatch, caplog):
    monkeypatch.setattr(partitions, "kpartx_installed", lambda: False)
    fake_runner.expect("losetup", "--find", "--show", stdout="/dev/loop1\n")
    fake_runner.expect("losetup", "--detach")
    layout = partitions.Layout("msdos", 2048, SECTORS - 2048)
    with caplog.at_level("INFO", logger="ganeti_debootstrap"):
        with partitions.mapped_root("/dev/xenvg/disk0", layout) as dev:
            assert dev == "/dev/loop1"
    assert fake_runner.commands() == [
        f"losetup --find --show --offset {MIB} --sizelimit {DISK - MIB} /dev/xenvg/disk0",
        "losetup --detach /dev/loop1"]
    assert "Partition 1 of /dev/xenvg/disk0: /dev/loop1 (offset loop device)" in caplog.text


def test_kpartx_installed_looks_on_the_scripts_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not partitions.kpartx_installed()
    program = tmp_path / "kpartx"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert partitions.kpartx_installed()


def test_kpartx_name_comes_from_kpartx_for_lvm_volumes(fake_runner, mapper):
    # kpartx names partitions of a device-mapper device after its dm name.
    name = "xenvg-0a1b.disk0-part1"
    fake_runner.expect("kpartx", "-l", stdout=f"{name} : 0 1226752 /dev/dm-3 2048\n")
    fake_runner.expect("kpartx", "-a",
                       action=lambda argv: open(os.path.join(mapper, name), "w").close())
    fake_runner.expect("kpartx", "-d")
    layout = partitions.Layout("gpt", 2048, 1000)
    with partitions.mapped_root("/dev/xenvg/0a1b.disk0", layout, read_only=True) as dev:
        assert dev == os.path.join(mapper, name)
    assert fake_runner.commands()[1] == "kpartx -a -s -r -p -part /dev/xenvg/0a1b.disk0"


def test_failed_kpartx_add_still_removes_partial_mappings(fake_runner, mapper):
    fake_runner.expect("kpartx", "-l", stdout="loop0-part1 : 0 1226752 /dev/loop0 2048\n")
    fake_runner.expect("kpartx", "-a", returncode=1, stderr="device-mapper: create ioctl failed")
    fake_runner.expect("kpartx", "-d")
    with pytest.raises(CommandError, match="create ioctl failed"):
        with partitions.mapped_root("/dev/loop0", partitions.Layout("msdos", 2048, 1000)):
            pass
    assert fake_runner.commands()[-1] == "kpartx -d -p -part /dev/loop0"


def test_busy_kpartx_delete_is_retried(fake_runner, mapper):
    fake_runner.expect("kpartx", "-l", stdout="loop0-part1 : 0 1226752 /dev/loop0 2048\n")
    fake_runner.expect("kpartx", "-a",
                       action=lambda argv: open(os.path.join(mapper, "loop0-part1"), "w").close())
    fake_runner.expect("kpartx", "-d")
    fake_runner.expect("kpartx", "-d", returncode=1, stderr="map in use", times=2)
    with partitions.mapped_root("/dev/loop0", partitions.Layout("msdos", 2048, 1000)):
        pass
    assert fake_runner.commands()[2:] == ["kpartx -d -p -part /dev/loop0"] * 3


def test_kpartx_without_partition_1_is_refused(fake_runner, mapper):
    fake_runner.expect("kpartx", "-l", stdout="")
    with pytest.raises(DiskError, match="no partition 1"):
        with partitions.mapped_root("/dev/loop0", partitions.Layout("msdos", 2048, 1000)):
            pass
    assert fake_runner.commands() == ["kpartx -l -p -part /dev/loop0"]


def create_disk(disk: str, fstype: str = "ext4") -> None:
    """The device part of create and import, composed as they compose it
    (instance_disk.format_disk): the table written on the disk itself, then
    the disk attached and its root partition mapped (for a disk file, a
    loop device over the partition's byte range), then mkfs.
    """
    request = environment.parse("create", [], ganeti_env(disk))
    with contextlib.ExitStack() as stack:
        instance_disk.format_disk(stack, request, Settings(), fstype, "amd64")


def test_mkfs_failure_releases_offset_loop_then_disk_loop(fake_node, disk_file):
    fake_node.fake.expect("mke2fs", returncode=1, stderr="mke2fs: No space left on device")
    with pytest.raises(CommandError, match="No space left"):
        create_disk(disk_file)
    assert fake_node.fake.commands() == [
        f"wipefs --all --force --quiet {disk_file}",
        f"sfdisk --quiet --no-reread --no-tell-kernel {disk_file}",
        f"losetup --find --show {disk_file}",
        f"losetup --find --show --offset {MIB} --sizelimit {DISK - MIB} {disk_file}",
        "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop1",
        "losetup --detach /dev/loop1",
        "losetup --detach /dev/loop0",
    ]
    assert fake_node.loops == {}


def test_mkfs_failure_removes_kpartx_mapping_of_a_block_device(fake_node, disk_file, mapper,
                                                               monkeypatch):
    # A block device (an LVM volume, a DRBD device) is partitioned through
    # kpartx where the node has device-mapper; it is used as it is, with
    # no loop device of its own. The kernel's answer is faked for the file.
    monkeypatch.setattr(blockdev, "is_block_device", lambda path: True)
    fake_node.fake.expect("kpartx", "-l", stdout="disk.img-part1 : 0 1226752 disk 2048\n")
    fake_node.fake.expect("kpartx", "-a",
                          action=lambda argv: open(os.path.join(mapper, "disk.img-part1"),
                                                   "w").close())
    fake_node.fake.expect("kpartx", "-d")
    fake_node.fake.expect("mke2fs", returncode=1, stderr="mke2fs: Device or resource busy")
    with pytest.raises(CommandError, match="resource busy"):
        create_disk(disk_file)
    assert fake_node.fake.commands() == [
        f"wipefs --all --force --quiet {disk_file}",
        f"sfdisk --quiet --no-reread --no-tell-kernel {disk_file}",
        f"kpartx -l -p -part {disk_file}",
        f"kpartx -a -s -p -part {disk_file}",
        f"mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 {mapper}/disk.img-part1",
        f"kpartx -d -p -part {disk_file}",
    ]


def test_release_continues_when_one_step_fails(fake_node, disk_file, caplog):
    fake_node.fake.expect("losetup", "--detach", "/dev/loop1", returncode=1, stderr="busy")
    fake_node.fake.expect("mke2fs", returncode=1, stderr="mke2fs: bad")
    with pytest.raises(CommandError, match="mke2fs: bad"):
        create_disk(disk_file)
    assert fake_node.fake.commands()[-1] == "losetup --detach /dev/loop0"
    assert "detaching /dev/loop1 also failed" in caplog.text


def test_device_mapper_is_detected_by_opening_its_control_node(tmp_path, monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(partitions, "DM_CONTROL", str(tmp_path / "control"))
    assert not partitions.device_mapper_available()
    (tmp_path / "control").write_text("")
    assert partitions.device_mapper_available()
