"""What a backup stream holds, told from its first bytes; the raw and tar formats.

export writes one stream per disk Ganeti passes, of one of three kinds:

- ``dump``: a level-0 dump(8) of an ext2/3/4 filesystem (the shell
  edition's format, unchanged). Its first 1 KiB record is a TS_TAPE header:
  the int32 ``c_type`` 1, ``NFS_MAGIC`` (60012) as the 7th word, the 256
  words summing to CHECKSUM (dumpstream.py), in either byte order.
- ``tar``: a POSIX (pax) GNU tar archive of any other filesystem's tree
  (XFS, Btrfs), with owners (numeric), modes, links, device nodes, ACLs,
  extended attributes and file capabilities. Its first 512-byte block is a
  tar header: ``ustar`` at offset 257 and a valid header checksum.
- ``raw``: the bytes of a data disk holding no filesystem we know, in our
  own format: a 512-byte header (:class:`RawHeader`), then records of the
  disk's data extents (holes left out), then an end record.

The kinds cannot be mistaken for one another: the raw header starts with
``MAGIC`` (whose first word is no dump record type and which holds no
NFS_MAGIC at offset 24) and is zero from its checksum to the end, so it has
no ``ustar`` at 257; a dump record's first word is its type, 1, and a tar
header's checksum field holds octal digits where a dump record's words
could never sum right for both.

Everything here reads the tenant's bytes: each read is bounded, every
number checked before it is used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from . import dumpstream
from .errors import DefinitionError

Kind = Literal["dump", "tar", "raw"]

# How many bytes import reads before it knows the kind: one dump record.
PEEK_BYTES = dumpstream.RECORD

TAR_BLOCK = 512

# tar's options, export and import alike: POSIX (pax) archives, the only
# format holding extended attributes and ACLs; numeric owners (the
# instance's users are not the node's); extended attributes of every
# namespace (trusted.*, security.* with capabilities, system.* ACLs) but
# XFS's own copies of the ACLs (trusted.SGI_ACL_FILE, _DEFAULT, which XFS
# shows root beside system.posix_acl_*): on another type they would be
# stray attributes, and XFS makes them from the ACLs themselves.
TAR_OPTIONS = ("--format=posix", "--xattrs", "--xattrs-include=*",
               "--xattrs-exclude=trusted.SGI_ACL_*", "--acls", "--numeric-owner")
TS_TAPE = 1  # the first record of every dump stream


class StreamError(DefinitionError):
    """The backup stream is not one export writes, or is damaged."""


# --- detection ------------------------------------------------------------

def is_dump_start(record: bytes) -> bool:
    """Whether ``record`` is the TS_TAPE header a dump stream begins with."""
    return dumpstream.is_header(record, TS_TAPE)


def _octal(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text or any(c not in b"01234567" for c in text):
        return None
    return int(text, 8)


def is_tar_header(block: bytes) -> bool:
    """Whether ``block`` is a ustar/pax/GNU tar header with a valid checksum."""
    if len(block) < TAR_BLOCK or block[257:262] != b"ustar":
        return False
    stored = _octal(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:TAR_BLOCK])
    return stored == unsigned


def detect(head: bytes) -> Kind | None:
    """The kind of stream that begins with ``head`` (at least PEEK_BYTES of it
    when the stream is that long), None when it is none of ours."""
    if RawHeader.matches(head):
        return "raw"
    if is_tar_header(head[:TAR_BLOCK]):
        return "tar"
    if is_dump_start(head[:dumpstream.RECORD]):
        return "dump"
    return None


def describe(head: bytes) -> str:
    """What an unrecognised stream looks like, for the error message."""
    if not head:
        return "it is empty"
    if len(head) < TAR_BLOCK:
        return f"it holds only {len(head)} bytes"
    return f"it begins with {head[:16].hex(' ')}"


def read_head(fd: int, limit: int = PEEK_BYTES) -> bytes:
    """Up to ``limit`` bytes from the start of the stream on ``fd``, fewer only at its end."""
    head = b""
    while len(head) < limit:
        chunk = os.read(fd, limit - len(head))
        if not chunk:
            break
        head += chunk
    return head


# --- the raw format ---------------------------------------------------------

# The header: MAGIC, then (big-endian) version u16, flags u16, the disk's
# size in bytes u64, a CRC-32 of the bytes before it u32; zero to 512 bytes.
MAGIC = b"\x89GIDBRAW\r\n\x1a\n"  # PNG's trick: 8-bit, CR LF, ^Z, LF
RAW_VERSION = 1
_HEAD = struct.Struct(">12sHHQ")
_CRC = struct.Struct(">I")
RAW_HEADER_SIZE = 512
# Each extent: a tag, then (big-endian) its offset and length on the disk,
# then ``length`` bytes. The end record: tag END, the disk's size, the sum
# of every extent's length.
_RECORD = struct.Struct(">4sIQQ")
RECORD_SIZE = _RECORD.size
TAG_DATA = b"DATA"
TAG_END = b"END\0"
# Extents are cut into records of at most this much: a short read shows
# within one record of where the stream stopped.
MAX_RECORD_DATA = 64 * 2**20
_COPY = 2**20


@dataclass(frozen=True)
class RawHeader:
    """The header of a raw stream: the exported disk's size."""

    size: int

    def encode(self) -> bytes:
        head = _HEAD.pack(MAGIC, RAW_VERSION, 0, self.size)
        head += _CRC.pack(zlib.crc32(head))
        return head.ljust(RAW_HEADER_SIZE, b"\0")

    @staticmethod
    def matches(head: bytes) -> bool:
        """Whether ``head`` begins with our magic (the header may still be bad)."""
        return head.startswith(MAGIC)

    @classmethod
    def decode(cls, head: bytes) -> RawHeader:
        if len(head) < RAW_HEADER_SIZE or not cls.matches(head):
            raise StreamError("The backup stream's raw header is cut short: the stream "
                              "is truncated. Check the export it came from.")
        magic, version, flags, size = _HEAD.unpack_from(head)
        (crc,) = _CRC.unpack_from(head, _HEAD.size)
        rest = head[_HEAD.size + _CRC.size:RAW_HEADER_SIZE]
        if crc != zlib.crc32(head[:_HEAD.size]) or rest.count(0) != len(rest):
            raise StreamError("The backup stream's raw header is damaged (checksum). "
                              "Check the export it came from.")
        if version != RAW_VERSION or flags:
            raise StreamError(f"The backup stream is a raw disk image of format "
                              f"version {version} (flags {flags:#x}); this "
                              f"ganeti-instance-debootstrap reads version "
                              f"{RAW_VERSION}. Import it with the version that "
                              f"exported it, or a newer one.")
        return cls(size)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of ``fd`` that may hold data.

    A file's holes (SEEK_DATA/SEEK_HOLE) are left out; a block device, or a
    file system without those, is read whole.
    """
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        if size:
            yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                return
            if exc.errno == errno.EINVAL and pos == 0:  # no SEEK_DATA here
                yield 0, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            yield start, end - start
        pos = end


def _records(extents: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for offset, length in extents:
        while length:
            part = min(length, MAX_RECORD_DATA)
            yield offset, part
            offset += part
            length -= part


def raw_stream_size(extents: list[tuple[int, int]]) -> int:
    """The exact size of the raw stream of these extents."""
    records = sum(1 for _ in _records(extents))
    data = sum(length for _, length in extents)
    return RAW_HEADER_SIZE + records * RECORD_SIZE + data + RECORD_SIZE


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _send(out_fd: int, source_fd: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``offset`` of ``source_fd`` to ``out_fd``.

    sendfile: from the page cache into the pipe or file, no copy here; read
    and write where the output takes no sendfile (a terminal, a socket of
    another kind).
    """
    try:
        return os.sendfile(out_fd, source_fd, offset, count)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    data = os.pread(source_fd, count, offset)
    _write_all(out_fd, data)
    return len(data)


