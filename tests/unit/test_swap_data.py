"""Swap (OS parameter swap) and data disks (data_disks, data_filesystem) without root.

The parameters' parsing, the partition layout with a swap partition, the
fstab lines, the swap file, and the checks that refuse data disks; how
create composes them is in test_compose_create.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

import pytest

from ganeti_debootstrap import (blockdev, cache_images, environment, filesystems,
                                instance_disk, instance_files, osparams, partitions)
from ganeti_debootstrap.errors import ConfigError, DiskError
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.instance_files import DataMount
from ganeti_debootstrap.settings import Settings
from ganeti_debootstrap.target import Target
from tests.fakenode import ganeti_env
from tests.systemtree import ROOT_UUID, make_tree, read

MIB = 2**20
GIB = 2**30
DISK = 2 * GIB
SECTORS = DISK // 512
DATA_UUID = "11111111-2222-4333-8444-555555555555"
SWAP_UUID = "99887766-aaaa-bbbb-cccc-ddddeeeeffff"


# --- the parameters -------------------------------------------------------------

@pytest.mark.parametrize("value,mib", [
    ("0", 0), ("", 0), ("0M", 0), ("512M", 512), ("512m", 512), ("512MiB", 512),
    ("512MB", 512), ("1G", 1024), ("1g", 1024), ("2GiB", 2048), ("1T", 2**20),
    ("300", 300)])
def test_swap_sizes_count_mib_with_binary_units(value, mib):
    assert osparams.validate({"swap": value}).swap_bytes == mib * MIB


def test_swap_defaults_to_none():
    params = osparams.validate({})
    assert (params.swap, params.swap_bytes) == ("0", 0)


@pytest.mark.parametrize("value", ["1.5G", "-1", "512K", "G", "1 G", "1GB2", "0x10",
                                   "１G", "1e3", "1" * 13])
def test_a_swap_value_that_is_no_size_is_refused_with_examples(value):
    with pytest.raises(ConfigError, match=r"swap=.* is not a size: .*512M, 1G"):
        osparams.validate({"swap": value})


def test_a_swap_larger_than_any_disk_is_refused():
    with pytest.raises(ConfigError, match="larger than any disk"):
        osparams.validate({"swap": "999999999999T"})


def test_data_disks_default_to_none_and_accept_format():
    assert osparams.validate({}).data_disks == "none"
    assert osparams.validate({"data_disks": "format"}).data_disks == "format"
    with pytest.raises(ConfigError, match="data_disks='yes'.*none, format"):
        osparams.validate({"data_disks": "yes"})


def test_data_filesystem_accepts_the_root_types_and_defaults_to_ext4():
    known = {p.name: p for p in osparams.PARAMETERS}
    assert known["data_filesystem"].choices == filesystems.ROOT_TYPES
    assert osparams.validate({}).data_filesystem == "ext4"
    assert osparams.validate({"data_filesystem": "ext2"}).data_filesystem == "ext2"
    with pytest.raises(ConfigError, match="data_filesystem='vfat'"):
        osparams.validate({"data_filesystem": "vfat"})


# --- the partition layout ----------------------------------------------------------

def test_msdos_swap_takes_the_end_of_the_disk_exactly():
    layout = partitions.plan("msdos", 2048, DISK, swap_bytes=512 * MIB)
    assert (layout.swap_start_sector, layout.swap_size_sectors) == (
        SECTORS - 512 * 2048, 512 * 2048)
    assert layout.start_sector + layout.size_sectors == layout.swap_start_sector
    assert layout.swap_size_bytes == 512 * MIB
    assert layout.swap_offset_bytes == DISK - 512 * MIB


def test_gpt_swap_starts_aligned_before_the_backup_table_with_the_size_asked():
    layout = partitions.plan("gpt", 2048, DISK, swap_bytes=512 * MIB)
    assert layout.swap_start_sector % 2048 == 0
    assert layout.swap_size_sectors == 512 * 2048
    end = layout.swap_start_sector + layout.swap_size_sectors
    # The backup table's 33 sectors stay clear; less than an alignment unused.
    assert SECTORS - 33 - 2048 < end <= SECTORS - 33
    assert layout.start_sector + layout.size_sectors == layout.swap_start_sector


def test_swap_on_4k_sectors_counts_whole_sectors():
    layout = partitions.plan("gpt", 2048, DISK, sector_size=4096, swap_bytes=256 * MIB)
    assert layout.swap_size_sectors == 256 * MIB // 4096
    assert layout.swap_start_sector % 256 == 0


def test_swap_follows_the_bios_boot_and_efi_partitions_in_the_table():
    bios = partitions.plan("gpt", 2048, DISK, boot_area=True, swap_bytes=64 * MIB)
    lines = partitions.sfdisk_script(bios, "amd64").splitlines()
    assert lines[-3].endswith("type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")
    assert lines[-2].endswith(f"type={partitions.GPT_BIOS_BOOT}")
    assert lines[-1] == (f"start={bios.swap_start_sector}, size={64 * 2048}, "
                         f"type={partitions.GPT_SWAP}")
    efi = partitions.plan("gpt", 2048, DISK, esp=True, swap_bytes=64 * MIB)
    assert efi.start_sector == 2048 + partitions.ESP_BYTES // 512
    assert efi.start_sector + efi.size_sectors == efi.swap_start_sector
    lines = partitions.sfdisk_script(efi, "amd64").splitlines()
    assert lines[-2].endswith(f"type={partitions.GPT_EFI_SYSTEM}")
    assert lines[-1].endswith(f"type={partitions.GPT_SWAP}")


def test_msdos_script_lists_swap_as_partition_2_of_type_82():
    layout = partitions.plan("msdos", 2048, DISK, swap_bytes=512 * MIB)
    assert partitions.sfdisk_script(layout) == (
        "label: dos\nunit: sectors\n\n"
        f"start=2048, size={SECTORS - 2048 - 512 * 2048}, type=83, bootable\n"
        f"start={SECTORS - 512 * 2048}, size={512 * 2048}, type=82\n")


def test_no_swap_no_swap_partition():
    layout = partitions.plan("msdos", 2048, DISK)
    assert layout.swap_size_sectors == 0
    assert "type=82" not in partitions.sfdisk_script(layout)


@pytest.mark.parametrize("style", ["msdos", "gpt", "none"])
def test_swap_leaving_the_root_too_little_is_refused_in_one_paragraph(style):
    with pytest.raises(DiskError) as err:
        partitions.plan(style, 2048, GIB, swap_bytes=700 * MIB)
    message = str(err.value)
    assert "\n" not in message
    assert "swap: 700 MiB" in message and "1024 MiB disk 0" in message
    assert f"at least {partitions.MIN_PARTITION_MIB} MiB" in message
    assert "-O swap=SIZE" in message


def test_swap_leaving_the_root_its_minimum_is_accepted():
    size = (partitions.MIN_PARTITION_MIB + 1) * MIB
    assert partitions.plan("none", 2048, size + 256 * MIB, swap_bytes=256 * MIB) == (
        partitions.plan("none", 2048, size + 256 * MIB))
    layout = partitions.plan("msdos", 2048, size + 256 * MIB, swap_bytes=256 * MIB)
    assert layout.size_bytes == partitions.MIN_PARTITION_MIB * MIB


def test_the_root_of_an_existing_disk_with_swap_is_still_partition_1(fake_runner):
    layout = partitions.plan("gpt", 2048, DISK, boot_area=True, swap_bytes=64 * MIB)
    # What sfdisk --json lists for it: by partition number.
    text = ('{"partitiontable": {"label": "gpt", "sectorsize": 512, "partitions": ['
            f'{{"node": "d1", "start": {layout.start_sector}, "size": {layout.size_sectors},'
            f' "type": "{partitions.gpt_root_type("amd64")}"}},'
            f'{{"node": "d2", "start": 34, "size": 2014, "type": "{partitions.GPT_BIOS_BOOT}"}},'
            f'{{"node": "d3", "start": {layout.swap_start_sector}, '
            f'"size": {layout.swap_size_sectors}, "type": "{partitions.GPT_SWAP}"}}]}}}}')
    found = partitions._layout_from_json("d", text)
    assert (found.start_sector, found.size_sectors) == (layout.start_sector,
                                                        layout.size_sectors)


# --- fstab ----------------------------------------------------------------------

ROOT = FsEntry(ROOT_UUID, "ext4")


def test_data_disks_are_mounted_by_uuid_at_srv_diskn_with_nofail():
    data = (DataMount(1, FsEntry(DATA_UUID, "ext4")), DataMount(3, FsEntry("u3", "ext2")))
    text = instance_files.fstab_text("", ROOT, None, data=data)
    assert text.splitlines()[3:] == [
        f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1",
        f"UUID={DATA_UUID}\t/srv/disk1\text4\tdefaults,nofail\t0\t2",
        "UUID=u3\t/srv/disk3\text2\tdefaults,nofail\t0\t2"]


def test_a_data_disk_of_a_type_without_boot_fsck_gets_pass_0():
    line = DataMount(1, FsEntry(DATA_UUID, "xfs")).fstab_line()
    assert line == f"UUID={DATA_UUID}\t/srv/disk1\txfs\tdefaults,nofail\t0\t0"


def test_the_swap_file_is_named_by_path_and_replaces_an_old_line_for_it():
    existing = ("/swapfile none swap defaults 0 0\n"
                "/dev/vdb /srv/disk1 ext4 defaults 0 2\n"
                "/dev/vdc /srv/disk2 ext4 defaults 0 2\n"
                "UUID=old-swap none swap sw 0 0\n")
    data = (DataMount(1, FsEntry(DATA_UUID, "ext4")),)
    text = instance_files.fstab_text(existing, ROOT, None, swap_file="/swapfile",
                                     data=data)
    assert text.splitlines()[3:] == [
        f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1",
        "/swapfile\tnone\tswap\tsw\t0\t0",
        f"UUID={DATA_UUID}\t/srv/disk1\text4\tdefaults,nofail\t0\t2",
        "",
        # Not one of ours this time: the site's line stays.
        "/dev/vdc /srv/disk2 ext4 defaults 0 2"]


def test_a_swap_partition_and_data_disks_in_fstab_through_configure(tree, node, fake_runner):
    data = (DataMount(1, FsEntry(DATA_UUID, "ext4")),)
    instance_files.configure(tree, instance_files.Instance("web1"), root=ROOT,
                             swap=FsEntry(SWAP_UUID, "swap"), data=data, node_files=node)
    lines = read(tree, "/etc/fstab").splitlines()
    assert f"UUID={SWAP_UUID}\tnone\tswap\tsw\t0\t0" in lines
    assert f"UUID={DATA_UUID}\t/srv/disk1\text4\tdefaults,nofail\t0\t2" in lines
    st = os.stat(tree.path("/srv/disk1"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755


@pytest.fixture
def tree(tmp_path: Path) -> Target:
    return make_tree(tmp_path / "root")


# --- the swap file ------------------------------------------------------------------

def expect_mkswap(fake_runner, tree: Target) -> None:
    path = tree.path_nofollow("/swapfile")
    fake_runner.expect("mkswap", "-f", path)
    fake_runner.expect("blkid", "-p", "-o", "value", "-s", "UUID", path,
                       stdout=SWAP_UUID + "\n")


@pytest.mark.parametrize("fstype", ["ext4", "ext3", "ext2"])
def test_the_swap_file_is_0600_allocated_whole_then_mkswap(tree, fake_runner, fstype):
    expect_mkswap(fake_runner, tree)
    with open(tree.path("/swapfile"), "w") as f:  # an old one, from the cache
        f.write("old")
    assert instance_files.make_swap_file(tree, 4 * MIB, fstype) == "/swapfile"
    st = os.lstat(tree.path("/swapfile"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 4 * MIB
    assert st.st_blocks * 512 >= 4 * MIB, "the swap file has holes"
    assert fake_runner.commands() == [f"mkswap -f {tree.path('/swapfile')}",
                                      f"blkid -p -o value -s UUID {tree.path('/swapfile')}"]


def test_a_symlink_in_the_swap_files_place_is_replaced_not_followed(tree, fake_runner,
                                                                     tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("node file")
    os.symlink(str(outside), tree.path_nofollow("/swapfile"))
    expect_mkswap(fake_runner, tree)
    instance_files.make_swap_file(tree, MIB, "ext4")
    assert outside.read_text() == "node file"
    assert not os.path.islink(tree.path_nofollow("/swapfile"))


def test_a_directory_in_the_swap_files_place_is_refused(tree):
    os.mkdir(tree.path("/swapfile"))
    with pytest.raises(instance_files.InstanceFilesError, match="/swapfile cannot be made"):
        instance_files.make_swap_file(tree, MIB, "ext4")


def test_a_swap_file_the_root_has_no_room_for_is_refused(tree, monkeypatch):
    class Full:
        f_bavail, f_frsize = 100, 4096
    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    with pytest.raises(instance_files.InstanceFilesError,
                       match=r"0 MiB free .* swap file of 512 MiB .*swap=SIZE"):
        instance_files.make_swap_file(tree, 512 * MIB, "ext4")
    assert not os.path.exists(tree.path("/swapfile"))


# --- data disks -----------------------------------------------------------------

@pytest.fixture
def disks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Disk 0 (1 GiB) and two data disks (128 MiB), sparse files; no node state read."""
    monkeypatch.setattr(blockdev, "check_disk_usable", lambda path: None)
    paths = []
    for name, mib in (("disk0", 1024), ("disk1", 128), ("disk2", 128)):
        path = tmp_path / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(mib * MIB)
        paths.append(str(path))
    return paths


