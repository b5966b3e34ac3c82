"""The stream size export announces on EXP_SIZE_FD, from the superblock alone."""

from __future__ import annotations

import pytest

from ganeti_debootstrap import export

FEATURES = ("has_journal ext_attr resize_inode dir_index filetype extent 64bit flex_bg "
            "metadata_csum_seed sparse_super large_file huge_file dir_nlink extra_isize "
            "metadata_csum")

# Measured on instances made by create (trixie, ext4, 2026-12-02): the
# superblock after a clean unmount, dump's own estimate (dump -0 -S) and
# the bytes of the real stream (dump -0 -f - | wc -c).
#   (what, block count, free blocks, inode count, free inodes, reserved GDT,
#    journal blocks, overhead clusters, dump -S, real stream)
MEASURED = [
    ("2 GiB, as created", 524032, 455664, 112384, 103627, 54, 8192, 15584,
     223855616, 223016960),
    ("20 GiB, as created", 5242624, 5085896, 1123840, 1115083, 52, 32768, 103944,
     224109568, 223272960),
    ("2 GiB, 3000 small files added", 524032, 452646, 112384, 100626, 54, 8192, 15584,
     239251456, 238479360),
    ("4 GiB, 700 MiB file and a copy of /usr/share added", 1048320, 767847, 224768,
     210859, 54, 16384, 30944, 1035385856, 1034055680),
]


def fields(blocks: int, free: int, inodes: int, free_inodes: int, reserved: int,
           journal: int, overhead: int | None) -> dict[str, str]:
    found = {"Block count": str(blocks), "Free blocks": str(free),
             "Inode count": str(inodes), "Free inodes": str(free_inodes),
             "Block size": "4096", "First block": "0", "Blocks per group": "32768",
             "Inode size": "256", "Reserved GDT blocks": str(reserved),
             "Group descriptor size": "64", "Filesystem features": FEATURES,
             "Total journal blocks": str(journal)}
    if overhead is not None:
        found["Overhead clusters"] = str(overhead)
    return found


@pytest.mark.parametrize("case", MEASURED, ids=[m[0] for m in MEASURED])
def test_the_estimate_is_within_one_and_a_half_percent_of_the_real_stream(case):
    _, blocks, free, inodes, free_inodes, reserved, journal, overhead, _, real = case
    estimate = export.estimate_bytes(fields(blocks, free, inodes, free_inodes, reserved,
                                            journal, overhead))
    assert abs(estimate - real) <= real * 0.015, (estimate, real, estimate / real)


@pytest.mark.parametrize("case", MEASURED, ids=[m[0] for m in MEASURED])
def test_without_the_stored_overhead_it_is_computed_to_the_same_blocks(case):
    _, blocks, free, inodes, free_inodes, reserved, journal, overhead, _, _ = case
    computed = export.overhead_blocks(fields(blocks, free, inodes, free_inodes, reserved,
                                             journal, None))
    assert computed == overhead


def test_the_two_kilobyte_rounding_of_the_2_gib_instance():
    """Numbers of the first case by hand: 52784 data blocks of 4 KiB, 8757
    inode headers of 1 KiB, two 14 KiB inode maps."""
    estimate = export.estimate_bytes(fields(*MEASURED[0][1:8]))
    assert estimate == 52784 * 4096 + 8757 * 1024 + 2 * 14 * 1024


@pytest.mark.parametrize("groups,sparse,backups", [
    (1, True, 1), (2, True, 2), (16, True, 6),   # 0 1 3 5 7 9
    (160, True, 11),                             # + 25 27 49 81 125
    (16, False, 16)])
def test_superblock_backups_sit_in_groups_0_1_and_powers_of_3_5_7(groups, sparse, backups):
    assert export._backup_groups(groups, sparse) == backups


def test_a_filesystem_without_a_journal_has_none_in_its_overhead():
    base = fields(*MEASURED[0][1:7], None)
    no_journal = dict(base, **{"Filesystem features": FEATURES.replace("has_journal ", "")})
    assert export.overhead_blocks(base) - export.overhead_blocks(no_journal) == 8192


@pytest.mark.parametrize("damage", ["missing field", "not a number", "negative size"])
def test_a_superblock_that_does_not_add_up_falls_back_to_dumps_own_estimate(
        fake_runner, damage):
    found = fields(*MEASURED[0][1:7], overhead=MEASURED[0][7])
    if damage == "missing field":
        del found["Free blocks"]
    elif damage == "not a number":
        found["Inode count"] = "12x"
    else:
        found["Block count"] = "0"
        found["Free blocks"] = "0"
        found["Inode count"] = "0"
        found["Free inodes"] = "0"
    fake_runner.expect("dump", "-0", "-S", "/dev/loop7", stdout="223855616\n")
    assert export.expected_size(found, "/dev/loop7") == 223855616
    assert fake_runner.calls == [("dump", "-0", "-S", "/dev/loop7")]


def test_a_sane_superblock_needs_no_second_pass(fake_runner):
    found = fields(*MEASURED[0][1:7], overhead=MEASURED[0][7])
    assert export.expected_size(found, "/dev/loop7") == export.estimate_bytes(found)
    assert fake_runner.calls == []


def test_dump_without_an_estimate_is_a_clear_error(fake_runner):
    found = fields(*MEASURED[0][1:7], overhead=MEASURED[0][7])
    del found["Block size"]
    fake_runner.expect("dump", "-0", "-S", "/dev/loop7", stdout="DUMP: bad sb\n")
    with pytest.raises(export.DiskError, match="e2fsck"):
        export.expected_size(found, "/dev/loop7")
