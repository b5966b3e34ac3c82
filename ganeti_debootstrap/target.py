"""Paths inside the instance's root filesystem that cannot escape it.

``os.path.join(target, "/etc/hostname")`` is the node's own file, and a
symlink planted in the instance (``etc -> /etc``) would redirect a naive
write to the node: every path inside the target goes through
:meth:`Target.path`, which resolves symlinks as the instance would see them
and refuses anything that lands outside.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from .errors import DefinitionError

# More symlink hops than this inside one path means a loop.
_MAX_LINKS = 40


class TargetPathError(DefinitionError):
    """A path inside the instance cannot be used safely."""


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
                    raise TargetPathError(
                        f"Too many symbolic links resolving {inner!r} inside "
                        f"the instance.")
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

    def read_text(self, inner: str) -> str:
        """The text of a file inside the instance."""
        with open(self.path(inner), encoding="utf-8") as f:
            return f.read()

    def write_text(self, inner: str, text: str, mode: int = 0o644) -> None:
        """Replace a file inside the instance atomically, with ``mode``.

        A symlink in the final place is replaced, not followed: the file is
        written next to where it belongs and renamed over it.
        """
        self.write_bytes(inner, text.encode("utf-8"), mode)

    def write_bytes(self, inner: str, data: bytes, mode: int = 0o644) -> None:
        """Like :meth:`write_text`, for bytes (GRUB's modules, core.img)."""
        dest = self.path_nofollow(inner)
        directory = os.path.dirname(dest)
        if not os.path.isdir(directory):
            # Ganeti runs us with umask 077, which would make them 0700.
            saved_umask = os.umask(0o022)
            try:
                os.makedirs(directory, mode=0o755, exist_ok=True)
            finally:
                os.umask(saved_umask)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gidb-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    def remove(self, inner: str) -> bool:
        """Remove a file (or symlink) inside the instance; True if it existed."""
        dest = self.path_nofollow(inner)
        if os.path.lexists(dest) and not os.path.isdir(dest) or os.path.islink(dest):
            os.unlink(dest)
            return True
        return False
