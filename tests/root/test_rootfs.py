"""XFS and Btrfs roots beside ext4: warm create from their cache images, rename."""

from __future__ import annotations

import pytest

from tests.root import scripts
from tests.root.scripts import create_env, ganeti_env, mounted_root, read, root_device, run_script


def rename_env(disk: str, old: str, new: str) -> dict[str, str]:
    return ganeti_env(INSTANCE_NAME=new, OLD_INSTANCE_NAME=old, DISK_COUNT="1",
                      DISK_0_PATH=disk)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_rename_works_on_each_root_type(tree, disk, fstype):
    run_script(tree, "create", create_env("rn1.example.org", disk, OSP_FILESYSTEM=fstype))
    run_script(tree, "rename", rename_env(disk, "rn1.example.org", "rn2.example.org"))
    with mounted_root(disk) as root:
        assert read(root, "/etc/hostname") == "rn2.example.org\n"
        assert "rn2" in read(root, "/etc/hosts")
    with root_device(disk) as dev:
        scripts.assert_fs_clean(dev, fstype)


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_warm_create_copies_the_types_image_and_renews_its_uuid(tree, tmp_path, fstype):
    disks = [scripts.sparse_disk(str(tmp_path), 1024, f"w{i}.img") for i in range(2)]
    uuids = set()
    for i, disk in enumerate(disks):
        log = run_script(tree, "create", create_env(f"w{i}", disk,
                                                    OSP_FILESYSTEM=fstype)).stderr.decode()
        if i:
            assert f".{fstype}.img" in log and "The system comes from the cache image" in log
        with root_device(disk) as dev:
            assert scripts.blkid(dev, "TYPE") == fstype
            uuids.add(scripts.blkid(dev, "UUID"))
            scripts.assert_fs_clean(dev, fstype)
    assert len(uuids) == 2


def test_filesystem_setting_is_the_default_root_type(tree, disk):
    tree.settings('FILESYSTEM="btrfs"\n')
    run_script(tree, "create", create_env("fs1", disk))
    with root_device(disk) as dev:
        assert scripts.blkid(dev, "TYPE") == "btrfs"


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_hooks_run_in_the_mounted_root_of_each_type(tree, disk, fstype):
    tree.hook("10-probe", 'findmnt -no FSTYPE "$TARGET" > "$TARGET/root/hook-fstype"\n'
                          'chroot "$TARGET" dpkg-query -W dpkg > "$TARGET/root/chroot-ok"\n')
    run_script(tree, "create", create_env("hk1", disk, OSP_FILESYSTEM=fstype))
    with mounted_root(disk) as root:
        assert read(root, "/root/hook-fstype") == f"{fstype}\n"
        assert read(root, "/root/chroot-ok").startswith("dpkg")


def test_verify_accepts_the_new_root_types_and_names_them_when_refusing(tree):
    for value, ok in (("xfs", True), ("btrfs", True), ("zfs", False)):
        env = ganeti_env(OSP_FILESYSTEM=value)
        res = run_script(tree, "verify", env, args=("parameters",), check=False)
        assert (res.returncode == 0) == ok, res.stderr
        if not ok:
            assert b"xfs, btrfs" in res.stderr
