"""The fast path: a cache's filesystem image gives the same instance as its archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ganeti_debootstrap import image_copy
from tests.root import bootstrap_fixture, scripts
from tests.root.scripts import create_env, mounted_root, read, root_device, run_script
from tests.treecompare import differences


# The files create writes for each instance: written at different moments
# in the two creates, so their (and their directories') mtimes differ.
WRITTEN_BY_CREATE = ("etc", "etc/network", "etc/hostname", "etc/hosts", "etc/mailname",
                     "etc/machine-id", "etc/network/interfaces", "etc/resolv.conf",
                     "etc/shadow", "etc/apt", "etc/apt/sources.list",
                     "etc/apt/sources.list.d", "etc/apt/sources.list.d/debian.sources",
                     "etc/ganeti-instance-debootstrap")
# Where the system came from (origin.py): it names the path taken, so it
# differs by design; its content is checked on its own.
ORIGIN = "etc/ganeti-instance-debootstrap/origin"


def copy_out(disk: str, dest: str) -> None:
    os.makedirs(dest)
    with mounted_root(disk) as root:
        tar = subprocess.Popen(["tar", "-C", root, "--xattrs", "--xattrs-include=*",
                                "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-C", dest, "--xattrs", "--xattrs-include=*",
                        "--numeric-owner", "-xpf", "-"], stdin=tar.stdout, check=True)
        assert tar.wait() == 0


def fsck_clean(disk: str, fstype: str = "ext4") -> None:
    with root_device(disk) as dev:
        scripts.assert_fs_clean(dev, fstype)


def dirty(path: str, mib: int) -> None:
    """A disk full of old data: every MiB starts with a non-zero pattern."""
    block = (b"OLD-DATA" * 512) + os.urandom(4096)
    with open(path, "r+b") as f:
        for i in range(mib):
            f.seek(i * 2**20)
            f.write(block)


@pytest.mark.parametrize("fstype,style", [("ext4", "msdos"), ("ext3", "gpt"),
                                          ("ext2", "none"), ("xfs", "msdos"),
                                          ("xfs", "none"), ("btrfs", "gpt"),
                                          ("btrfs", "msdos")])
def test_image_path_gives_the_same_tree_as_the_archive(tree, tmp_path, fstype, style):
    via_tar = scripts.sparse_disk(str(tmp_path), 1024, "tar.img")
    via_image = scripts.sparse_disk(str(tmp_path), 2048, "image.img")
    dirty(via_image, 2048)
    tree.settings(f'CACHE_IMAGE="no"\nPARTITION_STYLE="{style}"\n')
    log_tar = run_script(tree, "create", create_env("same1", via_tar,
                                                    OSP_FILESYSTEM=fstype)).stderr.decode()
    assert "Unpacking the cache" in log_tar
    tree.settings(f'PARTITION_STYLE="{style}"\n')
    log_image = run_script(tree, "create", create_env("same1", via_image,
                                                      OSP_FILESYSTEM=fstype)).stderr.decode()
    assert "The system comes from the cache image" in log_image
    for disk in (via_tar, via_image):
        fsck_clean(disk, fstype)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    copy_out(via_tar, a)
    copy_out(via_image, b)
    diffs = differences(a, b, ignore=("lost+found", "etc/fstab", ORIGIN),
                        ignore_mtime=WRITTEN_BY_CREATE)
    print("\n".join(diffs))
    assert diffs == []
    origins = [json.loads(open(os.path.join(t, ORIGIN)).read()) for t in (a, b)]
    assert [o["source"] for o in origins] == ["cache archive", "cache image"]
    assert origins[0] == {**origins[1], "source": "cache archive"}
    with root_device(via_image) as dev:
        size = int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True,
                                  text=True).stdout)
        spanned = scripts.filesystem_bytes(dev, fstype)
        uuid = scripts.blkid(dev, "UUID")
    if fstype == "xfs":
        # xfs_growfs leaves out a last allocation group too small to use.
        assert size - 64 * 2**20 <= spanned <= size, "the filesystem fills its partition"
    else:
        assert spanned == size - size % 4096, "the filesystem fills its partition"
    with mounted_root(via_image) as root:
        assert f"UUID={uuid}" in read(root, "/etc/fstab")


def test_each_instance_from_one_image_gets_its_own_uuid(tree, tmp_path):
    disks = [scripts.sparse_disk(str(tmp_path), 1024, f"d{i}.img") for i in range(2)]
    for i, disk in enumerate(disks):
        run_script(tree, "create", create_env(f"u{i}", disk))
    uuids = set()
    for disk in disks:
        with root_device(disk) as dev:
            uuids.add(scripts.blkid(dev, "UUID"))
    assert len(uuids) == 2


def test_image_follows_a_repacked_archive(tree, tmp_path):
    own = str(tmp_path / "var")
    subprocess.run(["cp", "-a", tree.localstatedir, own], check=True)
    site = scripts.OSTree(tree.sysconfdir, own, tree.os_dir)
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    run_script(site, "create", create_env("pre", disk))  # image made for the archive
    # The default settings' archive: the shared directory holds others too.
    archive = bootstrap_fixture.default_key().stem + ".tar"
    path = os.path.join(site.cache_dir, archive)
    # The administrator preseeds a site file into the archive.
    unpacked = str(tmp_path / "unpacked")
    os.makedirs(unpacked)
    subprocess.run(["tar", "-C", unpacked, "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-xpf", path], check=True)
    with open(os.path.join(unpacked, "etc/site-preseed"), "w") as f:
        f.write("preseeded\n")
    subprocess.run(["tar", "-C", unpacked, "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-cf", path, "."], check=True)
    log = run_script(site, "create", create_env("post", disk)).stderr.decode()
    assert "The system comes from the cache image" in log
    with mounted_root(disk) as root:
        assert read(root, "/etc/site-preseed") == "preseeded\n"


def test_image_larger_than_the_partition_falls_back_to_the_archive(tree, tmp_path):
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    # An alignment of 800 MiB leaves a partition smaller than the image.
    tree.settings('PARTITION_ALIGNMENT="1638400"\n')
    res = run_script(tree, "create", create_env("tight", disk), check=False)
    log = res.stderr.decode()
    if res.returncode != 0:
        # Too small for the system at all: refused with a clear message.
        assert "ERROR: create failed" in log
    else:
        assert "unpacking the archive instead" in log
        fsck_clean(disk)


def journal_blocks(dev: str) -> int:
    info = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True,
                          check=True).stdout
    return int([ln for ln in info.splitlines()
                if ln.startswith("Total journal blocks:")][0].split()[-1])


@pytest.mark.parametrize("mib", [100, 700, 1500, 2047, 3000, 20480, 40960, 204800])
def test_journal_table_matches_this_nodes_mke2fs(tmp_path, mib):
    path = scripts.sparse_disk(str(tmp_path), mib, "fs.img")
    subprocess.run(["mke2fs", "-F", "-q", "-t", "ext4", "-b", "4096", path], check=True)
    assert journal_blocks(path) == image_copy.default_journal_blocks(mib * 256)


@pytest.mark.parametrize("fstype,mib", [("ext4", 2048), ("ext4", 20480), ("ext3", 40960)])
def test_image_path_gives_the_journal_mkfs_gives(tree, tmp_path, fstype, mib):
    """A copied, grown image has the journal of an instance made by mkfs (the
    archive path, the shell edition's way), not the small image's."""
    journals = []
    for image in ("no", "yes"):
        disk = scripts.sparse_disk(str(tmp_path), mib, f"cache-image-{image}.img")
        tree.settings(f'CACHE_IMAGE="{image}"\n')
        log = run_script(tree, "create", create_env("journal1", disk,
                                                    OSP_FILESYSTEM=fstype)).stderr.decode()
        assert ("The system comes from the cache image" in log) == (image == "yes")
        fsck_clean(disk)
        with root_device(disk) as dev:
            journals.append(journal_blocks(dev))
        os.unlink(disk)
    image_path_journal = journals[1]
    assert image_path_journal == journals[0], journals
    assert image_path_journal > 4096, "bigger than the image's own 16 MiB journal"


def _data_and_unwritten(path: str) -> tuple[int, int]:
    """Bytes with data and bytes allocated unwritten in ``path`` (FIEMAP)."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from gidb_bench import diskio
    found = diskio.allocation(path)
    return found.written, found.unwritten


@pytest.mark.parametrize("mib,journal_skipped", [(900, False), (20480, True)])
def test_a_replaced_journal_is_not_copied_and_the_filesystem_is_whole(tree, tmp_path, mib,
                                                                      journal_skipped):
    """The image's 16 MiB journal is copied only when the instance keeps it;
    a 20 GiB root gets a 128 MiB journal instead, and the copy leaves the old
    one's blocks (beyond its superblock) as the disk had them."""
    disk = scripts.sparse_disk(str(tmp_path), mib)
    run_script(tree, "create", create_env("journal2", disk))
    fsck_clean(disk)
    with root_device(disk) as dev:
        blocks = int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True,
                                    text=True, check=True).stdout) // 4096
        assert journal_blocks(dev) == image_copy.default_journal_blocks(blocks)
    image = os.path.join(tree.cache_dir,
                         bootstrap_fixture.default_key().stem + ".ext4.img")
    image_data = os.stat(image).st_blocks * 512
    data, unwritten = _data_and_unwritten(disk)
    # What create writes beside the image's blocks: the partition table,
    # the instance's files, the new journal's first transactions.
    assert data <= image_data * 1.1
    if journal_skipped:
        assert data < image_data - 8 * 2**20, (data, image_data)
        # The new journal is zeroed without writing data (fallocate on the file).
        assert unwritten >= 64 * 2**20
    else:
        assert data > image_data - 2**20
    with mounted_root(disk) as root:
        assert os.path.exists(os.path.join(root, "etc", "hostname"))