def request_of(paths: list[str], **variables: str) -> environment.Request:
    env = ganeti_env(paths[0], **{"DISK_COUNT": str(len(paths)), **variables})
    for i, path in enumerate(paths[1:], start=1):
        env.setdefault(f"DISK_{i}_PATH", path)
    return environment.parse("create", [], env)


FORMAT = osparams.validate({"data_disks": "format"})


def test_data_disks_are_disks_1_and_up_with_format_only(disks):
    request = request_of(disks)
    assert [d.index for d in instance_disk.data_disks(request, FORMAT)] == [1, 2]
    assert instance_disk.data_disks(request, osparams.validate({})) == ()
    instance_disk.check_data_disks(request, FORMAT)


def test_an_api5_request_has_no_data_disk(disks):
    request = environment.parse("create", ["-i", "old1", "-b", disks[0], "-s", disks[1]],
                                {"PATH": "/bin"})
    assert instance_disk.data_disks(request, FORMAT) == ()


def test_a_data_disk_below_the_minimum_is_refused_naming_it(disks):
    os.truncate(disks[2], 63 * MIB)
    with pytest.raises(DiskError) as err:
        instance_disk.check_data_disks(request_of(disks), FORMAT)
    message = str(err.value)
    assert message.startswith(f"Data disk 2 ({disks[2]}) is 63 MiB")
    assert "at least 64 MiB for its ext4 filesystem" in message
    assert "data_disks=none" in message and "\n" not in message


