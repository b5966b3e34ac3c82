"""The device layer on real loop devices, partition tables and filesystems.

Every disk is a sparse file in tmp_path; each test checks the result from
outside (sfdisk, blkid, e2fsck on the image file) after everything was
released. conftest's leak check fails any test that leaves a mount or a
loop device behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import threading

import pytest

from ganeti_debootstrap import blockdev, filesystems, instance_disk, mounts, partitions, procs
from ganeti_debootstrap.environment import Request
from ganeti_debootstrap.errors import CommandError, DiskError
from ganeti_debootstrap.settings import PartitionStyle, Settings
from tests.root.sparse import MIB, sparse_file

DISK_MIB = 600


def loops_of(path: str) -> list[str]:
    """Loop devices attached to ``path`` right now."""
    out = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "-j", path],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def sfdisk_table(path: str) -> dict:
    out = subprocess.run(["sfdisk", "--json", path], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["partitiontable"]


def probe(path: str, offset: int) -> dict[str, str]:
    """blkid's low-level probe of the image at a byte offset."""
    out = subprocess.run(["blkid", "-p", "-O", str(offset), "-o", "export", path],
                         capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fsck_clean(path: str, offset: int) -> subprocess.CompletedProcess[str]:
    # e2fsprogs takes io options after "?": the filesystem at a byte offset.
    return subprocess.run(["e2fsck", "-fn", f"{path}?offset={offset}"],
                          capture_output=True, text=True)


def read_file_in_image(path: str, offset: int, name: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {name}", f"{path}?offset={offset}"],
                          capture_output=True, text=True, check=True).stdout


def install_disk(path: str, style: PartitionStyle, fstype: str, alignment: int = 2048,
                 arch: str = "amd64") -> tuple[partitions.Layout, str]:
    """The create sequence: check, attach, partition, format, mount, write."""
    with contextlib.ExitStack() as stack:
        blockdev.check_disk_usable(path)
        dev = stack.enter_context(blockdev.attached(path))
        size = blockdev.size_bytes(dev)
        blockdev.require_min_size(size, blockdev.MIN_DISK_MIB)
        layout = partitions.write_table(dev, style, alignment, size, arch)
        root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
        filesystems.make_filesystem(root_dev, fstype)
        uuid = filesystems.uuid_of(root_dev)
        assert filesystems.fs_type(root_dev) == fstype
        target = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(root_dev, target))
        with open(os.path.join(target, "hello"), "w") as f:
            f.write(f"{style} {fstype}\n")
    return layout, uuid


@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
@pytest.mark.parametrize("style", ["none", "msdos", "gpt"])
def test_disk_is_partitioned_formatted_and_released(tmp_path, style, fstype):
    path = sparse_file(tmp_path, DISK_MIB)
    layout, uuid = install_disk(path, style, fstype)

    assert loops_of(path) == []
    offset = 0 if style == "none" else 2048 * 512
    assert layout.offset_bytes == offset
    found = probe(path, offset)
    assert found["TYPE"] == fstype
    assert found["UUID"] == uuid
    check = fsck_clean(path, offset)
    assert check.returncode == 0, check.stdout + check.stderr
    assert read_file_in_image(path, offset, "hello") == f"{style} {fstype}\n"


def test_whole_disk_filesystem_leaves_no_partition_table(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    # A stale msdos table first: style none must erase it.
    install_disk(path, "msdos", "ext4")
    install_disk(path, "none", "ext4")
    assert subprocess.run(["sfdisk", "--json", path], capture_output=True).returncode != 0
    assert probe(path, 0)["TYPE"] == "ext4"


@pytest.mark.parametrize("alignment", [2048, 4096])
def test_msdos_partition_starts_at_alignment_and_is_bootable(tmp_path, alignment):
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "msdos", "ext4", alignment)
    table = sfdisk_table(path)
    assert table["label"] == "dos"
    [part] = table["partitions"]
    assert part["start"] == alignment
    assert part["start"] + part["size"] == DISK_MIB * MIB // 512
    assert part["type"] == "83"
    assert part.get("bootable") is True
    assert probe(path, alignment * 512)["TYPE"] == "ext4"


