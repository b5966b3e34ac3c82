"""Paths inside the instance's root filesystem that cannot escape it.

``os.path.join(target, "/etc/hostname")`` is the node's own file, and a
symlink planted in the instance (``etc -> /etc``) would redirect a naive
write to the node: every path inside the target goes through
:meth:`Target.path`, which resolves symlinks as the instance would see them
and refuses anything that lands outside.

Once an instance has been used or imported, every byte of it is the
tenant's: :meth:`Target.read_text` reads a file as untrusted data (never
blocking, regular files only, up to :data:`MAX_READ_BYTES`, strict UTF-8),
and a FIFO, a device node, a directory or a huge file where text belongs
raises :class:`UnsafeFileError` naming it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass

from . import fsutil
from .errors import DefinitionError

# More symlink hops than this inside one path means a loop.
_MAX_LINKS = 40

# The most a file of the instance is read up to. What the scripts read
# there is small text: /etc/hostname, /etc/mailname, /etc/fstab, /etc/hosts,
# os-release, grub.cfg; the largest of these on real systems are a
# grub.cfg listing many kernels (tens of KiB) and an /etc/hosts carrying a
# block list (a few MiB at most). 4 MiB keeps all of them while bounding
# what a hostile file costs: the bytes, their decoded text and a rewritten
# copy stay within a few tens of MiB beside the script's own memory.
MAX_READ_BYTES = 4 * 2**20

# Opening never blocks (a FIFO without a writer would hang us, holding
# Ganeti's locks) and never gives us a controlling terminal; the final
# component was resolved by Target.path, so a symlink there now is a race.
_READ_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
               | os.O_NOCTTY)

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device node"),
          (stat.S_ISBLK, "a block device node"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


class TargetPathError(DefinitionError):
    """A path inside the instance cannot be used safely."""


class UnsafeFileError(TargetPathError):
    """A file of the instance is not what it must be (regular, bounded text).

    ``inner`` is the path as asked, ``reason`` what was found there (used by
    callers that warn and carry on instead).
    """

    def __init__(self, inner: str, reason: str, advice: str) -> None:
        self.inner = inner
        self.reason = reason
        super().__init__(f"{inner} in the instance {reason}. {advice}")


def kind_of(mode: int) -> str:
    """What a file of mode ``mode`` is, in words ("a FIFO (named pipe)"...)."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "not a regular file"


