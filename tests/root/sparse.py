"""Sparse disk image files for root tests (no space used until written)."""

from __future__ import annotations

import os

MIB = 1024 * 1024


def sparse_file(directory: str | os.PathLike[str], mib: int, name: str = "disk.img") -> str:
    """Create a sparse file of ``mib`` MiB in ``directory``; return its path."""
    path = os.path.join(os.fspath(directory), name)
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
    return path