def write_raw(source_fd: int, size: int, extents: list[tuple[int, int]],
              out_fd: int) -> int:
    """Write the raw stream of ``source_fd``'s extents to ``out_fd``; its length."""
    _write_all(out_fd, RawHeader(size).encode())
    total = RAW_HEADER_SIZE
    data = 0
    for offset, length in _records(extents):
        _write_all(out_fd, _RECORD.pack(TAG_DATA, 0, offset, length))
        done = 0
        while done < length:
            sent = _send(out_fd, source_fd, offset + done, min(length - done, _COPY))
            if sent == 0:
                raise StreamError(f"The disk ended at byte {offset + done} while "
                                  f"{size} bytes were expected: it shrank during "
                                  f"the export. Export the stopped instance again.")
            done += sent
        total += RECORD_SIZE + length
        data += length
    _write_all(out_fd, _RECORD.pack(TAG_END, 0, size, data))
    return total + RECORD_SIZE


# <linux/fs.h>, <linux/falloc.h>
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SECTOR = 512
# The C library already loaded (no ldconfig run to find it, as find_library does).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` of the disk read as zeroes.

    A file: a hole punched; a block device: BLKZEROOUT (the device's write
    zeroes or discard where it has them, written zeroes otherwise).
    """
    if length <= 0:
        return
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        # BLKZEROOUT takes whole 512-byte sectors: the stream's offsets are
        # the tenant's, so the parts of sectors at either end are written.
        start = -(-offset // _SECTOR) * _SECTOR
        end = (offset + length) // _SECTOR * _SECTOR
        if end <= start:
            _pwrite_all(fd, bytes(length), offset)
            return
        _pwrite_all(fd, bytes(start - offset), offset)
        fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", start, end - start))
        _pwrite_all(fd, bytes(offset + length - end), end)
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_exactly(fd: int, n: int, buffered: bytearray) -> bytes:
    """``n`` bytes: first from ``buffered`` (the peeked head), then from ``fd``."""
    out = bytes(buffered[:n])
    del buffered[:n]
    while len(out) < n:
        chunk = os.read(fd, min(n - len(out), _COPY))
        if not chunk:
            break
        out += chunk
    return out


_TRUNCATED = ("The backup stream ended {where} before the raw image's end record: "
              "it is truncated, so the disk holds an incomplete copy. Check the "
              "export (its size, the transfer) and import again.")


def read_raw(source_fd: int, head: bytes, dest_fd: int, dest_size: int) -> int:
    """Write the raw stream (its first bytes ``head``, the rest on ``source_fd``)
    onto ``dest_fd``: extents written, holes zeroed. Returns the disk size it held.

    Refuses a disk smaller than the exported one before writing anything.
    """
    buffered = bytearray(head)
    header = RawHeader.decode(_read_exactly(source_fd, RAW_HEADER_SIZE, buffered))
    if header.size > dest_size:
        raise StreamError(
            f"The backup is a raw disk of {header.size} bytes, but the disk to "
            f"import it onto has {dest_size} bytes. Give the instance a disk of "
            f"at least {header.size} bytes (gnt-backup import --disk N:size=...).")
    pos = 0
    data = 0
    while True:
        record = _read_exactly(source_fd, RECORD_SIZE, buffered)
        if len(record) < RECORD_SIZE:
            raise StreamError(_TRUNCATED.format(where=f"at disk offset {pos}"))
        tag, reserved, offset, length = _RECORD.unpack(record)
        if tag == TAG_END:
            if reserved or offset != header.size or length != data:
                raise StreamError(f"The raw image's end record is damaged ({offset} "
                                  f"bytes, {length} of data, against {header.size} "
                                  f"and {data} read). Check the export it came from.")
            break
        if (tag != TAG_DATA or reserved or offset < pos or length == 0
                or length > MAX_RECORD_DATA or offset + length > header.size):
            raise StreamError(f"The raw image holds a damaged record after disk offset "
                              f"{pos} (tag {tag!r}, offset {offset}, length {length}): "
                              f"it is not what export writes. Check the export it "
                              f"came from.")
        zero_range(dest_fd, pos, offset - pos)
        done = 0
        while done < length:
            chunk = _read_exactly(source_fd, min(length - done, _COPY), buffered)
            if not chunk:
                raise StreamError(_TRUNCATED.format(
                    where=f"inside the record at disk offset {offset}"))
            _pwrite_all(dest_fd, chunk, offset + done)
            done += len(chunk)
        pos = offset + length
        data += length
    if _read_exactly(source_fd, 1, buffered):
        raise StreamError("The backup stream goes on after the raw image's end record: "
                          "it is not what export writes. Check the export it came from.")
    zero_range(dest_fd, pos, header.size - pos)
    return header.size


# --- the end of a tar archive ---------------------------------------------

# The largest pax extended header read to find a member's size: GNU tar
# writes a few hundred bytes, more with long names, ACLs and xattrs.
MAX_PAX_HEADER = 16 * 2**20


def _tar_number(field: bytes) -> int | None:
    """A numeric header field: octal, or GNU's base-256 (high bit set)."""
    if field and field[0] & 0x80:
        if field[0] & 0x40:  # negative
            return None
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    return _octal(field) if field.strip(b"\0 ") else 0


