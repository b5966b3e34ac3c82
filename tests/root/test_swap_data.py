"""Swap (OS parameter swap) and data disks (data_disks=format) on real sparse disks.

create runs as Ganeti runs it, on the session's warm cache: a swap
partition at the end of disk 0 (msdos and gpt, from the cache image and
from the archive), a swap file with PARTITION_STYLE=none, data disks
formatted whole; and the refusals (swap leaving the root no room, a data
disk too small, mounted or held open) leaving every disk untouched and
nothing attached.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator

import pytest

from tests.root import scripts
from tests.root.scripts import create_env, mounted_root, read, run_script

MIB = 2**20
SWAP_MIB = 128
GPT_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"


def table(disk: str) -> dict:
    out = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)["partitiontable"]


def probe(path: str, offset: int = 0) -> dict[str, str]:
    """blkid's low-level probe of ``path`` at byte ``offset``, as KEY: value."""
    out = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(offset), path],
                         capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fstab_lines(disk: str) -> list[list[str]]:
    with mounted_root(disk) as root:
        text = read(root, "/etc/fstab")
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def e2fsck_clean(dev: str) -> None:
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("style,image", [("msdos", "yes"), ("gpt", "no")])
def test_swap_partition_at_the_end_of_disk_0_with_its_uuid_in_fstab(tree, disk, style,
                                                                     image):
    tree.settings(f'PARTITION_STYLE="{style}"\nCACHE_IMAGE="{image}"\n')
    res = run_script(tree, "create", create_env("swap1", disk, OSP_SWAP=f"{SWAP_MIB}M"))
    log = res.stderr.decode()
    # The cache image (grown to the root partition) or the archive.
    assert ("copy filesystem image: done" in log) == (image == "yes")
    parts = table(disk)["partitions"]
    assert len(parts) == 2
    root, swap = parts
    assert swap["node"].endswith("2")
    assert swap["type"] == ("82" if style == "msdos" else GPT_SWAP)
    assert swap["size"] == SWAP_MIB * MIB // 512
    assert swap["start"] % 2048 == 0
    assert root["start"] + root["size"] == swap["start"]
    assert swap["start"] + swap["size"] <= os.path.getsize(disk) // 512
    found = probe(disk, swap["start"] * 512)
    assert found["TYPE"] == "swap"
    with scripts.root_device(disk) as dev:
        e2fsck_clean(dev)
        # The root filesystem fills its partition (the image was grown).
        header = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True,
                                check=True).stdout
    fields = dict(ln.split(":", 1) for ln in header.splitlines() if ":" in ln)
    fs_bytes = int(fields["Block count"]) * int(fields["Block size"])
    assert root["size"] * 512 - fs_bytes < int(fields["Block size"])
    swap_lines = [ln for ln in fstab_lines(disk) if ln[2:3] == ["swap"]]
    assert swap_lines == [[f"UUID={found['UUID']}", "none", "swap", "sw", "0", "0"]]


@pytest.mark.parametrize("fstype", ["ext4", "ext3"])
def test_swap_file_without_partition_table_is_not_sparse_and_in_fstab_by_path(
        tree, disk, fstype):
    tree.settings('PARTITION_STYLE="none"\n')
    run_script(tree, "create", create_env("swap2", disk, OSP_SWAP=f"{SWAP_MIB}M",
                                          OSP_FILESYSTEM=fstype))
    assert "PTTYPE" not in probe(disk)
    with mounted_root(disk) as root:
        path = os.path.join(root, "swapfile")
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == SWAP_MIB * MIB
        # Every block allocated: swapon refuses a file with holes.
        assert st.st_blocks * 512 >= st.st_size
        swap = probe(path)
        fstab = read(root, "/etc/fstab")
    assert swap["TYPE"] == "swap" and swap["UUID"]
    assert "/swapfile\tnone\tswap\tsw\t0\t0" in fstab.splitlines()
    assert [ln for ln in fstab.splitlines() if "swap" in ln.split()[2:3]] == [
        "/swapfile\tnone\tswap\tsw\t0\t0"]
    e2fsck_clean(disk)


