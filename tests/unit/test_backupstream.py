"""Telling backup streams apart by their first bytes; the raw format; tar's end."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from ganeti_debootstrap import backupstream
from ganeti_debootstrap.backupstream import RawHeader, StreamError
from tests.dumprecords import header


def tar_archive(members: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"user.note": "x" * 300} if fmt == tarfile.PAX_FORMAT else {}
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_each_kind_is_told_from_its_first_bytes():
    assert backupstream.detect(header(1) + header(2)) == "dump"
    assert backupstream.detect(header(1, ">")) == "dump"
    assert backupstream.detect(tar_archive({"./etc/hostname": b"x\n"})[:1024]) == "tar"
    assert backupstream.detect(tar_archive({"a": b""}, tarfile.GNU_FORMAT)[:1024]) == "tar"
    assert backupstream.detect(RawHeader(2**30).encode() + bytes(512)) == "raw"


@pytest.mark.parametrize("head", [b"", b"\0" * 1024, os.urandom(1024), header(5),
                                  header(1)[:1000], b"#!/bin/sh\n" * 100])
def test_other_bytes_are_no_kind(head):
    assert backupstream.detect(head) is None


def test_a_raw_header_is_neither_a_dump_nor_a_tar_header():
    head = RawHeader(123456789).encode()
    assert len(head) == backupstream.RAW_HEADER_SIZE
    assert not backupstream.is_tar_header(head)
    assert not backupstream.is_dump_start(head + bytes(512))
    assert head[257:262] == bytes(5)
    # Its first word is no dump record type in either byte order.
    assert int.from_bytes(head[:4], "little") > 8 and int.from_bytes(head[:4], "big") > 8


def test_a_tar_header_with_a_bad_checksum_is_no_tar():
    block = bytearray(tar_archive({"a": b"data"})[:512])
    block[0] ^= 1
    assert not backupstream.is_tar_header(bytes(block))


def test_the_raw_header_round_trips_and_refuses_damage():
    head = RawHeader(5 * 2**40 + 7).encode()
    assert RawHeader.decode(head).size == 5 * 2**40 + 7
    with pytest.raises(StreamError, match="truncated"):
        RawHeader.decode(head[:100])
    damaged = bytearray(head)
    damaged[20] ^= 1
    with pytest.raises(StreamError, match="damaged"):
        RawHeader.decode(bytes(damaged))
    trailing = bytearray(head)
    trailing[400] = 1
    with pytest.raises(StreamError, match="damaged"):
        RawHeader.decode(bytes(trailing))


def test_a_raw_header_of_a_later_version_is_refused_with_the_version():
    head = bytearray(RawHeader(4096).encode())
    head[12:14] = (2).to_bytes(2, "big")
    crc = backupstream.zlib.crc32(bytes(head[:24]))
    head[24:28] = crc.to_bytes(4, "big")
    with pytest.raises(StreamError, match="version 2"):
        RawHeader.decode(bytes(head))


@pytest.mark.real_commands
def test_a_sparse_file_streams_its_data_only_and_reads_back_bit_for_bit(tmp_path: Path):
    src = tmp_path / "disk"
    with open(src, "wb") as f:
        f.truncate(8 * 2**20)
        f.seek(2**20)
        f.write(b"a" * 5000)
        f.seek(7 * 2**20)
        f.write(b"b" * 100)
    stream = tmp_path / "stream"
    with open(src, "rb") as disk, open(stream, "wb") as out:
        extents = list(backupstream.data_extents(disk.fileno(), 8 * 2**20))
        written = backupstream.write_raw(disk.fileno(), 8 * 2**20, extents, out.fileno())
    assert written == os.path.getsize(stream) == backupstream.raw_stream_size(extents)
    assert written < 2**20
    dst = tmp_path / "copy"
    dst.write_bytes(b"\xff" * 9 * 2**20)
    with open(stream, "rb") as inp, open(dst, "r+b") as out:
        head = backupstream.read_head(inp.fileno())
        assert backupstream.read_raw(inp.fileno(), head, out.fileno(), 9 * 2**20) == 8 * 2**20
    assert dst.read_bytes()[:8 * 2**20] == src.read_bytes()


@pytest.mark.real_commands
@pytest.mark.parametrize("cut", [600, 512 + 24 + 100, -24, -1])
def test_a_cut_raw_stream_is_refused(tmp_path: Path, cut: int):
    data = bytearray(RawHeader(8192).encode())
    data += backupstream._RECORD.pack(backupstream.TAG_DATA, 0, 4096, 1024) + b"z" * 1024
    data += backupstream._RECORD.pack(backupstream.TAG_END, 0, 8192, 1024)
    stream = tmp_path / "stream"
    stream.write_bytes(bytes(data[:cut]))
    dst = tmp_path / "copy"
    dst.write_bytes(bytes(8192))
    with open(stream, "rb") as inp, open(dst, "r+b") as out, \
            pytest.raises(StreamError, match="truncated|damaged"):
        backupstream.read_raw(inp.fileno(), b"", out.fileno(), 8192)


@pytest.mark.real_commands
def test_raw_records_out_of_order_or_off_the_disk_are_refused(tmp_path: Path):
    for offset, length in ((8000, 1024), (0, 0)):
        data = RawHeader(8192).encode()
        data += backupstream._RECORD.pack(backupstream.TAG_DATA, 0, offset, length)
        data += b"z" * length + backupstream._RECORD.pack(backupstream.TAG_END, 0, 8192, length)
        stream = tmp_path / "stream"
        stream.write_bytes(data)
        dst = tmp_path / "copy"
        dst.write_bytes(bytes(8192))
        with open(stream, "rb") as inp, open(dst, "r+b") as out, \
                pytest.raises(StreamError, match="damaged record"):
            backupstream.read_raw(inp.fileno(), b"", out.fileno(), 8192)


def feed(data: bytes, step: int) -> backupstream.TarEnd:
    end = backupstream.TarEnd()
    for i in range(0, len(data), step):
        end.feed(data[i:i + step])
    return end


@pytest.mark.parametrize("step", [1, 7, 512, 10240, 1 << 20])
def test_a_whole_tar_archive_is_complete_in_any_chunking(step):
    data = tar_archive({"a": b"x" * 1000, "b/" + "n" * 150: os.urandom(3000), "c": b""})
    assert feed(data, step).complete


def test_a_tar_archive_cut_between_members_or_inside_one_is_not_complete():
    data = tar_archive({"a": b"x" * 1000, "b": os.urandom(3000)})
    body = data.rstrip(b"\0")
    whole_members = body.ljust(-(-len(body) // 512) * 512, b"\0")
    for cut in (whole_members, data[:700], data[:len(body) // 2]):
        end = feed(cut, 4096)
        assert not end.complete
        assert "without tar's end-of-archive" in backupstream.tar_damage(end, len(cut))


def test_a_lone_zero_block_before_another_member_is_damage():
    one = tar_archive({"a": b"x"})
    first = one.rstrip(b"\0")
    first = first.ljust(-(-len(first) // 512) * 512, b"\0")
    end = feed(first + bytes(512) + one, 512)
    assert not end.complete and "lone zero block" in end.damaged


def test_a_pax_size_overrides_the_header_size():
    # GNU tar writes a member over 8 GiB with its size in the pax header.
    info = tarfile.TarInfo("big")
    info.size = 100
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info.pax_headers = {"size": "100000"}
        tar.addfile(info, io.BytesIO(b"y" * 100))
    data = out.getvalue()
    # The member's data is 100000 bytes by its pax header: the 100 bytes and
    # the end-of-archive blocks after them are only part of it.
    end = feed(data, 512)
    assert not end.complete


@pytest.mark.real_commands
def test_an_output_that_takes_no_sendfile_gets_the_data_by_read_and_write(tmp_path: Path):
    # sendfile refuses an output opened for appending (EINVAL), as some
    # sockets and terminals refuse it.
    src = tmp_path / "disk"
    src.write_bytes(os.urandom(3 * 4096))
    stream = tmp_path / "stream"
    with open(src, "rb") as disk, open(stream, "ab") as out:
        backupstream.write_raw(disk.fileno(), 3 * 4096, [(0, 3 * 4096)], out.fileno())
    data = stream.read_bytes()
    start = backupstream.RAW_HEADER_SIZE + backupstream.RECORD_SIZE
    assert data[start:start + 3 * 4096] == src.read_bytes()
