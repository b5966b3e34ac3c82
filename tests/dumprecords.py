"""dump(8) tape headers built for unit tests (the TS_END trailer import checks for)."""

from __future__ import annotations

import struct

from ganeti_debootstrap import dumpstream


def header(c_type, order="<", magic=dumpstream.NFS_MAGIC):
    words = [0] * 256
    words[0] = c_type
    words[6] = magic
    words[7] = 0
    words[7] = (dumpstream.CHECKSUM - sum(words)) & 0xFFFFFFFF
    if words[7] >= 1 << 31:
        words[7] -= 1 << 32
    return struct.pack(f"{order}256i", *words)
