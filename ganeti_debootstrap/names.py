"""Checks for names that end up in files and paths: hostnames, variants.

Also the one check every value written into a file of the instance passes
first (:func:`line_break_problem`): a line break in a value would add a
line of the value's author to the file (a ``pre-up`` command in
/etc/network/interfaces, an APT source).
"""

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


def is_number(value: str) -> bool:
    """Whether ``value`` is a whole number in ASCII digits.

    str.isdigit() alone also takes digits int() refuses ("¹", superscript
    one): a value holding one would end the script with a traceback.
    """
    return value.isascii() and value.isdigit()


# Every character that ends a line for some reader of the instance's files
# or for Python's str.splitlines(): the C0 controls (LF, CR, VT, FF and the
# file/group/record separators among them), DEL, and Unicode's next-line,
# line separator and paragraph separator. None belongs in a value Ganeti
# or a setting gives; a tab or NUL is no more legitimate there.
_LINE_BREAKING = frozenset([*map(chr, range(0x20)), "\x7f", "\x85", "\u2028", "\u2029"])
_LINE_BREAK_NAMES = {"\n": "a line break (newline)", "\r": "a carriage return",
                     "\t": "a tab", "\x00": "a NUL byte",
                     "\x85": "a line break (U+0085 next line)",
                     "\u2028": "a line break (U+2028 line separator)",
                     "\u2029": "a line break (U+2029 paragraph separator)"}


def line_break_problem(value: str) -> str | None:
    """Why ``value`` cannot be written into a line of a file, or None.

    Refused: control characters (below U+0020, and U+007F) and the Unicode
    line separators U+0085, U+2028 and U+2029.
    """
    for char in value:
        if char in _LINE_BREAKING:
            name = _LINE_BREAK_NAMES.get(char, f"the control character U+{ord(char):04X}")
            return f"contains {name}"
    return None


def one_line(text: str) -> str:
    """``text`` with every character :func:`line_break_problem` refuses escaped.

    For text written into a comment: whatever the value holds, it stays on
    the comment's line.
    """
    if line_break_problem(text) is None:
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if c in _LINE_BREAKING
                   else c for c in text)
