"""Whether a path of the administrator's may be trusted: only root can change it.

The settings file and the variant files are shell code sourced as root, the
hooks are programs run as root, and what the bootstrap cache holds is
unpacked into every new instance. Each is used only when it, and every
directory and symlink met on the way to it from /, belongs to root and is
not writable by its group or by others (as sudo refuses a world-writable
sudoers file); otherwise the script refuses with the path and the
``chown``/``chmod`` that fixes it. A sticky directory on the way (/tmp) is
accepted: others may add entries to it but not rename or remove root's.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Collection
from dataclasses import dataclass

from .errors import DefinitionError

# More symlink hops than this while checking a path means a loop.
_MAX_LINKS = 40


@dataclass(frozen=True)
class Purpose:
    """What a checked path is used for, to say so when it is refused.

    The message reads: "Refusing to ACTION: PATH PROBLEM. REASON, so whoever
    can change PATH could CONSEQUENCE. Fix it with `FIX`ALTERNATIVE."
    """

    action: str  # "run the customisation hooks in /etc/.../hooks"
    reason: str  # "Hooks run as root on the node"
    consequence: str  # "run commands as root"
    error: type[DefinitionError]
    alternative: str = ""  # " (or set CUSTOMIZE_DIR to ...)"

    def refuse(self, path: str, problem: str, fix: str) -> DefinitionError:
        return self.error(
            f"Refusing to {self.action}: {path} {problem}. {self.reason}, so "
            f"whoever can change {path} could {self.consequence}. Fix it with "
            f"`{fix}`{self.alternative}.")


def default_uids() -> tuple[int, ...]:
    """Root, and the user running the script (who could run the code anyway).

    Ganeti runs the scripts as root, so on a node this is root alone; a
    user running them (tests, a dry run by hand) trusts their own files
    too, as OpenSSH accepts files owned by root or by the user.
    """
    return (0, os.geteuid())


def owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_entry(purpose: Purpose, path: str, st: os.stat_result, last: bool,
                 trusted_uids: Collection[int]) -> None:
    """One directory, file or symlink met on the way to a trusted path."""
    is_link = stat.S_ISLNK(st.st_mode)
    if st.st_uid not in trusted_uids:
        flag = "-h " if is_link else ""
        raise purpose.refuse(path, f"is owned by {owner_name(st.st_uid)}, not root",
                             f"chown {flag}root {path}")
    if is_link:  # its own mode means nothing; its directory was checked
        return
    writable = st.st_mode & 0o022
    if not writable:
        return
    # A sticky directory (/tmp) lets others add entries but not rename or
    # remove ours: on the way it is safe, since every entry we go through
    # is checked to belong to root. The checked directory itself must not
    # take new files from others, sticky or not.
    if not last and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return
    who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[writable]
    raise purpose.refuse(path, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})",
                         f"chmod go-w {path}")


def check_path(path: str, purpose: Purpose, *,
               trusted_uids: Collection[int] | None = None) -> None:
    """Refuse (``purpose.error``) ``path`` unless only root can change it.

    Every directory, symlink and the file met while resolving ``path`` from
    / must belong to root (or ``trusted_uids``; default :func:`default_uids`)
    and not be writable by group or others; sticky directories on the way
    are accepted. ``path`` must exist.
    """
    uids = default_uids() if trusted_uids is None else trusted_uids
    pending = [p for p in os.path.abspath(path).split("/") if p]
    pending.reverse()
    current = "/"
    _check_entry(purpose, "/", os.lstat("/"), not pending, uids)
    hops = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        st = os.lstat(candidate)
        _check_entry(purpose, candidate, st, not pending, uids)
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_LINKS:
                raise purpose.error(f"Too many symbolic links resolving {path}; "
                                    f"fix the links on the way to it.")
            link = os.readlink(candidate)
            if link.startswith("/"):
                current = "/"
            pending.extend(reversed([p for p in link.split("/") if p]))
            continue
        current = candidate


def check_existing_part(path: str, purpose: Purpose, *,
                        trusted_uids: Collection[int] | None = None) -> None:
    """:func:`check_path` on ``path``, or, while it does not exist, on the
    nearest directory above it that does (where it will be made)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    check_path(probe, purpose, trusted_uids=trusted_uids)
