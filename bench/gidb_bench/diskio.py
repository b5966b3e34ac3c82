"""What the disk allows: bytes a create leaves in its disk file, the time to
write them directly (the floor), and a concurrent writer making the disk busy.

The floor is what no create can beat on this disk at this moment: writing
the bytes the create left allocated in the disk file with direct I/O and an
fsync, into a fresh file of the same filesystem. Runs interleave it with
the creates, so that ratios to it mean the same whatever else the machine
does.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass

from . import procs

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HEAD = struct.Struct("=QQLLLL")  # start, length, flags, mapped, count, reserved
# logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")
_EXTENTS_PER_CALL = 512

CHUNK = 4 << 20
ALIGN = 4096


@dataclass(frozen=True)
class Allocation:
    """Where a file's bytes are: written, allocated unwritten, or shared."""

    allocated: int  # bytes of the file's extents (what du counts)
    unwritten: int  # of them, preallocated or zeroed by fallocate: no data written
    shared: int = 0  # of them, blocks shared with another file (reflink clones)

    @property
    def written(self) -> int:
        return self.allocated - self.unwritten - self.shared


def allocation(path: str) -> Allocation:
    """The file's extents from FIEMAP (synced first), split by the unwritten flag."""
    allocated = unwritten = shared = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start, length = 0, os.fstat(fd).st_size
        flags = FIEMAP_FLAG_SYNC
        while start < length:
            buf = bytearray(_FIEMAP_HEAD.size + _EXTENTS_PER_CALL * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, length - start, flags, 0,
                                   _EXTENTS_PER_CALL, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                logical, _, size, _, _, eflags, _, _, _ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                allocated += size
                if eflags & FIEMAP_EXTENT_UNWRITTEN:
                    unwritten += size
                elif eflags & FIEMAP_EXTENT_SHARED:
                    shared += size
                start = logical + size
                last = bool(eflags & FIEMAP_EXTENT_LAST)
            if last:
                break
    finally:
        os.close(fd)
    return Allocation(allocated, unwritten, shared)


def write_direct(path: str, nbytes: int) -> float:
    """Write ``nbytes`` (rounded up to 4 KiB) to a new file with O_DIRECT, then fsync.

    Returns the seconds from open to the end of the fsync; the file is removed.
    """
    nbytes = -(-nbytes // ALIGN) * ALIGN
    with mmap.mmap(-1, CHUNK) as buf:
        buf.write(os.urandom(4096) * (CHUNK // 4096))
        view = memoryview(buf)
        started = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC,
                     0o600)
        try:
            done = 0
            while done < nbytes:
                done += os.pwritev(fd, [view[:min(CHUNK, nbytes - done)]], done)
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.monotonic() - started
        view.release()
    os.unlink(path)
    return elapsed


# The busy writer: a separate process whose threads (two by default: one
# stream barely slows this kind of disk) each write 4 MiB blocks with direct
# I/O over and over into their own part of one file of bounded size,
# fsyncing every 64 MiB, until it is stopped (SIGTERM) or its time is up.
# Kept as text so that it runs with the system Python, without this package
# on its path.
_WRITER = """
import mmap, os, sys, threading, time
path, size, limit, streams = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
chunk = 4 << 20
part = max(chunk, size // streams // chunk * chunk)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
end = time.monotonic() + limit
def stream(first):
    buf = mmap.mmap(-1, chunk); buf.write(os.urandom(4096) * (chunk // 4096))
    pos, since_sync = 0, 0
    while time.monotonic() < end:
        os.pwritev(fd, [buf], first + pos)
        pos = (pos + chunk) % part
        since_sync += chunk
        if since_sync >= 64 << 20:
            os.fsync(fd); since_sync = 0
threads = [threading.Thread(target=stream, args=(i * part,), daemon=True)
           for i in range(streams) if (i + 1) * part <= max(size, part)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


class BusyWriter:
    """A concurrent direct writer in the benchmark's scratch directory.

    Bounded: its file never exceeds ``size`` bytes and it stops by itself
    after ``limit`` seconds; ``stop()`` ends it earlier and removes the file.
    ``streams`` threads write at once, each in its own part of the file.
    """

    def __init__(self, directory: str, log_path: str, size: int = 256 << 20,
                 limit: float = 900.0, streams: int = 2) -> None:
        self.path = os.path.join(directory, "busy-writer.dat")
        self.size, self.limit, self.log_path = size, limit, log_path
        self.streams = streams
        self.running: procs.Running | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.running = procs.start(
            [sys.executable, "-c", _WRITER, self.path, str(self.size), str(self.limit),
             str(self.streams)],
            env={"PATH": "/usr/bin:/bin"}, log_path=self.log_path)
        time.sleep(1.0)  # let it reach its pace
        if not _alive(self.running.proc.pid):
            self.stop()
            raise procs.BenchError(f"the busy writer exited at once; see {self.log_path}")

    def stop(self) -> None:
        if self.running is not None:
            try:
                os.killpg(self.running.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            procs.wait(self.running)
            self.running = None
        if os.path.isfile(self.path):
            os.unlink(self.path)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not), without reaping it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def io_pressure() -> str:
    """The kernel's I/O pressure (some, avg10) as a percentage, or '?'."""
    try:
        with open("/proc/pressure/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("some "):
                    return line.split()[1].split("=")[1] + " %"
    except OSError:
        pass
    return "?"


def mib_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 2**20 / seconds:.0f} MiB/s" if seconds > 0 else "?"
