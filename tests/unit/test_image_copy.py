"""Growing a copied cache image: its journal and UUID (no root: fake commands)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from ganeti_debootstrap import image_copy

GIB_BLOCKS = 2**30 // 4096


def superblock(blocks: int, journal_blocks: int | None) -> str:
    text = (f"dumpe2fs 1.47.0 (5-Feb-2023)\nFilesystem volume name:   <none>\n"
            f"Block count:              {blocks}\nBlock size:               4096\n"
            f"Filesystem created:       Wed Nov 25 22:00:00 2026\n")
    if journal_blocks is not None:
        text += (f"Journal features:         (none)\nTotal journal size:       "
                 f"{journal_blocks // 256}M\nTotal journal blocks:     {journal_blocks}\n")
    return text


@pytest.mark.parametrize("blocks,journal", [
    (32767, 1024), (32768, 4096),                      # 128 MiB
    (256 * 1024 - 1, 4096), (256 * 1024, 8192),        # 1 GiB
    (524032, 8192), (512 * 1024, 16384),               # 2 GiB (a 2 GiB disk's root is less)
    (16 * GIB_BLOCKS - 1, 16384), (16 * GIB_BLOCKS, 32768),
    (32 * GIB_BLOCKS, 65536), (64 * GIB_BLOCKS, 131072),
    (128 * GIB_BLOCKS - 1, 131072), (128 * GIB_BLOCKS, 262144), (4096 * GIB_BLOCKS, 262144)])
def test_journal_sizes_follow_mke2fs(blocks, journal):
    assert image_copy.default_journal_blocks(blocks) == journal


def test_a_grown_root_gets_a_new_uuid_and_the_journal_mkfs_would_give_it(fake_runner):
    fake_runner.expect("resize2fs", "-f", "/dev/loop1")
    fake_runner.expect("dumpe2fs", "-h", "/dev/loop1",
                       stdout=superblock(50 * GIB_BLOCKS, 4096))
    fake_runner.expect("tune2fs")
    new_uuid = image_copy.grow_and_renew("/dev/loop1", "ext4")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
                        new_uuid)
    # One tune2fs: the UUID, and the 16 MiB journal replaced by the 256 MiB
    # one mkfs gives 50 GiB.
    assert fake_runner.commands()[-1] == (
        f"tune2fs -U {new_uuid} -O ^has_journal -J size=256 /dev/loop1")


def test_a_journal_of_the_right_size_is_kept(fake_runner):
    fake_runner.expect("resize2fs")
    fake_runner.expect("dumpe2fs", stdout=superblock(200000, 4096))
    fake_runner.expect("tune2fs")
    new_uuid = image_copy.grow_and_renew("/dev/loop1", "ext3")
    assert fake_runner.commands()[-1] == f"tune2fs -U {new_uuid} /dev/loop1"


def test_ext2_has_no_journal_to_size(fake_runner):
    fake_runner.expect("resize2fs")
    fake_runner.expect("tune2fs")
    new_uuid = image_copy.grow_and_renew("/dev/loop1", "ext2")
    assert fake_runner.commands() == ["resize2fs -f /dev/loop1",
                                      f"tune2fs -U {new_uuid} /dev/loop1"]


@pytest.mark.parametrize("fstype,renew", [("xfs", ["xfs_admin", "-U"]),
                                          ("btrfs", ["btrfstune", "-M"])])
def test_xfs_and_btrfs_get_a_new_uuid_unmounted_and_grow_once_mounted(fake_runner, fstype,
                                                                     renew):
    fake_runner.expect(renew[0])
    new_uuid = image_copy.grow_and_renew("/dev/loop1", fstype)
    assert fake_runner.commands() == [" ".join([*renew, new_uuid, "/dev/loop1"])]
    grow = {"xfs": ["xfs_growfs", "-d", "/mnt/t"],
            "btrfs": ["btrfs", "filesystem", "resize", "max", "/mnt/t"]}[fstype]
    fake_runner.expect(grow[0])
    image_copy.grow_mounted("/mnt/t", fstype)
    assert fake_runner.commands()[-1] == " ".join(grow)


def test_ext_roots_are_not_grown_again_once_mounted(fake_runner):
    image_copy.grow_mounted("/mnt/t", "ext4")
    assert fake_runner.calls == []


def test_a_superblock_without_a_block_count_is_an_error(fake_runner):
    fake_runner.expect("resize2fs")
    fake_runner.expect("dumpe2fs", stdout="dumpe2fs 1.47.0\nBlock size: 4096\n")
    with pytest.raises(Exception, match="shows no 'Block count'"):
        image_copy.grow_and_renew("/dev/loop1", "ext4")


def test_a_journal_left_out_of_the_copy_is_replaced_even_at_the_right_size(fake_runner):
    fake_runner.expect("resize2fs")
    fake_runner.expect("dumpe2fs", stdout=superblock(200000, 4096))
    fake_runner.expect("tune2fs")
    new_uuid = image_copy.grow_and_renew("/dev/loop1", "ext4", journal_copied=False)
    assert fake_runner.commands()[-1] == (
        f"tune2fs -U {new_uuid} -O ^has_journal -J size=16 /dev/loop1")


@pytest.mark.parametrize("extents,skip,kept", [
    ([(0, 100)], (), [(0, 100)]),
    ([(0, 100)], ((20, 30),), [(0, 20), (50, 50)]),          # cut from the middle
    ([(0, 100), (200, 50)], ((90, 120),), [(0, 90), (210, 40)]),  # across two
    ([(0, 100)], ((0, 100),), []),                             # all of it
    ([(0, 100)], ((100, 10), (300, 5)), [(0, 100)]),           # outside
])
def test_skipped_ranges_are_cut_out_of_the_copied_extents(extents, skip, kept):
    assert image_copy._without(extents, skip) == kept


def _mke2fs(path: str, fstype: str, mib: int) -> None:
    with open(path, "wb") as f:
        f.truncate(mib * 2**20)
    # mke2fs on a regular file needs no root.
    subprocess.run(["mke2fs", "-F", "-q", "-T", "default", "-b", "4096", "-t", fstype,
                    "-J", "size=16", path], check=True, capture_output=True)


def _debugfs_journal_blocks(path: str) -> list[tuple[int, int]]:
    """The journal inode's extents as debugfs shows them: (first block, count)."""
    out = subprocess.run(["debugfs", "-R", "stat <8>", path], check=True,
                         capture_output=True, text=True).stdout
    found = []
    for first, _, last in re.findall(r"\(\d+(?:-\d+)?\):(\d+)(-(\d+))?", out):
        found.append((int(first), (int(last) if last else int(first)) - int(first) + 1))
    return found


