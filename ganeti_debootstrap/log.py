"""Logging to stderr, and the timing of each phase of a script.

Ganeti captures stdout and stderr into one log and shows the administrator
its last 20 lines on failure, so everything goes to stderr (stdout is
export's data stream) and the final lines are the error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("ganeti_debootstrap")

# TEST ONLY: the fault tests (tests/root/test_faults.py) set this to a phase
# name to stop the script when that phase starts, so that a signal reaches
# it at a known point. Ganeti runs OS scripts with a clean environment that
# never holds it; nothing else reads it.
PAUSE_VARIABLE = "GIDB_TEST_PAUSE_AT"


def setup(debug: bool) -> None:
    """Log to stderr; with ``debug``, every command and phase detail too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("ganeti_debootstrap")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Log one line per phase with its duration (the start too when debugging)."""
    log.debug("%s: started", name)
    start = time.monotonic()
    ok = False
    try:
        _pause_if_asked(name)
        yield
        ok = True
    finally:
        took = time.monotonic() - start
        if ok:
            log.info("%s: done in %.2f s", name, took)
        else:
            log.info("%s: failed after %.2f s", name, took)


@contextlib.contextmanager
def failure_logged(what: str) -> Iterator[None]:
    """Log an error of a cleanup step instead of raising it.

    Used while another error is on its way up: that one is what the
    administrator must see, not a consequence of it.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - logged, the first error wins
        log.error("%s also failed: %s", what, exc)


@contextlib.contextmanager
def released(what: str, release: Callable[[], None]) -> Iterator[None]:
    """Run ``release`` (``what``, for the log) when the block ends.

    After a block that failed, a failure of ``release`` is only logged
    (:func:`failure_logged`) and the block's error goes on.
    """
    try:
        yield
    except BaseException:
        with failure_logged(what):
            release()
        raise
    release()


def _pause_if_asked(name: str) -> None:
    """Wait for a signal at the start of the phase GIDB_TEST_PAUSE_AT names.

    A phase with a count ("hooks (2)") matches its bare name too. Only the
    fault tests set the variable; see PAUSE_VARIABLE.
    """
    wanted = os.environ.get(PAUSE_VARIABLE)
    if not wanted or wanted not in (name, name.split(" (", 1)[0]):
        return
    sys.stderr.write(f"PAUSED {name}\n")
    sys.stderr.flush()
    while True:
        # The handlers of signals.py raise Interrupted out of here.
        signal.pause()


def final_error(what: str, message: str) -> None:
    """The error as the last paragraph of stderr: ``ERROR: <what> failed: ...``.

    Ganeti shows only the last 20 lines of a failed script's log; an
    administrator's command ends the same way.
    """
    sys.stderr.flush()
    print(f"ERROR: {what} failed: {message}", file=sys.stderr)
    sys.stderr.flush()
