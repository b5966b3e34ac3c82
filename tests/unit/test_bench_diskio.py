"""The benchmark's disk measurements: FIEMAP accounting, the floor writer,
the bounded busy writer, and the sizes part's image name (no timing)."""

from __future__ import annotations

import os
import sys
import time

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from gidb_bench import diskio, procs, sizes  # noqa: E402

MIB = 2**20
FALLOC_FL_KEEP_SIZE = 0x01


def test_allocation_counts_data_and_unwritten_extents_apart(tmp_path):
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(8 * MIB)
        f.write(os.urandom(3 * MIB))
    fd = os.open(path, os.O_RDWR)
    try:
        # Preallocated without data, as tune2fs's zeroing leaves a journal.
        os.posix_fallocate(fd, 32 * MIB, 5 * MIB)
    finally:
        os.close(fd)
    found = diskio.allocation(path)
    assert found.written == 3 * MIB
    assert found.unwritten == 5 * MIB
    assert found.allocated == 8 * MIB


def test_a_sparse_file_without_data_has_nothing_allocated(tmp_path):
    path = tmp_path / "empty.img"
    with open(path, "wb") as f:
        f.truncate(128 * MIB)
    assert diskio.allocation(str(path)) == diskio.Allocation(0, 0)


def test_the_floor_writes_the_bytes_rounded_to_4k_and_removes_its_file(tmp_path, monkeypatch):
    path = str(tmp_path / "floor.dat")
    seen = []
    original = os.fsync

    def fsync(fd: int) -> None:  # records the file's size at the fsync, then syncs
        seen.append(os.fstat(fd).st_size)
        original(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    seconds = diskio.write_direct(path, 9 * MIB + 1)
    assert seconds > 0
    assert seen == [9 * MIB + 4096]
    assert not os.path.exists(path)


def test_the_busy_writer_stays_within_its_file_size_and_stops(tmp_path):
    writer = diskio.BusyWriter(str(tmp_path / "busy"), str(tmp_path / "busy.log"),
                               size=16 * MIB, limit=30)
    writer.start()
    try:
        pid = writer.running.proc.pid if writer.running else 0
        time.sleep(0.5)
        assert 0 < os.path.getsize(writer.path) <= 16 * MIB
    finally:
        writer.stop()
    assert not os.path.exists(writer.path)
    assert not os.path.exists(f"/proc/{pid}")
    assert pid not in procs._live


def test_the_busy_writers_streams_each_write_their_own_part_of_the_file(tmp_path):
    writer = diskio.BusyWriter(str(tmp_path / "busy"), str(tmp_path / "busy.log"),
                               size=16 * MIB, limit=30, streams=2)
    writer.start()
    try:
        # The second stream writes from 8 MiB on; the first below it.
        found = diskio.allocation(writer.path)
        size = os.path.getsize(writer.path)
    finally:
        writer.stop()
    assert 8 * MIB < size <= 16 * MIB
    assert found.written >= 8 * MIB


def test_the_busy_writer_ends_by_itself_when_its_time_is_up(tmp_path):
    writer = diskio.BusyWriter(str(tmp_path / "busy"), str(tmp_path / "busy.log"),
                               size=4 * MIB, limit=1.5)
    writer.start()
    assert writer.running is not None
    result = procs.wait(writer.running)
    assert result.returncode == 0
    assert result.seconds < 10
    writer.running = None
    writer.stop()


def test_a_busy_writer_that_cannot_write_is_an_error_and_leaves_nothing_running(tmp_path):
    writer = diskio.BusyWriter(str(tmp_path / "busy"), str(tmp_path / "busy.log"))
    os.makedirs(writer.path)  # a directory where its file should be
    with pytest.raises(procs.BenchError, match="exited at once"):
        writer.start()
    assert writer.running is None
    assert not procs._live


def test_the_image_measured_is_the_ext4_one_beside_the_archive():
    assert (sizes.image_of("/c/cache-trixie-amd64-2f81.tar")
            == "/c/cache-trixie-amd64-2f81.ext4.img")

