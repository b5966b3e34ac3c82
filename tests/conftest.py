"""Shared test setup: the package is imported from the source tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ganeti_debootstrap import runner  # noqa: E402
from ganeti_debootstrap.cache_store import Cache  # noqa: E402
from tests.fakes import FakeRunner  # noqa: E402


@pytest.fixture
def fake_runner():
    """A FakeRunner installed in place of the real one for this test."""
    fake = FakeRunner()
    with runner.replaced(fake):
        yield fake


@pytest.fixture
def store(tmp_path):
    """An empty bootstrap cache in tmp_path (the directory is not made yet)."""
    return Cache(str(tmp_path / "cache"), clean_days=14)


@pytest.fixture(scope="session")
def built_package(tmp_path_factory):
    """The .deb built once per session from this work tree (tests/debpackage.py)."""
    from tests.debpackage import build_binary_package
    return build_binary_package(Path(ROOT), tmp_path_factory.mktemp("deb"))