def test_swap_leaving_the_root_no_room_is_refused_before_the_disk_is_touched(tree, disk):
    res = run_script(tree, "create", create_env("swap3", disk, OSP_SWAP="700M"),
                     check=False)
    assert res.returncode != 0
    tail = res.stderr.decode().strip().splitlines()[-1]
    assert "swap" in tail and "700 MiB" in tail and "448 MiB" in tail
    assert "swap=" in tail
    assert probe(disk) == {}


def data_env(name: str, disk: str, data: list[str], **variables: str) -> dict[str, str]:
    env = create_env(name, disk, **variables)
    env["DISK_COUNT"] = str(1 + len(data))
    for i, path in enumerate(data, start=1):
        env[f"DISK_{i}_PATH"] = path
        env[f"DISK_{i}_ACCESS"] = "rw"
    return env


@pytest.mark.parametrize("fstype", ["ext4", "ext2"])
def test_data_disks_are_formatted_whole_and_mounted_by_uuid_with_nofail(
        tree, disk, tmp_path, fstype):
    data = [scripts.sparse_disk(str(tmp_path), 128, f"data{i}.img") for i in (1, 2)]
    # An old partition table on one of them: erased, not left beside the filesystem.
    subprocess.run(["sfdisk", "--quiet", data[1]], input="label: gpt\n,\n", text=True,
                   check=True)
    run_script(tree, "create", data_env("data1", disk, data, OSP_DATA_DISKS="format",
                                        OSP_DATA_FILESYSTEM=fstype))
    uuids = []
    for path in data:
        found = probe(path)
        assert found["TYPE"] == fstype and "PTTYPE" not in found, found
        uuids.append(found["UUID"])
        e2fsck_clean(path)
    assert len(set(uuids)) == 2
    lines = fstab_lines(disk)
    assert [ln for ln in lines if ln[1].startswith("/srv/")] == [
        [f"UUID={uuids[0]}", "/srv/disk1", fstype, "defaults,nofail", "0", "2"],
        [f"UUID={uuids[1]}", "/srv/disk2", fstype, "defaults,nofail", "0", "2"]]
    with mounted_root(disk) as root:
        for n in (1, 2):
            st = os.stat(os.path.join(root, f"srv/disk{n}"))
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755


def test_data_disks_are_left_alone_by_default(tree, disk, tmp_path):
    data = scripts.sparse_disk(str(tmp_path), 128, "data1.img")
    run_script(tree, "create", data_env("data2", disk, [data]))
    assert probe(data) == {}
    assert not [ln for ln in fstab_lines(disk) if ln[1].startswith("/srv/")]


def refused(tree: scripts.OSTree, disk: str, data: list[str]) -> str:
    """create with data_disks=format fails; its last line, with every disk untouched."""
    before = [probe(p) for p in data]
    res = run_script(tree, "create", data_env("refused", disk, data,
                                              OSP_DATA_DISKS="format"), check=False)
    assert res.returncode != 0
    assert probe(disk) == {}, "disk 0 was touched"
    assert [probe(p) for p in data] == before, "a data disk was touched"
    return res.stderr.decode().strip().splitlines()[-1]


def test_a_data_disk_too_small_is_refused_naming_it_and_the_minimum(tree, disk, tmp_path):
    data = [scripts.sparse_disk(str(tmp_path), 128, "data1.img"),
            scripts.sparse_disk(str(tmp_path), 32, "data2.img")]
    tail = refused(tree, disk, data)
    assert "Data disk 2" in tail and data[1] in tail
    assert "32 MiB" in tail and "64 MiB" in tail and "data_disks=none" in tail