@pytest.mark.parametrize("alignment", [2048, 4096])
def test_gpt_partition_starts_at_alignment_and_leaves_room_for_backup(tmp_path, alignment):
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "gpt", "ext4", alignment)
    table = sfdisk_table(path)
    assert table["label"] == "gpt"
    [part] = table["partitions"]
    assert part["start"] == alignment
    assert part["type"] == partitions.GPT_ROOT_TYPES["amd64"]
    # The backup header and entries take the last 33 sectors.
    assert part["start"] + part["size"] - 1 <= DISK_MIB * MIB // 512 - 34
    assert part["start"] + part["size"] - 1 <= table["lastlba"]
    verify = subprocess.run(["sfdisk", "--verify", path], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert probe(path, alignment * 512)["TYPE"] == "ext4"


def test_gpt_for_other_architectures_uses_generic_linux_type(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "gpt", "ext4", arch="mips64el")
    [part] = sfdisk_table(path)["partitions"]
    assert part["type"] == partitions.GPT_LINUX_FILESYSTEM


@pytest.mark.parametrize("style", ["none", "msdos", "gpt"])
def test_read_layout_finds_what_write_table_made(tmp_path, style):
    path = sparse_file(tmp_path, DISK_MIB)
    written, uuid = install_disk(path, style, "ext3", alignment=4096)
    with blockdev.attached(path, read_only=True) as dev:
        found = partitions.read_layout(dev)
        with partitions.mapped_root(dev, found, read_only=True) as root_dev:
            assert filesystems.fs_type(root_dev) == "ext3"
            assert filesystems.uuid_of(root_dev) == uuid
            state = filesystems.ext_state(root_dev)
            assert state.clean and not state.needs_recovery
    assert found == written
    assert loops_of(path) == []


def test_read_layout_refuses_an_empty_disk(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    with blockdev.attached(path) as dev, pytest.raises(DiskError, match="neither"):
        partitions.read_layout(dev)


def test_disk_under_minimum_is_refused_with_both_sizes(tmp_path):
    path = sparse_file(tmp_path, 500)
    with blockdev.attached(path) as dev:
        with pytest.raises(DiskError) as err:
            blockdev.require_min_size(blockdev.size_bytes(dev), blockdev.MIN_DISK_MIB)
    assert "500 MiB" in str(err.value)
    assert "512 MiB" in str(err.value)


def test_alignment_that_leaves_too_little_is_refused_before_writing(tmp_path):
    path = sparse_file(tmp_path, 520)
    with blockdev.attached(path) as dev:
        with pytest.raises(DiskError, match="PARTITION_ALIGNMENT=204800"):
            partitions.write_table(dev, "msdos", 204800, blockdev.size_bytes(dev))
        assert subprocess.run(["sfdisk", "--json", dev], capture_output=True).returncode != 0


def test_directory_is_refused(tmp_path):
    with pytest.raises(DiskError, match="directory"):
        blockdev.check_disk_usable(str(tmp_path))


def test_missing_disk_is_refused(tmp_path):
    with pytest.raises(DiskError, match="does not exist"):
        blockdev.check_disk_usable(str(tmp_path / "nothing.img"))


def test_mounted_whole_disk_file_is_refused(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "none", "ext4")
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(blockdev.attached(path))
        target = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(dev, target))
        with pytest.raises(DiskError, match=f"mounted on {target}"):
            blockdev.check_disk_usable(path)
        # The loop device itself is as much in use as the file.
        with pytest.raises(DiskError, match="in use"):
            blockdev.check_disk_usable(dev)


def test_disk_whose_partition_is_mounted_is_refused(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    layout, _ = install_disk(path, "msdos", "ext4")
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(blockdev.attached(path))
        root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
        target = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(root_dev, target))
        with pytest.raises(DiskError, match=f"mounted on {target}"):
            blockdev.check_disk_usable(path)
        with pytest.raises(DiskError, match=f"mounted on {target}"):
            blockdev.check_disk_usable(dev)


def test_unused_attached_disk_is_accepted(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    with blockdev.attached(path) as dev:
        blockdev.check_disk_usable(path)
        blockdev.check_disk_usable(dev)


def test_node_root_disk_is_refused():
    root = next(e for e in reversed(mounts.current_mounts()) if e.mount_point == "/")
    if not root.source.startswith("/dev/") or not os.path.exists(root.source) \
            or not stat.S_ISBLK(os.stat(root.source).st_mode):
        pytest.skip(f"/ is not on a block device node here ({root.source})")
    with pytest.raises(DiskError, match="root filesystem"):
        blockdev.check_disk_usable(root.source)


def test_failure_midway_releases_mapping_and_loop_device(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    with pytest.raises(CommandError, match="mount"):
        with contextlib.ExitStack() as stack:
            dev = stack.enter_context(blockdev.attached(path))
            layout = partitions.write_table(dev, "msdos", 2048, blockdev.size_bytes(dev))
            root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
            assert len(loops_of(path)) == 1  # the disk; the partition is on the disk's loop
            filesystems.make_filesystem(root_dev, "ext4")
            target = stack.enter_context(mounts.temporary_mountpoint())
            # A real failure: the filesystem is not what we ask mount for.
            stack.enter_context(mounts.mounted(root_dev, target, fstype="ext2",
                                               options=("nosuchoption",)))
    assert loops_of(path) == []
    assert not os.path.exists(target)
    assert not mounts.mounts_under(target, mounts.current_mounts())


def test_error_in_body_is_not_replaced_by_cleanup(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "gpt", "ext4")
    with pytest.raises(RuntimeError, match="injected"):
        with contextlib.ExitStack() as stack:
            dev = stack.enter_context(blockdev.attached(path))
            layout = partitions.read_layout(dev)
            root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
            target = stack.enter_context(mounts.temporary_mountpoint())
            stack.enter_context(mounts.mounted(root_dev, target))
            with mounts.api_filesystems(target):
                raise RuntimeError("injected")
    assert loops_of(path) == []


def test_concurrent_attaches_get_distinct_loop_devices(tmp_path):
    paths = [sparse_file(tmp_path, 8, f"d{i}.img") for i in range(4)]
    names: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(paths))
    release = threading.Event()

    def attach(path: str) -> None:
        try:
            barrier.wait()
            with blockdev.loop_device(path) as dev:
                names.append(dev)
                release.wait(10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=attach, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    while len(names) + len(errors) < len(paths):
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(names)) == len(paths)


def test_api_filesystems_are_mounted_for_hooks_and_released(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "none", "ext4")
    node_pts = [e for e in mounts.current_mounts() if e.mount_point == "/dev/pts"]
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(blockdev.attached(path))
        target = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(dev, target))
        with mounts.api_filesystems(target):
            assert os.path.exists(os.path.join(target, "proc/self/status"))
            assert os.path.isdir(os.path.join(target, "sys/block"))
            assert stat.S_ISCHR(os.stat(os.path.join(target, "dev/null")).st_mode)
            assert os.path.exists(os.path.join(target, "dev", os.path.basename(dev)))
            types = {e.mount_point: e.fstype for e in mounts.current_mounts()}
            assert types[os.path.join(target, "dev/pts")] == "devpts"
            # A hook mounts something of its own deep inside.
            subprocess.run(["mount", "-t", "tmpfs", "hookfs",
                            os.path.join(target, "sys/kernel")], check=True)
        assert mounts.mounts_under(target, mounts.current_mounts())[0].mount_point == target
    assert not mounts.mounts_under(target, mounts.current_mounts())
    # Nothing propagated to the node's own /dev/pts.
    assert [e for e in mounts.current_mounts() if e.mount_point == "/dev/pts"] == node_pts


def test_busy_mount_names_the_process_and_is_released_once_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(mounts, "UNMOUNT_DELAYS", (0.05, 0.05))
    path = sparse_file(tmp_path, DISK_MIB)
    install_disk(path, "none", "ext4")
    with blockdev.attached(path) as dev, mounts.temporary_mountpoint() as target:
        mounted = mounts.mounted(dev, target)
        mounted.__enter__()
        sleeper = subprocess.Popen(["sleep", "60"], cwd=target)
        try:
            with pytest.raises(DiskError) as err:
                mounted.__exit__(None, None, None)
            assert f"sleep (pid {sleeper.pid})" in str(err.value)
            assert mounts.is_mounted(target)
            assert (sleeper.pid, "sleep") in procs.processes_using(target)
        finally:
            sleeper.kill()
            sleeper.wait()
        # The mount was kept, not lazily hidden: it can be released now.
        mounts.unmount_tree(target)
        assert not mounts.is_mounted(target)
    assert loops_of(path) == []


def test_swap_gets_a_uuid_blkid_agrees_with(tmp_path):
    path = sparse_file(tmp_path, 64, "swap.img")
    with blockdev.attached(path) as dev:
        uuid = filesystems.make_swap(dev)
        assert filesystems.fs_type(dev) == "swap"
    assert probe(path, 0)["UUID"] == uuid


def test_grub_efi_disk_gets_a_fat_esp_before_the_root_and_export_finds_the_root(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    request = Request(script="create", api_version=20, instance_name="efi.example.org",
                      disk_path=path)
    conf = Settings(bootloader="grub-efi", partition_style="gpt")
    with contextlib.ExitStack() as stack:
        disk = instance_disk.format_disk(stack, request, conf, "ext4", "amd64")
        assert disk.esp is not None and disk.esp.fstype == "vfat"
        assert disk.esp_device.startswith("/dev/loop")
    assert loops_of(path) == []
    table = sfdisk_table(path)
    root, esp = table["partitions"]
    assert root["node"].endswith("1") and esp["node"].endswith("2")
    assert root["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
    assert esp["type"] == partitions.GPT_EFI_SYSTEM
    assert (esp["start"], esp["size"]) == (2048, 64 * 2048)
    assert root["start"] == 2048 + 64 * 2048
    found = probe(path, esp["start"] * 512)
    assert disk.esp is not None
    assert found["TYPE"] == "vfat" and found["UUID"] == disk.esp.uuid
    assert found.get("LABEL") == "EFI"
    assert probe(path, root["start"] * 512)["UUID"] == disk.root.uuid
    # export and rename find the root as partition 1, the ESP before it.
    with contextlib.ExitStack() as stack:
        _, root_dev, fstype = instance_disk.open_root(stack, path, read_only=True)
        assert fstype == "ext4" and filesystems.uuid_of(root_dev) == disk.root.uuid
    assert loops_of(path) == []


@pytest.mark.parametrize("mode", ["rb", "r+b"])
def test_a_disk_file_another_process_has_open_is_refused_naming_it(tmp_path, mode):
    """The kernel's answer (a write lease) says the file is used; the /proc
    scan then names who uses it."""
    path = sparse_file(tmp_path, DISK_MIB)
    with open(path, mode) as held:
        sleeper = subprocess.Popen(["sleep", "60"], stdin=held)
    try:
        assert not blockdev.not_open_elsewhere(path)
        with pytest.raises(DiskError) as err:
            blockdev.check_disk_usable(path)
        assert f"is open in sleep (pid {sleeper.pid})" in str(err.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert blockdev.not_open_elsewhere(path)
    blockdev.check_disk_usable(path)


def test_a_disk_file_behind_an_unmounted_loop_device_is_not_known_free(tmp_path):
    path = sparse_file(tmp_path, DISK_MIB)
    with blockdev.attached(path):
        assert not blockdev.not_open_elsewhere(path)
    assert blockdev.not_open_elsewhere(path)