def test_the_minimum_follows_the_data_filesystem(disks):
    assert instance_disk.min_data_disk_mib("ext4") == 64
    assert instance_disk.min_data_disk_mib("xfs") == 300
    assert instance_disk.min_data_disk_mib("unknown") == 300
    os.truncate(disks[1], 64 * MIB)
    instance_disk.check_data_disks(request_of(disks[:2]), FORMAT)


def test_a_data_disk_in_use_is_refused_by_the_disk_checks(disks, monkeypatch):
    def in_use(path: str) -> None:
        if path == disks[2]:
            raise DiskError(f"The instance disk {path} is in use: mounted.")
    monkeypatch.setattr(blockdev, "check_disk_usable", in_use)
    with pytest.raises(DiskError, match=f"{disks[2]} is in use"):
        instance_disk.check_data_disks(request_of(disks), FORMAT)


@pytest.mark.parametrize("again", [0, 1])
def test_a_disk_given_twice_is_refused(disks, tmp_path, again):
    link = tmp_path / "again.img"
    os.symlink(disks[again], link)
    with pytest.raises(DiskError, match=f"Data disk 2 .* same disk as disk {again}"):
        instance_disk.check_data_disks(request_of([disks[0], disks[1], str(link)]), FORMAT)


def test_a_data_disk_reachable_only_by_uri_is_refused(disks):
    request = request_of(disks[:1], DISK_COUNT="2", DISK_1_URI="rbd:pool/disk1")
    with pytest.raises(DiskError, match=r"Data disk 1 has no path \(DISK_1_PATH\).*rbd:"):
        instance_disk.check_data_disks(request, FORMAT)


