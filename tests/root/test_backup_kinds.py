"""Backups of every disk: dump, tar and raw streams, on real filesystems and devices.

export writes a dump for an ext filesystem, a tar archive for XFS and
Btrfs, a raw image for a data disk with no filesystem; import tells them
apart by their first bytes and restores each onto any filesystem type. A
small tree holding every kind of metadata (owners, modes, setuid, hard and
symbolic links, device nodes, a FIFO, a sparse file, ACLs, extended
attributes of each namespace, a file capability, timestamps) is exported
from each type and imported onto each type; the trees must be the same.

Data disks (EXPORT_INDEX/IMPORT_INDEX 1) go through the scripts; the
import onto XFS and Btrfs runs import's restore in this process on a
filesystem made here, until create's ``filesystem`` (and the data disks'
``data_filesystem``) parameter can ask for them.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator

import pytest

from ganeti_debootstrap import backupstream, filesystems, import_disk
from tests.root import backupio, scripts
from tests.root.scripts import ganeti_env, run_script
from tests.treecompare import describe
from tests.treecompare import differences as tree_differences

# XFS shows root its ACLs twice: as system.posix_acl_* and as its own
# trusted.SGI_ACL_* attributes, which are not copied (XFS makes them).
XFS_ACL_COPIES = ("trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT")


def differences(a: str, b: str) -> list[str]:
    """treecompare's comparison, XFS's copies of the ACLs left out."""
    def without_copies(root: str) -> dict[str, tuple]:
        return {rel: entry[:7] + (tuple(x for x in entry[7] if x[0] not in XFS_ACL_COPIES),)
                + entry[8:] for rel, entry in describe(root).items()}
    da, db = without_copies(a), without_copies(b)
    return [f"{rel}: {da.get(rel)} != {db.get(rel)}" for rel in sorted(set(da) | set(db))
            if da.get(rel) != db.get(rel)][:20]

TYPES = ("ext4", "xfs", "btrfs")
MKFS = {"ext4": ["mkfs.ext4", "-F", "-q"], "xfs": ["mkfs.xfs", "-f", "-q"],
        "btrfs": ["mkfs.btrfs", "-f", "-q"]}
DISK_MIB = 512
KIND = {"ext4": "dump", "xfs": "tar", "btrfs": "tar"}
# An IMA-style hash attribute (security.*: only CAP_SYS_ADMIN sets it).
IMA = b"\x04\x04" + bytes(range(32))


@pytest.fixture
def os_tree(tmp_path):
    """A scratch OS installation; export and import of data disks need no cache."""
    return scripts.make_os_tree(str(tmp_path / "os"), str(tmp_path / "var"))


def disk_env(script: str, disk: str, index: int = 1,
             extra: dict[str, str] | None = None) -> dict[str, str]:
    prefix = script.upper()
    return ganeti_env(INSTANCE_NAME="kinds.example.org", DISK_COUNT=str(index + 1),
                      **{f"DISK_{index}_PATH": disk, f"{prefix}_INDEX": str(index),
                         f"{prefix}_DISK_PATH": disk, f"{prefix}_DEVICE": disk},
                      **(extra or {}))


@contextlib.contextmanager
def loop(path: str, read_only: bool = False) -> Iterator[str]:
    argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [path]
    dev = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


@contextlib.contextmanager
def mounted(path: str, where: str, read_only: bool = False) -> Iterator[str]:
    os.makedirs(where, exist_ok=True)
    with loop(path, read_only) as dev:
        subprocess.run(["mount"] + (["-o", "ro"] if read_only else []) + [dev, where],
                       check=True)
        try:
            yield where
        finally:
            subprocess.run(["umount", where], check=True)


def make_fs(path: str, fstype: str) -> None:
    with open(path, "wb") as f:
        f.truncate(DISK_MIB * 2**20)
    subprocess.run(MKFS[fstype] + [path], check=True, capture_output=True)


def fill(root: str) -> None:
    """Every kind of file and metadata an instance's tree holds."""
    def p(*parts: str) -> str:
        return os.path.join(root, *parts)
    os.makedirs(p("etc/deep/er/still"))
    with open(p("etc/hostname"), "w") as f:
        f.write("kinds\n")
    with open(p("etc/deep/er/still", "n" * 200), "w") as f:  # a long name: pax
        f.write("long\n")
    with open(p("data.bin"), "wb") as out:
        out.write(os.urandom(300_000))
    with open(p("sparse"), "wb") as out:
        out.seek(40 * 2**20)
        out.write(b"end")
        out.seek(2**20)
        out.write(b"middle")
    os.link(p("data.bin"), p("etc/hardlink"))
    os.symlink("../data.bin", p("etc/relative-link"))
    os.symlink("/etc/shadow", p("absolute-link"))  # the instance's, never the node's
    os.mknod(p("null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(p("loop9"), 0o660 | 0o060000, os.makedev(7, 9))
    os.mkfifo(p("fifo"), 0o600)
    with open(p("setuid"), "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(p("setuid"), 0o4755)
    os.chown(p("setuid"), 0, 0)
    os.makedirs(p("home/user"))
    os.chown(p("home/user"), 1234, 5678)
    os.chmod(p("home/user"), 0o2750)
    with open(p("home/user/file"), "w") as f:
        f.write("mine\n")
    os.chown(p("home/user/file"), 1234, 5678, follow_symlinks=False)
    os.lchown(p("etc/relative-link"), 1234, 5678)
    subprocess.run(["setcap", "cap_net_raw+ep", p("setuid")], check=True)
    subprocess.run(["setfacl", "-m", "u:4321:rw,g:8765:r", p("home/user/file")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:4321:rwx", p("home/user")], check=True)
    os.setxattr(p("data.bin"), "user.site", b"kept")
    os.setxattr(p("etc"), "trusted.overlay.opaque", b"y")
    os.setxattr(p("etc/hostname"), "security.ima", IMA)
    for rel, when in (("data.bin", 1_500_000_000), ("etc/deep", 1_400_000_000),
                      ("home/user/file", 1_000_000_000)):
        os.utime(p(rel), ns=(when * 10**9 + 123456789, when * 10**9 + 987654321))
    os.utime(p("etc/relative-link"), ns=(10**18, 10**18), follow_symlinks=False)


def export_disk(tree, disk: str, stream: str, **extra: str) -> int:
    """Export ``disk`` as data disk 1 into ``stream``; the size it announced."""
    return int(backupio.export_announcing(tree, disk_env("export", disk, extra=extra), stream))


def import_disk_script(tree, disk: str, stream: str, check: bool = True):
    with open(stream, "rb") as inp:
        return run_script(tree, "import", disk_env("import", disk), stdin=inp.fileno(),
                          check=check)


def restore_onto(stream: str, fstype: str, disk: str, where: str) -> str:
    """What import does for a data disk of ``fstype``, the filesystem made here."""
    make_fs(disk, fstype)
    with mounted(disk, where) as target, open(stream, "rb") as inp:
        kind, head = import_disk.read_kind(inp.fileno())
        import_disk.restore_stream(target, inp.fileno(), kind, head)
    return kind


@pytest.mark.parametrize("target", TYPES)
@pytest.mark.parametrize("source", TYPES)
def test_a_tree_exported_from_each_type_imports_onto_each_type(os_tree, tmp_path,
                                                               source, target):
    src = str(tmp_path / "src.img")
    make_fs(src, source)
    with mounted(src, str(tmp_path / "fill")) as root:
        fill(root)
    stream = str(tmp_path / "backup")
    announced = export_disk(os_tree, src, stream)
    size = os.path.getsize(stream)
    with open(stream, "rb") as f:
        assert backupstream.detect(f.read(backupstream.PEEK_BYTES)) == KIND[source]
    # (A few percent of a real instance; this tree is tiny: dump's maps and
    # padding and tar's last record weigh more.)
    assert abs(announced - size) <= max(size * 0.05, 128 * 1024), (announced, size)

    dst = str(tmp_path / "dst.img")
    assert restore_onto(stream, target, dst, str(tmp_path / "dst")) == KIND[source]

    with mounted(src, str(tmp_path / "a"), read_only=True) as a, \
            mounted(dst, str(tmp_path / "b"), read_only=True) as b:
        diff = differences(a, b)
        assert diff == [], "\n".join(diff)
        # The sparse file stays sparse; a tar archive keeps timestamps to the
        # microsecond at least (dump(8) keeps whole seconds).
        assert os.lstat(os.path.join(b, "sparse")).st_blocks * 512 < 2**20
        for rel in ("data.bin", "home/user/file", "etc/deep") * (KIND[source] == "tar"):
            sa, sb = os.lstat(os.path.join(a, rel)), os.lstat(os.path.join(b, rel))
            assert (sa.st_mtime_ns // 1000) == (sb.st_mtime_ns // 1000), rel
        assert not os.path.exists(os.path.join(b, "restoresymtable"))
    subprocess.run({"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"],
                    "btrfs": ["btrfs", "check"]}[target] + [dst], check=True,
                   capture_output=True)


def test_a_data_disk_exported_as_tar_imports_through_the_script_onto_ext4(os_tree,
                                                                          tmp_path):
    src = str(tmp_path / "src.img")
    make_fs(src, "xfs")
    with mounted(src, str(tmp_path / "fill")) as root:
        fill(root)
    stream = str(tmp_path / "backup")
    export_disk(os_tree, src, stream)
    dst = scripts.sparse_disk(str(tmp_path), DISK_MIB, "disk1.img")
    import_disk_script(os_tree, dst, stream)
    assert scripts.blkid(dst, "TYPE") == "ext4"
    with mounted(src, str(tmp_path / "a"), read_only=True) as a, \
            mounted(dst, str(tmp_path / "b"), read_only=True) as b:
        assert differences(a, b) == []


def raw_disk(path: str, mib: int = 64) -> None:
    """A disk with no filesystem: scattered data, holes, a partition table's bytes."""
    with open(path, "wb") as f:
        f.truncate(mib * 2**20)
        for offset in (0, 3 * 2**20 + 17, mib * 2**19 + 4096 * 5, mib * 2**20 - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))


def test_a_raw_data_disk_round_trips_bit_for_bit_and_sparse(os_tree, tmp_path):
    src = str(tmp_path / "raw.img")
    raw_disk(src)
    stream = str(tmp_path / "backup")
    announced = export_disk(os_tree, src, stream)
    size = os.path.getsize(stream)
    assert announced == size
    assert size < 2**20  # the holes are not in the stream
    with open(stream, "rb") as f:
        head = f.read(backupstream.PEEK_BYTES)
    assert backupstream.detect(head) == "raw"
    assert backupstream.RawHeader.decode(head).size == 64 * 2**20
    # Onto a larger disk that held something: the holes must read as zeroes.
    dst = str(tmp_path / "disk1.img")
    with open(dst, "wb") as f:
        f.write(b"\xff" * 80 * 2**20)
    import_disk_script(os_tree, dst, stream)
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read(64 * 2**20)
    assert os.stat(dst).st_blocks * 512 < 20 * 2**20  # holes punched


def test_a_raw_stream_refuses_a_smaller_disk_and_disk_0(os_tree, tmp_path):
    src = str(tmp_path / "raw.img")
    raw_disk(src)
    stream = str(tmp_path / "backup")
    export_disk(os_tree, src, stream)
    small = scripts.sparse_disk(str(tmp_path), 32, "small.img")
    res = import_disk_script(os_tree, small, stream, check=False)
    assert res.returncode != 0
    assert "at least 67108864 bytes" in res.stderr.decode()
    assert os.stat(small).st_blocks == 0  # nothing written
    with open(stream, "rb") as inp:
        res = run_script(os_tree, "import", disk_env("import", small, index=0),
                         stdin=inp.fileno(), check=False)
    assert res.returncode != 0
    assert "imported as disk 0" in res.stderr.decode()


@pytest.mark.parametrize("fstype", ["xfs", "raw"])
@pytest.mark.parametrize("cut", ["half", "end-blocks", "header"])
def test_truncated_tar_and_raw_streams_are_refused(os_tree, tmp_path, fstype, cut):
    src = str(tmp_path / "src.img")
    if fstype == "raw":
        raw_disk(src)
    else:
        make_fs(src, fstype)
        with mounted(src, str(tmp_path / "fill")) as root:
            fill(root)
    stream = str(tmp_path / "backup")
    export_disk(os_tree, src, stream)
    with open(stream, "rb") as f:
        data = f.read()
    if cut == "half":
        data = data[: len(data) // 2]
    elif cut == "end-blocks":
        # tar: the last member complete, the end-of-archive blocks gone;
        # raw: the end record gone.
        if fstype == "raw":
            data = data[:-backupstream.RECORD_SIZE]
        else:
            body = data.rstrip(b"\0")
            data = body.ljust(-(-len(body) // 512) * 512, b"\0")
    else:
        data = data[:300]
    bad = str(tmp_path / "bad")
    with open(bad, "wb") as f:
        f.write(data)
    dst = scripts.sparse_disk(str(tmp_path), DISK_MIB, "disk1.img")
    res = import_disk_script(os_tree, dst, bad, check=False)
    assert res.returncode != 0
    tail = "\n".join(res.stderr.decode().strip().splitlines()[-6:])
    assert "ERROR: import failed" in tail
    assert "truncated" in tail, tail


def test_a_dump_imported_as_a_data_disk_gives_the_same_tree(os_tree, tmp_path):
    src = str(tmp_path / "src.img")
    make_fs(src, "ext4")
    with mounted(src, str(tmp_path / "fill")) as root:
        fill(root)
    stream = str(tmp_path / "backup")
    export_disk(os_tree, src, stream)
    # Plain restore(8) reads it: a dump stream as the shell edition's.
    listing = subprocess.run(["restore", "-t", "-f", stream], capture_output=True, text=True)
    assert listing.returncode == 0 and "./etc/hostname" in listing.stdout
    dst = scripts.sparse_disk(str(tmp_path), DISK_MIB, "disk1.img")
    import_disk_script(os_tree, dst, stream)
    with mounted(src, str(tmp_path / "a"), read_only=True) as a, \
            mounted(dst, str(tmp_path / "b"), read_only=True) as b:
        assert differences(a, b) == []


def hostile_tar(canary_dir: str) -> bytes:
    """A tar stream trying every way out of the target tar has: symlinks and
    hard links to the node's files, members written through them, absolute
    names, ``..``, a setuid program, a device node of the node's disk."""
    out = io.BytesIO()

    def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"tenant\n",
            link: str = "", mode: int = 0o644, devmajor: int = 0, devminor: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = kind, link, mode
        info.devmajor, info.devminor = devmajor, devminor
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add("./out", tarfile.SYMTYPE, link=canary_dir)
        add("./out/planted")
        add("./out/canary")
        add("./up", tarfile.SYMTYPE, link="../../../../../../../..")
        add(f"./up{canary_dir}/planted-up")
        add(f"{canary_dir}/planted-absolute")
        add(f"../../../../../../..{canary_dir}/planted-dotdot")
        add("./hard", tarfile.LNKTYPE, link=f"{canary_dir}/canary")
        add("./hard", data=b"overwritten through a hard link\n")
        add("./file-link", tarfile.SYMTYPE, link=f"{canary_dir}/canary")
        add("./file-link", data=b"overwritten through a symlink\n")
        add("./setuid", mode=0o4755, data=b"#!/bin/sh\n")
        add("./disk", tarfile.BLKTYPE, mode=0o666, devmajor=7, devminor=0)
    return out.getvalue()


def test_a_hostile_tar_stream_writes_nothing_outside_the_data_disk(os_tree, tmp_path):
    canary_dir = str(tmp_path / "canary")
    os.makedirs(canary_dir)
    canary = os.path.join(canary_dir, "canary")
    with open(canary, "w") as f:
        f.write("node\n")
    stream = str(tmp_path / "hostile.tar")
    with open(stream, "wb") as f:
        f.write(hostile_tar(canary_dir))
    dst = scripts.sparse_disk(str(tmp_path), DISK_MIB, "disk1.img")
    res = import_disk_script(os_tree, dst, stream, check=False)
    assert os.listdir(canary_dir) == ["canary"]
    with open(canary) as f:
        assert f.read() == "node\n"
    if res.returncode == 0:
        with mounted(dst, str(tmp_path / "b"), read_only=True) as b:
            # What tar made stays inside, mounted nosuid and nodev on the node.
            assert os.readlink(os.path.join(b, "out")) == canary_dir
            assert not os.path.exists(os.path.join(b, canary_dir.lstrip("/"), "x"))
    else:
        assert "ERROR: import failed" in res.stderr.decode()


# The root types create can make among those the backups are tested with:
# ext4 today; XFS and Btrfs join the matrix as soon as the filesystem
# parameter accepts them (filesystems.ROOT_TYPES).
ROOT_PAIRS = [(a, b) for a in TYPES for b in TYPES
              if a in filesystems.ROOT_TYPES and b in filesystems.ROOT_TYPES]


@pytest.mark.parametrize("source,target", ROOT_PAIRS, ids=[f"{a}-{b}" for a, b in ROOT_PAIRS])
def test_a_root_exported_from_each_root_type_imports_onto_each(tree, tmp_path, source, target):
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    run_script(tree, "create", scripts.create_env("bk1.example.org", disk,
                                                  OSP_FILESYSTEM=source))
    before = str(tmp_path / "before")
    backupio.copy_tree_out(disk, before)
    stream = str(tmp_path / "root.backup")
    backupio.export_to_file(tree, disk, stream, OSP_FILESYSTEM=source)
    with open(stream, "rb") as f:
        assert backupstream.detect(f.read(backupstream.PEEK_BYTES)) == KIND[source]
    new_disk = scripts.sparse_disk(str(tmp_path), 1024, "new.img")
    backupio.import_from_file(tree, new_disk, stream, OSP_FILESYSTEM=target)
    after = str(tmp_path / "after")
    backupio.copy_tree_out(new_disk, after)
    assert tree_differences(before, after, ignore=backupio.CHANGED_BY_IMPORT,
                            ignore_mtime=backupio.MTIME_CHANGED_BY_IMPORT) == []
    with scripts.root_device(new_disk) as dev:
        uuid = scripts.blkid(dev, "TYPE"), scripts.blkid(dev, "UUID")
    assert uuid[0] == target
    with scripts.mounted_root(new_disk) as root:
        assert [f"UUID={uuid[1]}", "/", target] == backupio.fstab_root_and_swap(root)[0][:3]


def test_a_raw_data_disk_round_trips_through_block_devices(os_tree, tmp_path):
    """A block device is read whole; holes of a file disk's stream are zeroed
    on a block device (BLKZEROOUT) as on a file (punched)."""
    src = str(tmp_path / "raw.img")
    raw_disk(src, 16)
    from_file = str(tmp_path / "from-file")
    export_disk(os_tree, src, from_file)
    dst = str(tmp_path / "dst.img")
    with open(dst, "wb") as f:
        f.write(b"\xff" * 16 * 2**20)
    with loop(dst) as dev:
        import_disk_script(os_tree, dev, from_file)
        from_device = str(tmp_path / "from-device")
        announced = export_disk(os_tree, dev, from_device)
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
    size = os.path.getsize(from_device)
    assert announced == size
    assert size > 16 * 2**20  # the whole device, holes and all
    copy = str(tmp_path / "copy.img")
    with open(copy, "wb") as f:
        f.truncate(16 * 2**20)
    import_disk_script(os_tree, copy, from_device)
    with open(src, "rb") as a, open(copy, "rb") as b:
        assert a.read() == b.read()


def test_a_raw_stream_with_unaligned_records_zeroes_exactly_its_holes_on_a_block_device(
        os_tree, tmp_path):
    size = 2**20
    stream = bytearray(backupstream.RawHeader(size).encode())
    records = ((1000, b"a" * 100), (5000, b"b" * 3), (size - 7, b"c" * 7))
    for offset, data in records:
        stream += backupstream._RECORD.pack(backupstream.TAG_DATA, 0, offset, len(data)) + data
    stream += backupstream._RECORD.pack(backupstream.TAG_END, 0, size, 110)
    path = str(tmp_path / "raw.stream")
    with open(path, "wb") as f:
        f.write(stream)
    dst = str(tmp_path / "dst.img")
    with open(dst, "wb") as f:
        f.write(b"\xff" * size)
    with loop(dst) as dev:
        import_disk_script(os_tree, dev, path)
    expected = bytearray(size)
    for offset, data in records:
        expected[offset:offset + len(data)] = data
    with open(dst, "rb") as f:
        assert f.read() == bytes(expected)


def test_an_xfs_data_disk_exports_while_a_clone_of_it_is_mounted(os_tree, tmp_path):
    src = str(tmp_path / "src.img")
    make_fs(src, "xfs")
    with mounted(src, str(tmp_path / "fill")) as root:
        fill(root)
    clone = str(tmp_path / "clone.img")
    subprocess.run(["cp", "--sparse=always", src, clone], check=True)
    with mounted(clone, str(tmp_path / "clone")):
        export_disk(os_tree, src, str(tmp_path / "backup"))
    with open(str(tmp_path / "backup"), "rb") as f:
        assert backupstream.detect(f.read(backupstream.PEEK_BYTES)) == "tar"
