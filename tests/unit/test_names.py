"""The line-break check every value written into the instance passes."""

from __future__ import annotations

import pytest
from ganeti_debootstrap import names

REFUSED = [chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", REFUSED, ids=[f"U+{ord(c):04X}" for c in REFUSED])
def test_every_control_character_and_line_separator_is_refused(char):
    problem = names.line_break_problem(f"net1{char}x")
    assert problem is not None and problem.startswith("contains ")
    assert char not in problem
    assert char not in names.one_line(f"net1{char}x")


@pytest.mark.parametrize("value", ["", "net1", "réseau 1 (bâtiment B)", "a b c",
                                   "http://127.0.0.1:3142/debian", "日本", "\xa0nbsp",
                                   "\x80\x9f"])
def test_printable_text_is_accepted_and_kept(value):
    assert names.line_break_problem(value) is None
    assert names.one_line(value) == value