@pytest.fixture
def mounted_data(tmp_path) -> Iterator[str]:
    """A data disk file holding an ext4 filesystem mounted through a loop device."""
    path = scripts.sparse_disk(str(tmp_path), 128, "mounted.img")
    subprocess.run(["mke2fs", "-F", "-q", "-t", "ext4", path], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", path, str(mnt)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True)


def test_a_mounted_data_disk_is_refused(tree, disk, mounted_data):
    tail = refused(tree, disk, [mounted_data])
    assert mounted_data in tail and "mounted" in tail


def test_a_data_disk_held_open_is_refused_naming_the_process(tree, disk, tmp_path):
    data = scripts.sparse_disk(str(tmp_path), 128, "open.img")
    with open(data, "rb") as held:
        holder = subprocess.Popen(["sleep", "300"], stdin=held)
    try:
        tail = refused(tree, disk, [data])
    finally:
        holder.kill()
        holder.wait()
    assert data in tail and f"sleep (pid {holder.pid})" in tail


def test_disk_0_given_again_as_a_data_disk_is_refused(tree, disk, tmp_path):
    link = str(tmp_path / "again.img")
    os.symlink(disk, link)
    tail = refused(tree, disk, [link])
    assert "same disk as disk 0" in tail


@pytest.mark.parametrize("style", ["msdos", "none"])
def test_an_export_imports_with_its_swap_made_anew(tree, disk, tmp_path, style):
    tree.settings(f'PARTITION_STYLE="{style}"\n')
    run_script(tree, "create", create_env("swap4", disk, OSP_SWAP=f"{SWAP_MIB}M"))
    dump = str(tmp_path / "dump")
    common = dict(INSTANCE_NAME="swap4", DISK_COUNT="1", OSP_SWAP=f"{SWAP_MIB}M")
    with open(dump, "wb") as out:
        run_script(tree, "export", scripts.ganeti_env(
            DISK_0_PATH=disk, EXPORT_INDEX="0", EXPORT_DISK_PATH=disk, **common),
            stdout=out.fileno())
    imported = scripts.sparse_disk(str(tmp_path), 1024, "imported.img")
    with open(dump, "rb") as inp:
        run_script(tree, "import", scripts.ganeti_env(
            DISK_0_PATH=imported, IMPORT_INDEX="0", IMPORT_DISK_PATH=imported, **common),
            stdin=inp.fileno())
    lines = [ln for ln in fstab_lines(imported) if ln[2:3] == ["swap"]]
    if style == "none":
        assert lines == [["/swapfile", "none", "swap", "sw", "0", "0"]]
        with mounted_root(imported) as root:
            st = os.lstat(os.path.join(root, "swapfile"))
            found = probe(os.path.join(root, "swapfile"))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == SWAP_MIB * MIB
        assert st.st_blocks * 512 >= st.st_size and found["TYPE"] == "swap"
        e2fsck_clean(imported)
        return
    old = probe(disk, table(disk)["partitions"][1]["start"] * 512)
    swap = table(imported)["partitions"][1]
    assert swap["type"] == "82" and swap["size"] == SWAP_MIB * MIB // 512
    new = probe(imported, swap["start"] * 512)
    assert new["TYPE"] == "swap" and new["UUID"] != old["UUID"]
    assert lines == [[f"UUID={new['UUID']}", "none", "swap", "sw", "0", "0"]]


def test_a_reinstall_keeps_the_data_disks_and_their_files(tree, disk, tmp_path):
    data = [scripts.sparse_disk(str(tmp_path), 128, "data1.img")]
    env = data_env("data3", disk, data, OSP_DATA_DISKS="format")
    run_script(tree, "create", env)
    uuid = probe(data[0])["UUID"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", data[0], str(mnt)], check=True)
    try:
        (mnt / "database").write_text("the instance's data\n")
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True)
    res = run_script(tree, "create", {**env, "INSTANCE_REINSTALL": "1"})
    assert f"Data disk 1 ({data[0]}): its ext4 filesystem {uuid} is kept" in \
        res.stderr.decode()
    assert probe(data[0])["UUID"] == uuid
    subprocess.run(["mount", "-o", "loop,ro", data[0], str(mnt)], check=True)
    try:
        assert (mnt / "database").read_text() == "the instance's data\n"
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True)
    assert [f"UUID={uuid}", "/srv/disk1", "ext4", "defaults,nofail", "0", "2"] in \
        fstab_lines(disk)
