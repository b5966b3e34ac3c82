"""Termination signals become exceptions, so that cleanup runs.

Ganeti cancels a job by signalling the OS script; Python's default action
for SIGTERM and SIGHUP ends the process without running ``finally`` blocks,
which would leave loop devices attached and filesystems mounted. The first
signal raises :class:`Interrupted`; later ones are remembered but do not
raise again, so that the cleanup the first one started can finish.
"""

from __future__ import annotations

import signal
from types import FrameType

from .errors import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if len(_received) == 1:
        raise Interrupted(signum)


def install() -> None:
    """Turn SIGTERM, SIGHUP and SIGINT into :class:`Interrupted`."""
    for sig in HANDLED:
        signal.signal(sig, _handler)


def received() -> list[int]:
    """The signals received so far, in order."""
    return list(_received)
