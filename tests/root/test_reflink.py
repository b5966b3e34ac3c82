"""Disk files on a filesystem that shares blocks (XFS with reflink, Btrfs):
a warm create clones the cache image's extents into the disk file instead of
writing them, and nothing the instance writes later reaches the image."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.root import bootstrap_fixture, scripts
from tests.root.scripts import create_env, mounted_root, root_device, run_script

MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@contextlib.contextmanager
def mounted_fs(tmp_path, fstype: str) -> Iterator[str]:
    """A fresh ``fstype`` filesystem on a loop device, mounted; released after."""
    backing = scripts.sparse_disk(str(tmp_path), 4096, f"{fstype}.fs")
    subprocess.run([*MKFS[fstype], backing], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", backing], check=True,
                          capture_output=True, text=True).stdout.strip()
    point = str(tmp_path / f"{fstype}-mnt")
    os.makedirs(point)
    try:
        subprocess.run(["mount", "-t", fstype, loop, point], check=True)
        try:
            yield point
        finally:
            subprocess.run(["umount", point], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def allocation(path: str):
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from gidb_bench import diskio
    return diskio.allocation(path)


def copy_cache(localstatedir: str, dest_localstatedir: str) -> str:
    """The default key's archive and ext4 image, with their records, copied
    (times kept: the image's record names the archive's) onto another fs."""
    source = bootstrap_fixture.cache_dir(localstatedir)
    dest = bootstrap_fixture.cache_dir(dest_localstatedir)
    os.makedirs(dest, mode=0o755)
    stem = bootstrap_fixture.default_key().stem
    for name in (f"{stem}.tar", f"{stem}.inputs.json", f"{stem}.ext4.img",
                 f"{stem}.ext4.img.json"):
        shutil.copy2(os.path.join(source, name), os.path.join(dest, name))
    return os.path.join(dest, f"{stem}.ext4.img")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_disk_file_beside_the_cache_shares_its_blocks_and_never_changes_it(
        tree, tmp_path, fstype):
    # Make sure the image exists in the shared cache before copying it.
    warm = scripts.sparse_disk(str(tmp_path), 1024, "warm.img")
    run_script(tree, "create", create_env("warm", warm))
    os.unlink(warm)
    with mounted_fs(tmp_path, fstype) as fs:
        var = os.path.join(fs, "var")
        image = copy_cache(tree.localstatedir, var)
        before = sha256(image)
        site = scripts.OSTree(tree.sysconfdir, var, tree.os_dir)
        disk = scripts.sparse_disk(fs, 2048, "instance.img")
        log = run_script(site, "create", create_env("shared", disk)).stderr.decode()
        assert "The system comes from the cache image" in log
        assert "(reflink)" in log, log
        # The image's data is shared, not written (FIEMAP's shared flag).
        shared = allocation(disk)
        assert shared.shared >= 150 * 2**20, shared
        assert shared.written < 16 * 2**20, shared
        with root_device(disk) as dev:
            check = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        # The instance writes over shared blocks: a library rewritten in
        # place, a file replaced, a new file.
        with mounted_root(disk, read_only=False) as root:
            libc = os.path.join(root, "usr/lib/x86_64-linux-gnu/libc.so.6")
            size = os.path.getsize(libc)
            with open(libc, "r+b") as f:
                f.write(b"\xff" * size)
                f.flush()
                os.fsync(f.fileno())
            with open(os.path.join(root, "etc/hostname"), "w") as f:
                f.write("changed\n")
            with open(os.path.join(root, "new-file"), "wb") as f:
                f.write(os.urandom(8 << 20))
        with mounted_root(disk) as root:
            with open(os.path.join(root, "usr/lib/x86_64-linux-gnu/libc.so.6"), "rb") as f:
                assert f.read(16) == b"\xff" * 16
        subprocess.run(["sync"], check=True)
        assert sha256(image) == before
        # A second instance from the same image sees the original files.
        other = scripts.sparse_disk(fs, 2048, "other.img")
        run_script(site, "create", create_env("other", other))
        with mounted_root(other) as root:
            with open(os.path.join(root, "usr/lib/x86_64-linux-gnu/libc.so.6"), "rb") as f:
                assert f.read(4) == b"\x7fELF"
            assert not os.path.exists(os.path.join(root, "new-file"))


def test_a_disk_file_on_another_filesystem_is_written_as_before(tree, tmp_path):
    """The cache on ext4, the disk file on XFS: no sharing across filesystems."""
    with mounted_fs(tmp_path, "xfs") as fs:
        disk = scripts.sparse_disk(fs, 2048, "instance.img")
        log = run_script(tree, "create", create_env("apart", disk)).stderr.decode()
        assert "The system comes from the cache image" in log
        assert "(reflink)" not in log
        with root_device(disk) as dev:
            check = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def ganeti_disk(storage: str, instance: str) -> str:
    """A 2 GiB sparse disk file where Ganeti keeps one: <storage>/<instance>/<file>."""
    directory = os.path.join(storage, instance)
    os.makedirs(directory, mode=0o700)
    return scripts.sparse_disk(directory, 2048, "a1b2.file.disk0")


def test_file_storage_on_another_filesystem_shares_a_copy_kept_in_step_with_the_cache(
        tree, tmp_path):
    """The cache on the work dir's ext4, Ganeti's file storage on XFS: create
    keeps a copy of the image beside the storage and shares its blocks."""
    var = str(tmp_path / "var")
    image = copy_cache(tree.localstatedir, var)
    site = scripts.OSTree(tree.sysconfdir, var, tree.os_dir)
    with mounted_fs(tmp_path, "xfs") as fs:
        storage = os.path.join(fs, "file-storage")
        os.makedirs(storage, mode=0o755)
        copies = os.path.join(storage, ".ganeti-instance-debootstrap")
        first = ganeti_disk(storage, "one")
        log = run_script(site, "create", create_env("one", first)).stderr.decode()
        assert "Copied the cache image to" in log, log
        assert "(reflink)" in log, log
        [copy] = os.listdir(copies)
        st = os.stat(copies)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        st = os.stat(os.path.join(copies, copy))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        assert copy.startswith(os.path.basename(image) + ".")
        assert sha256(os.path.join(copies, copy)) == sha256(image)
        shared = allocation(first)
        assert shared.shared >= 150 * 2**20, shared
        assert shared.written < 16 * 2**20, shared
        copy_mtime = st.st_mtime_ns
        # The next instance shares the same copy without making it again.
        second = ganeti_disk(storage, "two")
        log = run_script(site, "create", create_env("two", second)).stderr.decode()
        assert "Copied the cache image" not in log and "(reflink)" in log, log
        assert os.listdir(copies) == [copy]
        assert os.stat(os.path.join(copies, copy)).st_mtime_ns == copy_mtime
        # What an instance writes never reaches the copy.
        before = sha256(os.path.join(copies, copy))
        with mounted_root(first, read_only=False) as root:
            with open(os.path.join(root, "usr/lib/x86_64-linux-gnu/libc.so.6"), "r+b") as f:
                f.write(b"\xff" * 4096)
        subprocess.run(["sync"], check=True)
        assert sha256(os.path.join(copies, copy)) == before
        with root_device(second) as dev:
            check = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        # The image is made again (as a refresh does): the next create
        # replaces the copy and removes the old one.
        shutil.copy2(image, image + ".remade")
        os.replace(image + ".remade", image)
        third = ganeti_disk(storage, "three")
        log = run_script(site, "create", create_env("three", third)).stderr.decode()
        assert "Copied the cache image to" in log, log
        [new_copy] = os.listdir(copies)
        assert new_copy != copy
        with mounted_root(third) as root:
            with open(os.path.join(root, "etc/hostname")) as f:
                assert f.read().strip() == "three"


def test_file_storage_others_can_write_gets_no_copy(tree, tmp_path):
    """A copy goes into every instance: none is kept where others could change it."""
    var = str(tmp_path / "var")
    copy_cache(tree.localstatedir, var)
    site = scripts.OSTree(tree.sysconfdir, var, tree.os_dir)
    with mounted_fs(tmp_path, "xfs") as fs:
        storage = os.path.join(fs, "file-storage")
        os.makedirs(storage)
        os.chmod(storage, 0o777)
        disk = ganeti_disk(storage, "open")
        log = run_script(site, "create", create_env("open", disk)).stderr.decode()
        assert "Not keeping a copy of the cache image" in log, log
        assert "writable" in log, log
        assert not os.path.exists(os.path.join(storage, ".ganeti-instance-debootstrap"))
        assert "(reflink)" not in log
        with root_device(disk) as dev:
            check = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
