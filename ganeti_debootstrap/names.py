"""Checks for names that end up in files and paths: hostnames, variants."""

from __future__ import annotations

import re

# Matched with fullmatch: "$" would also match before a final newline, and
# "web1\n" would pass as a hostname (and end up in /etc/hostname).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?")
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]*")
_SUITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ARCH = re.compile(r"[a-z0-9][a-z0-9-]*")


def hostname_problem(name: str) -> str | None:
    """Why ``name`` is not a valid (possibly fully qualified) hostname, or None."""
    if not name:
        return "it is empty"
    if len(name) > 253:
        return f"it is {len(name)} characters long, more than 253"
    for label in name.rstrip(".").split("."):
        if not _LABEL.fullmatch(label):
            return (f"the part {label!r} is not 1 to 63 letters, digits or "
                    f"hyphens (not starting or ending with a hyphen)")
    return None


def short_hostname(name: str) -> str:
    """The first label of a hostname."""
    return name.split(".", 1)[0]


def is_variant_name(name: str) -> bool:
    """A variant is a plain name: no slashes, no leading dot, no spaces."""
    return bool(_VARIANT.fullmatch(name))


def is_package_name(name: str) -> bool:
    return bool(_PACKAGE.fullmatch(name))


def is_component_name(name: str) -> bool:
    return bool(_COMPONENT.fullmatch(name)) and ".." not in name


def is_suite_name(name: str) -> bool:
    return bool(_SUITE.fullmatch(name)) and ".." not in name


def is_arch_name(name: str) -> bool:
    return bool(_ARCH.fullmatch(name))
