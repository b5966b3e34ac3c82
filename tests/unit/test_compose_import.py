"""import composed: every command it runs, in order, and the release after a failure.

import runs through its entry point (import_disk.run with the Request
parsed from Ganeti's environment) on a disk file, the backup stream on its
standard input, with every external command faked (tests/fakenode.py):
the disk is formatted as create formats it, the root mounted without
setuid and device nodes, and the confined restore fills it with a small
system tree (tests/systemtree.py).
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from ganeti_debootstrap import backupstream, confine, environment, import_disk
from ganeti_debootstrap.errors import CommandError
from ganeti_debootstrap.paths import Paths
from tests.dumprecords import header
from tests.fakenode import DISK0_MIB, ganeti_env, shown, undo
from tests.systemtree import make_tree, write

MIB = 2**20

# A complete dump stream: a header, data, and dump's end-of-dump trailer.
STREAM = header(1) + bytes(2048) + header(5) + header(5)

SETUP = [
    "dpkg --print-architecture",
    "wipefs --all --force --quiet DISK",
    "sfdisk --quiet --no-reread --no-tell-kernel DISK",
    "losetup --find --show DISK",
    f"losetup --find --show --offset {MIB} --sizelimit {(DISK0_MIB - 1) * MIB} DISK",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop1",
    "blkid -p -o value -s UUID /dev/loop1",
    "mount -t ext4 -o nosuid,nodev /dev/loop1 MNT",
    "/usr/bin/python3 -I -S CONFINE MNT -- restore -r -y -f -",
]
LOOPS = ["/dev/loop0", "/dev/loop1"]
RELEASE = ["umount MNT", "losetup --detach /dev/loop1", "losetup --detach /dev/loop0"]


def restored(argv: Sequence[str]) -> None:
    """What restore leaves in the target (after the confinement's "--"): the
    old instance's system, its old fstab and restore's own bookkeeping."""
    target = Path(argv[argv.index("--") - 1])
    make_tree(target)
    write(target / "etc/fstab", "UUID=0ld-r00t / ext4 defaults 0 1\n")
    write(target / "restoresymtable", "table")


@pytest.fixture
def stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bytes], None]]:
    """Puts a backup stream on standard input, as Ganeti pipes it."""
    opened: list[BinaryIO] = []

    def feed(data: bytes) -> None:
        stream = tmp_path / f"backup{len(opened)}.dump"
        stream.write_bytes(data)
        opened.append(open(stream, "rb"))  # noqa: SIM115 (closed at teardown)
        monkeypatch.setattr(sys, "stdin", opened[-1])

    feed(STREAM)
    yield feed
    for f in opened:
        f.close()


def run_import(paths: Paths, disk: str) -> None:
    env = ganeti_env(disk, IMPORT_DISK_PATH=disk, IMPORT_INDEX="0")
    import_disk.run(environment.parse("import", [], env), paths)



def test_import_runs_its_commands_in_order_and_adapts_the_restored_system(
        fake_node, disk0, paths, stdin):
    fake_node.fake.expect("/usr/bin/python3", action=restored, reads_stdin=True)
    run_import(paths, disk0)
    assert shown(fake_node.fake, disk0, CONFINE=confine.__file__) == SETUP + RELEASE
    assert fake_node.leftovers() == []
    root = fake_node.root_files(disk0, MIB)
    uuid = fake_node.filesystems[(os.path.realpath(disk0), MIB)].uuid
    fstab = (root / "etc/fstab").read_text()
    assert f"UUID={uuid}" in fstab and "0ld-r00t" not in fstab
    assert not (root / "restoresymtable").exists()


@pytest.mark.parametrize("step", range(len(SETUP)), ids=lambda k: SETUP[k].split()[0] + str(k))
def test_a_failed_step_releases_what_was_set_up_in_reverse(fake_node, disk0, paths,
                                                           stdin, step):
    fake_node.fake.expect("/usr/bin/python3", action=restored, reads_stdin=True)
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_import(paths, disk0)
    assert shown(fake_node.fake, disk0, CONFINE=confine.__file__) == (
        SETUP[:step + 1] + undo(SETUP[:step], LOOPS))
    assert fake_node.leftovers() == []


def test_a_truncated_stream_fails_the_import_and_releases_in_reverse(
        fake_node, disk0, paths, stdin):
    stdin(STREAM[:-2048])
    fake_node.fake.expect("/usr/bin/python3", action=restored, reads_stdin=True)
    with pytest.raises(import_disk.ImportError_, match="truncated or damaged"):
        run_import(paths, disk0)
    assert shown(fake_node.fake, disk0, CONFINE=confine.__file__) == SETUP + RELEASE
    assert fake_node.leftovers() == []


# --- data disks (IMPORT_INDEX > 0) ---------------------------------------

DATA_SETUP = [
    "dpkg --print-architecture",
    "losetup --find --show DISK",
    "mke2fs -F -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=0 /dev/loop0",
    "mount -t ext4 -o nosuid,nodev /dev/loop0 MNT",
    "/usr/bin/python3 -I -S CONFINE MNT -- tar --extract --file=- --format=posix --xattrs "
    "--xattrs-include=* --xattrs-exclude=trusted.SGI_ACL_* --acls --numeric-owner "
    "--same-owner --preserve-permissions --no-overwrite-dir --delay-directory-restore",
]
DATA_RELEASE = ["umount MNT", "losetup --detach /dev/loop0"]


def tar_stream() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("./data")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"data\n"))
    return out.getvalue()


@pytest.fixture
def disk1(tmp_path: Path) -> str:
    path = tmp_path / "disks" / "disk1.img"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\xee" * (4 * MIB))
    return str(path)


def run_import_data_disk(paths: Paths, disk0: str, disk1: str) -> None:
    env = ganeti_env(disk0, DISK_COUNT="2", DISK_1_PATH=disk1, IMPORT_INDEX="1",
                     IMPORT_DISK_PATH=disk1)
    import_disk.run(environment.parse("import", [], env), paths)


def test_a_tar_stream_onto_a_data_disk_gets_a_whole_disk_filesystem_and_nothing_else(
        fake_node, disk0, disk1, paths, stdin):
    stdin(tar_stream())
    fake_node.fake.expect("/usr/bin/python3", reads_stdin=True)
    run_import_data_disk(paths, disk0, disk1)
    assert shown(fake_node.fake, disk1, CONFINE=confine.__file__) == DATA_SETUP + DATA_RELEASE
    assert fake_node.leftovers() == []


@pytest.mark.parametrize("step", range(len(DATA_SETUP)),
                         ids=lambda k: DATA_SETUP[k].split()[0] + str(k))
def test_a_failed_step_of_a_data_disk_releases_in_reverse(fake_node, disk0, disk1, paths,
                                                          stdin, step):
    stdin(tar_stream())
    fake_node.fake.expect("/usr/bin/python3", reads_stdin=True)
    fake_node.fake.fail_at(step)
    with pytest.raises(CommandError, match="failed with exit status 1"):
        run_import_data_disk(paths, disk0, disk1)
    assert shown(fake_node.fake, disk1, CONFINE=confine.__file__) == (
        DATA_SETUP[:step + 1] + undo(DATA_SETUP[:step], ["/dev/loop0"]))
    assert fake_node.leftovers() == []


def test_a_tar_stream_without_its_end_blocks_fails_and_releases(fake_node, disk0, disk1,
                                                                paths, stdin):
    stdin(tar_stream().rstrip(b"\0").ljust(1536, b"\0"))
    fake_node.fake.expect("/usr/bin/python3", reads_stdin=True)
    with pytest.raises(import_disk.ImportError_, match="end-of-archive"):
        run_import_data_disk(paths, disk0, disk1)
    assert shown(fake_node.fake, disk1, CONFINE=confine.__file__) == DATA_SETUP + DATA_RELEASE
    assert fake_node.leftovers() == []


def test_a_raw_stream_is_written_onto_the_data_disk_holes_zeroed(fake_node, disk0, disk1,
                                                                 paths, stdin, tmp_path):
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(3 * MIB)
        f.seek(MIB)
        f.write(b"raw data")
    out = tmp_path / "raw"
    with open(src, "rb") as disk, open(out, "wb") as o:
        extents = list(backupstream.data_extents(disk.fileno(), 3 * MIB))
        backupstream.write_raw(disk.fileno(), 3 * MIB, extents, o.fileno())
    stdin(out.read_bytes())
    run_import_data_disk(paths, disk0, disk1)
    assert shown(fake_node.fake, disk1) == ["dpkg --print-architecture"]
    data = Path(disk1).read_bytes()
    assert data[:3 * MIB] == src.read_bytes() and data[3 * MIB:] == b"\xee" * MIB


@pytest.mark.parametrize("data", [b"", b"\0" * 4096, b"garbage" * 500])
def test_a_stream_of_no_kind_is_refused_before_the_disk_is_touched(fake_node, disk0, paths,
                                                                   stdin, data):
    stdin(data)
    with pytest.raises(backupstream.StreamError, match="not a dump, tar or raw stream"):
        run_import(paths, disk0)
    assert shown(fake_node.fake, disk0) == ["dpkg --print-architecture"]
    assert os.path.getsize(disk0) == DISK0_MIB * MIB


# --- data disks named in fstab by Ganeti's UUID of the disk -------------------

DISK1_UUID = "0e5f7c9a-1b2c-4d3e-8f40-5a6b7c8d9e0f"


def test_a_data_disk_is_remade_with_ganetis_uuid_of_the_disk(fake_node, disk0, disk1,
                                                            paths, stdin):
    stdin(tar_stream())
    fake_node.fake.expect("/usr/bin/python3", reads_stdin=True)
    env = ganeti_env(disk0, DISK_COUNT="2", DISK_1_PATH=disk1, DISK_1_UUID=DISK1_UUID,
                     IMPORT_INDEX="1", IMPORT_DISK_PATH=disk1, OSP_DATA_DISKS="format")
    import_disk.run(environment.parse("import", [], env), paths)
    [mkfs] = [c for c in shown(fake_node.fake, disk1) if c.startswith("mke2fs")]
    assert mkfs.endswith(f"-U {DISK1_UUID} /dev/loop0")


def test_disk_0s_import_names_the_data_disks_by_ganetis_uuids_in_fstab(fake_node, disk0,
                                                                      disk1, paths, stdin):
    """Whichever import runs first: the data disk's filesystem will carry it."""
    fake_node.fake.expect("/usr/bin/python3", action=restored, reads_stdin=True)
    env = ganeti_env(disk0, DISK_COUNT="2", DISK_1_PATH=disk1, DISK_1_UUID=DISK1_UUID,
                     IMPORT_INDEX="0", IMPORT_DISK_PATH=disk0, OSP_DATA_DISKS="format",
                     OSP_DATA_FILESYSTEM="xfs")
    import_disk.run(environment.parse("import", [], env), paths)
    fstab = (fake_node.root_files(disk0, MIB) / "etc/fstab").read_text().splitlines()
    assert f"UUID={DISK1_UUID}\t/srv/disk1\txfs\tdefaults,nofail\t0\t0" in fstab
    assert [line for line in fstab if "/srv/disk1" in line] == [
        f"UUID={DISK1_UUID}\t/srv/disk1\txfs\tdefaults,nofail\t0\t0"]
