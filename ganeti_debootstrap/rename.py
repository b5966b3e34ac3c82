"""``rename``: give a stopped instance its new name inside its root filesystem.

``/etc/hostname`` changes only if it holds the old name (short or fully
qualified, whichever form create or the administrator wrote); otherwise the
instance was customised by hand and we refuse and change nothing.
``/etc/mailname`` and the ``/etc/hosts`` entries naming the instance follow
(the shell edition left ``/etc/hosts`` stale).
"""

from __future__ import annotations

import contextlib
import logging

from . import instance_disk, log, mounts
from .environment import Request
from .errors import DefinitionError
from .names import short_hostname
from .paths import Paths
from .target import Target, UnsafeFileError

logger = logging.getLogger(__name__)


class RenameError(DefinitionError):
    """The instance's files do not hold the old name."""


def renamed(value: str, old: str, new: str) -> str | None:
    """``new`` in the form ``value`` had ``old`` in (FQDN or short), or None."""
    value = value.strip()
    if value == old:
        return new
    if value == short_hostname(old) and "." not in value:
        return short_hostname(new)
    return None


def rename_hosts(text: str, old: str, new: str) -> str:
    """Replace the old names by the new ones on the lines that name the instance."""
    names = {old: new, short_hostname(old): short_hostname(new)}
    out = []
    for line in text.splitlines(keepends=True):
        body, sep, comment = line.partition("#")
        fields = body.split()
        if len(fields) >= 2 and any(f in names for f in fields[1:]):
            newline = "\n" if line.endswith("\n") else ""
            mapped = [fields[0]] + [names.get(f, f) for f in fields[1:]]
            rest = (" " + sep + comment.rstrip("\n")) if sep else ""
            line = "\t".join([mapped[0], " ".join(mapped[1:])]) + rest + newline
        out.append(line)
    return "".join(out)


# How much of an unexpected /etc/hostname the refusal quotes.
SHOWN_CHARS = 80


def read_optional(target: Target, inner: str) -> str | None:
    """The text of ``inner``, or None (with a warning if it cannot be read safely)."""
    try:
        return target.read_text(inner)
    except FileNotFoundError:
        return None
    except UnsafeFileError as exc:
        logger.warning("%s in the instance %s; rename leaves it alone (make it a regular text "
                       "file and correct the name in it by hand).",
                       exc.inner, exc.reason)
        return None


def apply(target: Target, old: str, new: str) -> list[str]:
    """Rename inside a mounted instance; return the files changed."""
    try:
        current = target.read_text(
            "/etc/hostname",
            advice=(f"Rename changes nothing. Make it a regular file holding the "
                    f"old name {old!r} and rename again, or set the name inside "
                    f"the instance yourself (hostnamectl set-hostname {new})."))
    except FileNotFoundError:
        current = ""
    hostname = renamed(current, old, new)
    if hostname is None:
        shown = current.strip()
        if len(shown) > SHOWN_CHARS:
            shown = shown[:SHOWN_CHARS] + "..."
        raise RenameError(
            f"/etc/hostname in the instance holds {shown!r}, not the "
            f"old name {old!r}: it was changed inside the instance, so rename "
            f"leaves it alone and changes nothing. Set the name inside the "
            f"instance yourself (hostnamectl set-hostname {new}).")
    changed = ["/etc/hostname"]
    target.write_text("/etc/hostname", hostname + "\n")
    mailname_text = read_optional(target, "/etc/mailname")
    if mailname_text is not None:
        mailname = renamed(mailname_text, old, new)
        if mailname is not None:
            target.write_text("/etc/mailname", mailname + "\n")
            changed.append("/etc/mailname")
    hosts = read_optional(target, "/etc/hosts")
    if hosts is not None:
        updated = rename_hosts(hosts, old, new)
        if updated != hosts:
            target.write_text("/etc/hosts", updated)
            changed.append("/etc/hosts")
    return changed


def run(request: Request, paths: Paths) -> None:
    """Rename the instance on disk 0 from OLD_INSTANCE_NAME to INSTANCE_NAME."""
    old, new = request.old_instance_name, request.instance_name
    with contextlib.ExitStack() as stack:
        with log.phase("open disk"):
            _, root_dev, fstype = instance_disk.open_root(stack, request.disk_path)
            # The instance is the tenant's (see mounts.UNTRUSTED_OPTIONS).
            target_dir = stack.enter_context(mounts.instance_root(
                root_dev, fstype, request.disk_path, mounts.UNTRUSTED_OPTIONS))
        with log.phase("rename"):
            changed = apply(Target(target_dir), old, new)
    logger.info("Renamed %s to %s (%s)", old, new, ", ".join(changed))