def test_the_journal_is_found_from_the_superblock_as_debugfs_shows_it(tmp_path):
    path = str(tmp_path / "fs.img")
    _mke2fs(path, "ext4", 300)
    ranges = image_copy.journal_extents(path)
    assert ranges is not None
    blocks = [(start // 4096, length // 4096) for start, length in ranges]
    assert _merged(blocks) == _merged(_debugfs_journal_blocks(path))
    assert sum(length for _, length in ranges) == 16 * 2**20


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in sorted(runs):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def test_an_ext3_journal_mapped_by_blocks_is_not_found_so_it_is_copied(tmp_path):
    path = str(tmp_path / "fs.img")
    _mke2fs(path, "ext3", 300)
    assert image_copy.journal_extents(path) is None
    image = image_copy.FsImage(path, "ext3", os.path.getsize(path))
    assert image_copy.journal_to_replace(image, 20 * 2**30) == ()


def test_the_journal_after_its_superblock_is_skipped_only_when_it_is_replaced(tmp_path):
    path = str(tmp_path / "fs.img")
    _mke2fs(path, "ext4", 300)
    image = image_copy.FsImage(path, "ext4", os.path.getsize(path))
    (start, length), *rest = image_copy.journal_extents(path) or ()
    # A 20 GiB root gets a 128 MiB journal: all but the journal's own
    # superblock (its first block) is left out of the copy.
    assert image_copy.journal_to_replace(image, 20 * 2**30) == (
        (start + 4096, length - 4096), *rest)
    # 512 MiB gets 16 MiB, the image's size: it is kept, so copied.
    assert image_copy.journal_to_replace(image, 512 * 2**20) == ()
    ext2 = image_copy.FsImage(path, "ext2", image.size)
    assert image_copy.journal_to_replace(ext2, 20 * 2**30) == ()


def test_something_that_is_no_ext_filesystem_has_no_journal_to_skip(tmp_path):
    path = tmp_path / "zeros.img"
    path.write_bytes(bytes(8192))
    assert image_copy.journal_extents(str(path)) is None


def xfs_superblock(logstart: int, agblocks: int, agblklog: int, logblocks: int) -> bytes:
    sb = bytearray(512)
    sb[0:4] = b"XFSB"
    sb[4:8] = (4096).to_bytes(4, "big")
    sb[48:56] = logstart.to_bytes(8, "big")
    sb[84:88] = agblocks.to_bytes(4, "big")
    sb[96:100] = logblocks.to_bytes(4, "big")
    sb[124] = agblklog
    return bytes(sb)


def test_the_xfs_log_is_found_from_its_ag_relative_start(tmp_path):
    path = tmp_path / "x.img"
    # Block 6 of allocation group 2, as mkfs.xfs placed it in a 492 MiB image.
    path.write_bytes(xfs_superblock((2 << 15) | 6, 31515, 15, 16384))
    assert image_copy.xfs_log_range(str(path)) == ((2 * 31515 + 6) * 4096, 16384 * 4096)
    path.write_bytes(b"\0" * 4096)
    assert image_copy.xfs_log_range(str(path)) is None


def test_holes_of_the_xfs_log_are_zeroed_on_the_disk_and_its_data_copied(tmp_path):
    image = tmp_path / "x.img"
    log_start, log_bytes = 8 * 4096, 8 * 4096
    with open(image, "wb") as f:
        f.write(xfs_superblock(8, 1024, 10, 8))
        f.seek(log_start)
        f.write(b"\x01" * 4096)  # the log's first block: a record
        f.truncate(32 * 4096)
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xee" * (40 * 4096))  # old contents everywhere
    fs = image_copy.FsImage(str(image), "xfs", 32 * 4096)
    assert image_copy.zeroed_ranges(fs) == ((log_start, log_bytes),)
    image_copy.write(fs, str(disk), offset=4096)
    data = disk.read_bytes()
    assert data[4096:4100] == b"XFSB"
    log = data[4096 + log_start:4096 + log_start + log_bytes]
    assert log[:4096] == b"\x01" * 4096 and log[4096:] == bytes(log_bytes - 4096)
    # Outside the log, the image's holes keep what the disk held.
    assert data[4096 + log_start + log_bytes:][:4] == b"\xee" * 4
    assert image_copy.zeroed_ranges(image_copy.FsImage(str(image), "btrfs", 1)) == ()
