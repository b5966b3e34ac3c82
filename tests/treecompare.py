"""Compare two installed trees the way an instance would notice a difference.

Used by the tests that promise "the same file tree": the cache round trip,
export/import, and the fast (filesystem image) path against the tar path.
Compared per path: file type, mode (with setuid bits), owner, group, size,
mtime to the second, device numbers, symlink targets, file contents, every
extended attribute (this includes ACLs as system.posix_acl_* and file
capabilities as security.capability), and which paths are hard links of
each other. XFS shows root its own stored form of each ACL as well
(trusted.SGI_ACL_FILE, trusted.SGI_ACL_DEFAULT): those are left out, the
ACLs themselves are compared as system.posix_acl_*.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable


# XFS's own copies of a file's ACLs, listed beside system.posix_acl_*.
_FILESYSTEM_ACL_COPIES = frozenset({"trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT"})


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name in _FILESYSTEM_ACL_COPIES:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    return out


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe(root: str, ignore: Iterable[str] = ("lost+found",),
             ignore_mtime: Iterable[str] = ()) -> dict[str, tuple]:
    """A comparable description of every path under ``root``.

    Paths in ``ignore`` (and below them) are left out; for the directories
    in ``ignore_mtime`` the mtime is not compared (a file written inside
    them on purpose changes it).
    """
    ignored = {i.strip("/") for i in ignore}
    no_mtime = {i.strip("/") for i in ignore_mtime}
    entries: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames
                       if os.path.normpath(os.path.join(rel_dir, d)) not in ignored]
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in ignored:
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                extra = _digest(path)
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            entries[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            size, None if stat.S_ISLNK(st.st_mode) or rel in no_mtime
                            else int(st.st_mtime),
                            extra, tuple(sorted(_xattrs(path).items())))
    for group in inodes.values():
        group.sort()
        for rel in group:
            entries[rel] = entries[rel] + (("hardlink-group", group[0], len(group)),)
    return entries


def differences(a: str, b: str, ignore: Iterable[str] = ("lost+found",),
                ignore_mtime: Iterable[str] = (), limit: int = 20) -> list[str]:
    """Human-readable differences between two trees (empty when equal)."""
    da, db = describe(a, ignore, ignore_mtime), describe(b, ignore, ignore_mtime)
    out = []
    for rel in sorted(set(da) | set(db)):
        if rel not in da:
            out.append(f"only in {b}: {rel}")
        elif rel not in db:
            out.append(f"only in {a}: {rel}")
        elif da[rel] != db[rel]:
            out.append(f"differs: {rel}: {da[rel]} != {db[rel]}")
        if len(out) >= limit:
            out.append("...")
            break
    return out
