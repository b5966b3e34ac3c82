"""Where a copy of the cache image beside Ganeti's file storage lives, and how
it is kept in step with the image (the copying itself: tests/root/test_reflink.py)."""

from __future__ import annotations

import os

from ganeti_debootstrap import image_share
from ganeti_debootstrap.cache_images import FsImage


def test_the_storage_dir_is_the_parent_of_the_instances_directory(tmp_path):
    disk = tmp_path / "storage" / "inst1.example.org" / "0a1b.file.disk0"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"")
    assert image_share.storage_dir(str(disk)) == str(tmp_path / "storage")


def test_a_copys_name_changes_with_the_images_version(tmp_path):
    image = tmp_path / "cache-trixie-amd64-0123.ext4.img"
    image.write_bytes(b"x" * 10)
    name = image_share.copy_name(str(image), os.stat(image))
    assert name.startswith("cache-trixie-amd64-0123.ext4.img.")
    replacement = tmp_path / "new"
    replacement.write_bytes(b"x" * 10)
    os.replace(replacement, image)  # a remade image: another inode
    assert image_share.copy_name(str(image), os.stat(image)) != name


def test_an_image_on_the_disk_files_filesystem_is_used_itself(tmp_path):
    image = tmp_path / "cache-x.ext4.img"
    image.write_bytes(b"\0" * 4096)
    disk = tmp_path / "storage" / "inst" / "disk0"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"")
    fs_image = FsImage(str(image), "ext4", 4096)
    assert image_share.beside(fs_image, str(disk)) is fs_image
    assert not (tmp_path / "storage" / image_share.DIR_NAME).exists()


def test_copies_of_gone_or_changed_images_are_removed_and_the_current_kept(tmp_path):
    cache = tmp_path / "cache"
    copies = tmp_path / "copies"
    cache.mkdir()
    copies.mkdir()
    current = cache / "cache-a.ext4.img"
    current.write_bytes(b"a")
    keep = image_share.copy_name(str(current), os.stat(current))
    other = cache / "cache-b.ext4.img"
    other.write_bytes(b"b")
    still_good = image_share.copy_name(str(other), os.stat(other))
    for name in (keep, still_good, "cache-a.ext4.img.1-1-1", "cache-gone.ext4.img.2-2-2"):
        (copies / name).write_bytes(b"")
    image_share._remove_stale(str(copies), str(cache), keep)
    assert sorted(os.listdir(copies)) == sorted([keep, still_good])


def test_a_fresh_temporary_file_is_left_to_the_create_writing_it(tmp_path):
    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / ".new-abc").write_bytes(b"")
    old = copies / ".new-old"
    old.write_bytes(b"")
    os.utime(old, (1, 1))
    image_share._remove_stale(str(copies), str(tmp_path), "")
    assert os.listdir(copies) == [".new-abc"]
