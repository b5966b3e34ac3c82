"""Small file-system helpers every module may use: atomic writes, the umask,
whether a path lies below another.

The node's own files only (the cache, records beside it). A file inside an
instance is written through :class:`target.Target`, which never follows the
tenant's links.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

# The umask Debian's package tools and run-parts work under. Ganeti runs the
# scripts with 077, under which what they make in an instance (a user's home,
# /boot/grub, systemd's directories) would be private to root.
PACKAGE_UMASK = 0o022


def is_under(path: str, top: str) -> bool:
    """Whether the normalised path ``path`` is ``top`` or lies below it."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def fsync_path(path: str) -> None:
    """Flush ``path`` (a file or a directory) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | str, *, mode: int = 0o644,
                 tmp_prefix: str | None = None) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file.

    The data is written to a temporary file beside ``path`` (named with
    ``tmp_prefix``, by default the file's name), flushed to the disk, given
    ``mode`` and renamed over ``path``; on any failure the temporary file is
    removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(path) or "."
    prefix = tmp_prefix if tmp_prefix is not None else os.path.basename(path) + "."
    with temporary_file(directory, prefix) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)


@contextlib.contextmanager
def temporary_file(directory: str, prefix: str) -> Iterator[str]:
    """A new empty file (0600) in ``directory``, for the block to fill and rename.

    If the block fails, the file is removed (unless already renamed away)
    and the error passes on; after success it is left where the block put it.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block with the process umask set to ``mask``.

    Ganeti runs the scripts with umask 077; files that an instance's packages
    would make world-readable (a user's home, package tools' output, systemd
    directories) are made under 022 instead.
    """
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)