def _size_words(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


READ_ADVICE = ("It is left alone and nothing is read from it. Make it a regular "
               "text file (inside the instance, or with its disk mounted by "
               "hand), then run this again.")


@dataclass(frozen=True)
class Target:
    """The mounted root filesystem of an instance."""

    root: str

    def path(self, inner: str) -> str:
        """The node path of ``inner`` (absolute, as seen in the instance).

        Symlinks in the instance are followed relative to the instance root;
        the last component is followed too, unless it does not exist.
        """
        return self._resolve(inner, follow_last=True)

    def path_nofollow(self, inner: str) -> str:
        """Like :meth:`path`, but a symlink as last component is not followed."""
        return self._resolve(inner, follow_last=False)

    def _resolve(self, inner: str, follow_last: bool) -> str:
        if "\0" in inner:
            raise TargetPathError(f"Path {inner!r} contains a NUL byte.")
        pending = [p for p in inner.split("/") if p not in ("", ".")]
        pending.reverse()
        resolved: list[str] = []
        hops = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = os.path.join(self.root, *resolved, part)
            is_last = not pending
            if os.path.islink(candidate) and (follow_last or not is_last):
                hops += 1
                if hops > _MAX_LINKS:
                    raise UnsafeFileError(
                        inner, f"cannot be resolved: too many symbolic links "
                        f"(more than {_MAX_LINKS}, a loop)",
                        "Replace the links on that path by the files they "
                        "stand for (inside the instance, or with its disk "
                        "mounted by hand), then run this again.")
                link = os.readlink(candidate)
                if link.startswith("/"):
                    resolved = []
                more = [p for p in link.split("/") if p not in ("", ".")]
                pending.extend(reversed(more))
                continue
            resolved.append(part)
        result = os.path.join(self.root, *resolved)
        root = os.path.normpath(self.root)
        if os.path.commonpath([root, os.path.normpath(result)]) != root:
            raise TargetPathError(f"Path {inner!r} leaves the instance root.")
        return result

    def exists(self, inner: str) -> bool:
        """Whether ``inner`` exists inside the instance."""
        return os.path.lexists(self.path_nofollow(inner))

    def inner_of(self, path: str) -> str:
        """The path inside the instance of the node path ``path`` (under the root)."""
        rel = os.path.relpath(path, self.root)
        return "/" if rel == "." else "/" + rel

    def _where(self, inner: str, path: str) -> str:
        """``inner``, with where its symlinks led when that is elsewhere."""
        real = self.inner_of(path)
        return inner if os.path.normpath(inner) == real else f"{inner} (-> {real})"

    def read_text(self, inner: str, *, limit: int = MAX_READ_BYTES,
                  advice: str = READ_ADVICE, follow_last: bool = True) -> str:
        """The UTF-8 text of a regular file inside the instance, read as untrusted.

        Raises FileNotFoundError when nothing is there, and UnsafeFileError
        (naming the file, then ``advice``) for anything but a regular file
        of at most ``limit`` bytes holding valid UTF-8. Never blocks, never
        opens a device, never reads more than ``limit`` + 1 bytes. With
        ``follow_last`` false, a symlink at ``inner`` itself is refused too.
        """
        path = self.path(inner) if follow_last else self.path_nofollow(inner)
        where = self._where(inner, path)
        try:
            # lstat first: a device node or FIFO is refused without being
            # opened (opening some devices does something: a tape rewinds).
            before = os.lstat(path)
        except NotADirectoryError:
            raise UnsafeFileError(where, "cannot be reached: a component of its "
                                  "path is not a directory", advice) from None
        if not stat.S_ISREG(before.st_mode):
            raise UnsafeFileError(where, f"is {kind_of(before.st_mode)}, not a "
                                  f"regular file", advice)
        if before.st_size > limit:
            raise UnsafeFileError(where, f"is {_size_words(before.st_size)} long, more "
                                  f"than the {_size_words(limit)} read at most", advice)
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            raise UnsafeFileError(where, f"cannot be opened ({exc.strerror})",
                                  advice) from None
        try:
            after = os.fstat(fd)
            if (not stat.S_ISREG(after.st_mode)
                    or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino)):
                raise UnsafeFileError(where, "was replaced while it was opened",
                                      advice)
            chunks = []
            left = limit + 1
            while left > 0:
                chunk = os.read(fd, min(left, 2**20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as exc:
            raise UnsafeFileError(where, f"cannot be read ({exc.strerror})",
                                  advice) from None
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > limit:
            raise UnsafeFileError(where, f"grew beyond the {_size_words(limit)} "
                                  f"read at most", advice)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeFileError(where, f"is not UTF-8 text (invalid byte at "
                                  f"offset {exc.start})", advice) from None

    def write_text(self, inner: str, text: str, mode: int = 0o644) -> None:
        """Replace a file inside the instance atomically, with ``mode``.

        A symlink in the final place is replaced, not followed: the file is
        written next to where it belongs and renamed over it.
        """
        self.write_bytes(inner, text.encode("utf-8"), mode)

    def write_bytes(self, inner: str, data: bytes, mode: int = 0o644) -> None:
        """Like :meth:`write_text`, for bytes (GRUB's modules, core.img)."""
        dest = self.path_nofollow(inner)
        where = self._where(inner, dest)
        advice = ("Nothing was written there. Move it aside (inside the instance, "
                  "or with its disk mounted by hand), then run this again.")
        directory = os.path.dirname(dest)
        if not os.path.isdir(directory):
            self._make_directory(directory, inner, advice)
        try:
            found = os.lstat(dest)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(found.st_mode):
                raise UnsafeFileError(where, "is a directory where a file belongs",
                                      advice)
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gidb-")
        except OSError as exc:
            raise UnsafeFileError(where, f"cannot be written: its directory "
                                  f"refuses a new file ({exc.strerror})", advice) from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    def _make_directory(self, directory: str, inner: str, advice: str) -> None:
        """Make ``directory`` (a node path under the root) and its parents, 0755."""
        try:
            _make_directories(directory)
        except OSError as exc:
            # A regular file, FIFO... where a directory of the path belongs.
            raise UnsafeFileError(
                inner, f"cannot be written: its directory "
                f"{self.inner_of(directory)} cannot be made ({exc.strerror}; "
                f"something that is not a directory is in the way)", advice) from None

    def make_directories(self, inner: str) -> str:
        """Make directory ``inner`` (and its parents) in the instance; its node path.

        Made 0755, as a package would make them, whatever our umask.
        """
        path = self.path(inner)
        if not os.path.isdir(path):
            _make_directories(path)
        return path

    def remove(self, inner: str) -> bool:
        """Remove a file (or symlink) inside the instance; True if it existed."""
        dest = self.path_nofollow(inner)
        try:
            found = os.lstat(dest)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if stat.S_ISDIR(found.st_mode):
            return False
        os.unlink(dest)
        return True


def _make_directories(path: str) -> None:
    """``os.makedirs`` with mode 0755: Ganeti's umask 077 would make them 0700."""
    with fsutil.umask(fsutil.PACKAGE_UMASK):
        os.makedirs(path, mode=0o755, exist_ok=True)
