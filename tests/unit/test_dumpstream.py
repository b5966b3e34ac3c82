"""Recognising a complete dump(8) stream by its TS_END trailer."""

from __future__ import annotations

import os

from ganeti_debootstrap import dumpstream
from tests.dumprecords import header


def test_end_record_is_recognised_in_both_byte_orders():
    assert dumpstream.is_end_record(header(5, "<"))
    assert dumpstream.is_end_record(header(5, ">"))


def test_other_headers_and_bad_checksums_are_not_end_records():
    assert not dumpstream.is_end_record(header(1))
    assert not dumpstream.is_end_record(header(5, magic=1234))
    bad = bytearray(header(5))
    bad[100] ^= 1
    assert not dumpstream.is_end_record(bytes(bad))
    assert not dumpstream.is_end_record(b"\0" * 1024)
    assert not dumpstream.is_end_record(header(5)[:512])


def pump(data: bytes) -> dumpstream.StreamPump:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    p = dumpstream.StreamPump(src_r, dst_w)
    p.start()
    os.write(src_w, data)
    os.close(src_w)
    received = b""
    while chunk := os.read(dst_r, 65536):
        received += chunk
    p.join()
    os.close(src_r)
    os.close(dst_r)
    assert received == data
    return p


def test_pump_copies_and_accepts_a_complete_stream():
    data = header(1) + os.urandom(4096) + header(5) + header(5)
    p = pump(data)
    assert p.total == len(data) and p.complete


def test_pump_flags_a_truncated_stream():
    data = header(1) + os.urandom(4096) + header(5)
    assert not pump(data[:-1024]).complete
    assert not pump(data[:-10]).complete
    assert not pump(b"").complete
