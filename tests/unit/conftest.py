"""Unit test setup: no external command runs unless a test asks for it.

Every unit test runs with a refusing runner installed (a FakeRunner
without rules: any command raises UnexpectedCommand), so a unit test
cannot touch the node by accident. A test that fakes commands takes the
``fake_runner`` fixture (tests/conftest.py), which replaces the refusing
one; a test that must run a real program says so with
``@pytest.mark.real_commands``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ganeti_debootstrap import runner
from tests.fakes import FakeRunner

REAL_COMMANDS = "real_commands"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{REAL_COMMANDS}: the unit test runs real external commands "
                   "(without it, every command is refused)")


@pytest.fixture(autouse=True)
def refuse_commands(request: pytest.FixtureRequest) -> Iterator[None]:
    """Install the refusing runner, unless the test is marked real_commands."""
    if request.node.get_closest_marker(REAL_COMMANDS) is not None:
        yield
        return
    with runner.replaced(FakeRunner()):
        yield
