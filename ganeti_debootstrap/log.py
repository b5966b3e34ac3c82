"""Logging to stderr, and the timing of each phase of a script.

Ganeti captures stdout and stderr into one log and shows the administrator
its last 20 lines on failure, so everything goes to stderr (stdout is
export's data stream) and the final lines are the error.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("ganeti_debootstrap")


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
        yield
        ok = True
    finally:
        took = time.monotonic() - start
        if ok:
            log.info("%s: done in %.2f s", name, took)
        else:
            log.info("%s: failed after %.2f s", name, took)
