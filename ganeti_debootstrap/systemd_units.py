"""systemd units in an instance: where its packages installed one, and
enabling one the way ``systemctl enable`` would, without running anything
of the instance (the links its [Install] section asks for).
"""

from __future__ import annotations

import os
from collections.abc import Collection

from .target import Target

UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")
ETC_UNITS = "/etc/systemd/system"


def find_unit(t: Target, name: str, listed: Collection[str] = ()) -> str | None:
    """Where the tree's packages installed unit ``name`` (path in the instance).

    With merged /usr both directories reach the file. The path in
    ``listed`` (the owning package's dpkg file list, when the caller has
    it) is the one systemctl links; otherwise the one not reached through
    the /lib symlink is preferred.
    """
    found = [d + "/" + name for d in UNIT_DIRS if os.path.isfile(t.path(f"{d}/{name}"))]
    for inner in found:
        if inner in listed:
            return inner
    for inner in found:
        if t.path(inner) == os.path.join(t.root, inner.lstrip("/")):
            return inner
    return found[0] if found else None


def install_section(text: str) -> dict[str, list[str]]:
    """The [Install] settings of a unit file: key -> every word given."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section != "Install" or "=" not in line:
            continue
        key, value = (p.strip() for p in line.split("=", 1))
        if value == "":
            out[key] = []  # an empty assignment resets the list
        else:
            out.setdefault(key, []).extend(value.split())
    return out


def _symlink(t: Target, link: str, unit: str) -> None:
    # Made 0755: a 0700 directory (Ganeti's umask) systemd cannot share.
    t.make_directories(os.path.dirname(link))
    dest = t.path_nofollow(link)
    if os.path.lexists(dest):
        os.unlink(dest)
    os.symlink(unit, dest)


def enable_unit(t: Target, name: str, _seen: set[str] | None = None) -> list[str]:
    """Make the links ``systemctl enable NAME`` would; return them ([] if no unit).

    WantedBy=/RequiredBy=/UpheldBy= become .wants/.requires/.upholds links,
    Alias= a link in /etc/systemd/system, and Also= units are enabled too.
    Template units without an instance and specifiers (%) are skipped.
    """
    seen = set() if _seen is None else _seen
    if name in seen:
        return []
    seen.add(name)
    unit = find_unit(t, name)
    if unit is None:
        return []
    install = install_section(t.read_text(unit))
    links = []
    template = "@." in name  # foo@.service: enabled per instance only
    for key, suffix in (("WantedBy", "wants"), ("RequiredBy", "requires"),
                        ("UpheldBy", "upholds")):
        for target in install.get(key, []):
            if "%" in target or template:
                continue
            links.append(f"{ETC_UNITS}/{target}.{suffix}/{name}")
    for alias in install.get("Alias", []):
        if "%" not in alias and "/" not in alias:
            links.append(f"{ETC_UNITS}/{alias}")
    for link in links:
        _symlink(t, link, unit)
    for also in install.get("Also", []):
        if "/" not in also:
            links += enable_unit(t, also, seen)
    return links
