"""A digest of a disk: what tests compare to prove a disk was left untouched."""

from __future__ import annotations

import hashlib
import os
import stat


def disk_digest(path: str) -> str:
    """A digest of a (sparse) disk file or a block device's first 16 MiB.

    For a file: its size, mtime and the contents of its data extents, so
    that an untouched sparse file costs nothing to check.
    """
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            h.update(os.pread(fd, 16 << 20, 0))
            return h.hexdigest()
        h.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        pos = 0
        while pos < st.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(f"{start}-{end}".encode())
            while start < end:
                chunk = os.pread(fd, min(end - start, 16 << 20), start)
                h.update(chunk)
                start += len(chunk)
            pos = end
    finally:
        os.close(fd)
    return h.hexdigest()
