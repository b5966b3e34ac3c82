"""A status line on the administrator's terminal while long work runs.

Only ganeti-debootstrap-cache uses it (the OS scripts' stderr is Ganeti's
log, never a terminal). When stderr is a terminal, the last line shows what
runs and for how long, redrawn every second; every other write to stderr
(our log, the forwarded output of debootstrap and tar) first clears it, so
the line never mixes with them. When stderr is not a terminal (a timer, a
pipe, a monitoring job), nothing is drawn: the log lines are all there is.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

# How often the elapsed time is redrawn.
TICK_SECONDS = 1.0

_CLEAR = "\r\033[K"


class Terminal:
    """stderr with a status line at its bottom (see the module docstring)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._shown = False

    def write(self, text: str) -> int:
        with self._lock:
            self._clear()
            written = self._stream.write(text)
            self._stream.flush()
            return written

    def write_bytes(self, data: bytes) -> int:
        with self._lock:
            self._clear()
            self._stream.flush()
            written = self._stream.buffer.write(data)  # type: ignore[attr-defined]
            self._stream.buffer.flush()  # type: ignore[attr-defined]
            return int(written)

    def flush(self) -> None:
        self._stream.flush()

    @property
    def buffer(self) -> _Bytes:
        return _Bytes(self)

    def isatty(self) -> bool:
        return self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def show(self, status: str) -> None:
        """Draw ``status`` as the last line, cut to the terminal's width."""
        width = shutil.get_terminal_size().columns - 1
        with self._lock:
            self._clear()
            self._stream.write(status[:max(width, 10)])
            self._stream.flush()
            self._shown = True

    def hide(self) -> None:
        with self._lock:
            self._clear()
            self._stream.flush()

    def _clear(self) -> None:
        if self._shown:
            self._stream.write(_CLEAR)
            self._shown = False


class _Bytes:
    """The ``buffer`` of :class:`Terminal`: what the runner forwards goes here."""

    def __init__(self, terminal: Terminal) -> None:
        self._terminal = terminal

    def write(self, data: bytes) -> int:
        return self._terminal.write_bytes(data)

    def flush(self) -> None:
        self._terminal.flush()


def elapsed(seconds: float) -> str:
    """``seconds`` as m:ss (h:mm:ss from an hour)."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@contextlib.contextmanager
def terminal_stderr() -> Iterator[Terminal | None]:
    """Route stderr (and our log handlers) through a Terminal, if it is one.

    Yields None when stderr is not a terminal: nothing changes then.
    """
    original = sys.stderr
    if not original.isatty():
        yield None
        return
    term = Terminal(original)
    handlers = [h for h in logging.getLogger("ganeti_debootstrap").handlers
                if isinstance(h, logging.StreamHandler) and h.stream is original]
    for handler in handlers:
        handler.setStream(term)  # type: ignore[arg-type]
    sys.stderr = term  # type: ignore[assignment]
    try:
        yield term
    finally:
        term.hide()
        sys.stderr = original
        for handler in handlers:
            handler.setStream(original)


@contextlib.contextmanager
def status(term: Terminal | None, label: str) -> Iterator[None]:
    """Show ``label`` and the time since it started until the block ends."""
    if term is None:
        yield
        return
    shown = term
    start = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while True:
            shown.show(f"{label} ({elapsed(time.monotonic() - start)})")
            if done.wait(TICK_SECONDS):
                return

    thread = threading.Thread(target=tick, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        term.hide()
