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