def test_a_read_only_data_disk_is_refused(disks):
    with pytest.raises(DiskError, match="Data disk 1 .* 'ro', not read-write"):
        instance_disk.check_data_disks(request_of(disks, DISK_1_ACCESS="ro"), FORMAT)


# --- the cache image and swap -----------------------------------------------------

def test_the_cache_image_is_grown_to_the_root_partition_which_ends_before_the_swap(
        fake_node, disk0, tmp_path):
    image_path = tmp_path / "cache.ext2.img"
    image_path.write_bytes(b"IMAGE" * 1000 + bytes(4096 - 5000 % 4096))
    image = cache_images.FsImage(str(image_path), "ext2", 8 * MIB)
    fake_node.fake.expect("resize2fs", "-f")
    fake_node.fake.expect("tune2fs")
    request = environment.parse("create", [], ganeti_env(disk0))
    with contextlib.ExitStack() as stack:
        formatted = instance_disk.format_disk(stack, request, Settings(), "ext2", "amd64",
                                              image=image, swap_bytes=64 * MIB)
        assert formatted.from_image and formatted.swap is not None
        assert formatted.swap_file_bytes == 0
    root_size = (1024 - 1 - 64) * MIB
    new_uuid = fake_node.fake.commands()[5].split()[2]
    # Grown through the loop device over exactly the root partition.
    assert fake_node.fake.commands() == [
        f"wipefs --all --force --quiet {disk0}",
        f"sfdisk --quiet --no-reread --no-tell-kernel {disk0}",
        f"losetup --find --show {disk0}",
        f"losetup --find --show --offset {MIB} --sizelimit {root_size} {disk0}",
        "resize2fs -f /dev/loop1",
        f"tune2fs -U {new_uuid} /dev/loop1",
        f"losetup --find --show --offset {(1024 - 64) * MIB} --sizelimit {64 * MIB} {disk0}",
        "mkswap -f /dev/loop2", "blkid -p -o value -s UUID /dev/loop2",
        "losetup --detach /dev/loop2",
        "losetup --detach /dev/loop1", "losetup --detach /dev/loop0"]
    with open(disk0, "rb") as f:
        f.seek(MIB)
        assert f.read(5000) == b"IMAGE" * 1000
    assert fake_node.leftovers() == []


def test_an_image_larger_than_the_root_left_by_the_swap_is_not_used(fake_node, disk0,
                                                                     tmp_path, caplog):
    image_path = tmp_path / "cache.ext4.img"
    image_path.write_bytes(b"")
    image = cache_images.FsImage(str(image_path), "ext4", 900 * MIB)
    request = environment.parse("create", [], ganeti_env(disk0))
    with caplog.at_level(logging.INFO), contextlib.ExitStack() as stack:
        formatted = instance_disk.format_disk(stack, request, Settings(), "ext4", "amd64",
                                              image=image, swap_bytes=256 * MIB)
    assert not formatted.from_image
    assert "The root partition (767 MiB) is smaller than the cache's filesystem image" \
        in caplog.text
