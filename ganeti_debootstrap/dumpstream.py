"""Watching a backup stream on its way to restore(8) or tar, to know it is complete.

restore exits 0 on a stream cut short ("End-of-input encountered"), leaving
a half-restored tree, so import cannot trust its exit status alone. A
complete stream ends with TS_END header records: 1 KiB records whose int32
``c_type`` is 5, ``c_magic`` (the 7th word) is NFS_MAGIC and whose 256 words
sum to CHECKSUM. The pump keeps the last record it passed on and checks it.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Protocol

RECORD = 1024  # TP_BSIZE
TS_END = 5
NFS_MAGIC = 60012
CHECKSUM = 84446
_CHUNK = 1 << 20


def is_header(record: bytes, c_type: int) -> bool:
    """Whether ``record`` is a valid header of type ``c_type``, in either byte order."""
    if len(record) != RECORD:
        return False
    for order in "<>":
        words = struct.unpack(f"{order}256i", record)
        if (words[0] == c_type and words[6] == NFS_MAGIC
                and sum(words) & 0xFFFFFFFF == CHECKSUM):
            return True
    return False


def is_end_record(record: bytes) -> bool:
    """Whether ``record`` is a valid TS_END header, in either byte order."""
    return is_header(record, TS_END)


class Tracker(Protocol):
    """Follows a stream as it flows and says whether it ended complete."""

    def feed(self, chunk: bytes) -> None: ...

    @property
    def complete(self) -> bool: ...


class DumpEnd:
    """A dump stream is complete when it ends with a TS_END record on a record boundary."""

    def __init__(self) -> None:
        self.total = 0
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.tail = (self.tail + chunk[-RECORD:])[-RECORD:]

    @property
    def complete(self) -> bool:
        return (self.total > 0 and self.total % RECORD == 0
                and is_end_record(self.tail))


class StreamPump:
    """Copy a stream from one descriptor to another in a thread, checking its end.

    ``prefix`` (the bytes import read to tell the stream's kind) goes first.
    ``total`` counts the bytes copied; ``complete`` tells, once the pump has
    finished, whether the stream ended as ``tracker`` (by default
    :class:`DumpEnd`: with a dump trailer) expects; ``error`` holds a write
    error (the reader stopped early) if any.
    """

    def __init__(self, source_fd: int, dest_fd: int, prefix: bytes = b"",
                 tracker: Tracker | None = None) -> None:
        self.source_fd = source_fd
        self.dest_fd = dest_fd
        self.prefix = prefix
        self.tracker: Tracker = tracker if tracker is not None else DumpEnd()
        self.total = 0
        self.ended = False  # the source reached its end (not stopped early)
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the pump to finish (at most ``timeout`` seconds)."""
        self._thread.join(timeout)

    @property
    def complete(self) -> bool:
        return self.tracker.complete

    def _pump(self) -> None:
        try:
            chunk = self.prefix
            while True:
                if not chunk:
                    chunk = os.read(self.source_fd, _CHUNK)
                if not chunk:
                    self.ended = True
                    break
                self.total += len(chunk)
                self.tracker.feed(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.write(self.dest_fd, view)
                    view = view[written:]
                chunk = b""
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.dest_fd)
