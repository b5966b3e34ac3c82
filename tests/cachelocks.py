"""Probing a cache key's lock from outside, as another create would."""

from __future__ import annotations

import fcntl
import os


def lock_held(lock_path: str, exclusive: bool) -> bool:
    """Whether another open file can NOT take the lock at ``lock_path`` that way now."""
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