def _pax_size(data: bytes) -> int | None:
    """The ``size`` record of a pax extended header's data, if any."""
    size = None
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1:pos + length]
        pos += length
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                return None
    return size


class TarEnd:
    """Follows a tar archive header by header as it flows; ``complete`` once
    the end-of-archive marker (two zero blocks where a header is due) passed.

    GNU tar stops at a cut between members without an error, leaving a
    partial tree: only the marker says the archive is whole. ``damaged``
    says why the archive stopped making sense, if it did.
    """

    def __init__(self) -> None:
        self.complete = False
        self.damaged = ""
        self._skip = 0  # data bytes of the current member still to pass
        self._block = bytearray()  # a header block gathered across chunks
        self._zeros = 0  # zero blocks seen where a header was due
        self._pax: bytearray | None = None  # a pax header's data being read
        self._pax_left = 0
        self._next_size: int | None = None  # a pax header's size for the next member

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and not self.complete and not self.damaged:
            if self._pax is not None:
                take = min(self._pax_left, len(view))
                self._pax += view[:take]
                self._pax_left -= take
                view = view[take:]
                if self._pax_left == 0:
                    data, self._pax = bytes(self._pax), None
                    self._next_size = _pax_size(data)
                continue
            if self._skip:
                take = min(self._skip, len(view))
                self._skip -= take
                view = view[take:]
                continue
            take = min(TAR_BLOCK - len(self._block), len(view))
            self._block += view[:take]
            view = view[take:]
            if len(self._block) == TAR_BLOCK:
                block, self._block = bytes(self._block), bytearray()
                self._header(block)

    def _header(self, block: bytes) -> None:
        if block.count(0) == TAR_BLOCK:
            self._zeros += 1
            if self._zeros == 2:
                self.complete = True
            return
        if self._zeros:
            self.damaged = "a lone zero block between members"
            return
        if not is_tar_header(block):
            self.damaged = "a header with a bad checksum"
            return
        size = _tar_number(block[124:136])
        if size is None:
            self.damaged = "a header with a bad size"
            return
        kind = block[156:157]
        if self._next_size is not None and kind not in (b"x", b"g"):
            size, self._next_size = self._next_size, None
        if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):
            # Links, devices, directories, FIFOs carry no data (ustar).
            size = 0
        padded = -(-size // TAR_BLOCK) * TAR_BLOCK
        if kind == b"x":
            if size > MAX_PAX_HEADER:
                self.damaged = f"an extended header of {size} bytes"
                return
            self._pax = bytearray()
            self._pax_left = padded
            if padded == 0:
                self._pax = None
            return
        self._skip = padded


def tar_damage(tracker: TarEnd, total: int) -> str:
    """Why the archive import read is incomplete, "" when it is complete."""
    if tracker.complete:
        return ""
    if tracker.damaged:
        return f"holds {tracker.damaged} after {total} bytes"
    return f"ended after {total} bytes without tar's end-of-archive blocks"
