"""Growing a copied cache image: its journal and UUID (no root: fake commands)."""

from __future__ import annotations

import re

import pytest

from ganeti_debootstrap import image_cache

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
    assert image_cache.default_journal_blocks(blocks) == journal


def test_a_grown_root_gets_a_new_uuid_and_the_journal_mkfs_would_give_it(fake_runner):
    fake_runner.expect("resize2fs", "-f", "/dev/loop1")
    fake_runner.expect("dumpe2fs", "-h", "/dev/loop1",
                       stdout=superblock(50 * GIB_BLOCKS, 4096))
    fake_runner.expect("tune2fs")
    new_uuid = image_cache.grow_and_renew("/dev/loop1", "ext4")
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
    new_uuid = image_cache.grow_and_renew("/dev/loop1", "ext3")
    assert fake_runner.commands()[-1] == f"tune2fs -U {new_uuid} /dev/loop1"


def test_ext2_has_no_journal_to_size(fake_runner):
    fake_runner.expect("resize2fs")
    fake_runner.expect("tune2fs")
    new_uuid = image_cache.grow_and_renew("/dev/loop1", "ext2")
    assert fake_runner.commands() == ["resize2fs -f /dev/loop1",
                                      f"tune2fs -U {new_uuid} /dev/loop1"]


def test_a_superblock_without_a_block_count_is_an_error(fake_runner):
    fake_runner.expect("resize2fs")
    fake_runner.expect("dumpe2fs", stdout="dumpe2fs 1.47.0\nBlock size: 4096\n")
    with pytest.raises(Exception, match="shows no 'Block count'"):
        image_cache.grow_and_renew("/dev/loop1", "ext4")
