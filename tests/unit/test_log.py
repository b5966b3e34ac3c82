"""Cleanup logging: a release step's failure never hides the error before it."""

from __future__ import annotations

import logging

import pytest

from ganeti_debootstrap import log


def test_a_failed_cleanup_is_logged_and_the_first_error_goes_on(caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="first"):
        try:
            raise RuntimeError("first")
        finally:
            with log.failure_logged("detaching /dev/loop7"):
                raise OSError("busy")
    assert "detaching /dev/loop7 also failed: busy" in caplog.text


def test_released_runs_the_release_after_a_block_that_succeeded():
    done: list[str] = []
    with log.released("removing x", lambda: done.append("released")):
        done.append("block")
    assert done == ["block", "released"]


def test_released_raises_a_release_failure_when_the_block_succeeded():
    def release() -> None:
        raise OSError("busy")

    with pytest.raises(OSError, match="busy"):
        with log.released("unmounting /t", release):
            pass


def test_released_keeps_the_blocks_error_and_logs_the_release_failure(caplog):
    def release() -> None:
        raise OSError("busy")

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="hook failed"):
        with log.released("unmounting /t", release):
            raise RuntimeError("hook failed")
    assert "unmounting /t also failed: busy" in caplog.text
