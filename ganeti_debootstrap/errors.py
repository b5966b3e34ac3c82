"""The error types that end a script with a message for the administrator."""

from __future__ import annotations

import shlex
import signal
from collections.abc import Sequence


class DefinitionError(Exception):
    """An expected failure: its message is shown as the last lines of the log.

    The message must say what is wrong and how to fix it; the top-level
    handler prints it without a traceback (unless DEBUG_LEVEL=1).
    """

    exit_status = 1


class ConfigError(DefinitionError):
    """A setting, variant, OS parameter or Ganeti variable is wrong."""


class UsageError(DefinitionError):
    """The script was called with wrong arguments."""

    exit_status = 2


class DiskError(DefinitionError):
    """The instance disk cannot be used as asked."""


class CacheError(DefinitionError):
    """The bootstrap cache cannot be read or written."""


class ClusterError(DefinitionError):
    """The Ganeti cluster does not allow what was asked (push: not the master,
    nodes whose settings differ)."""


class HookError(DefinitionError):
    """A customisation hook failed."""


class MissingProgramError(DefinitionError):
    """A program the scripts need is not installed on the node."""

    def __init__(self, program: str, package: str | None) -> None:
        self.program = program
        self.package = package
        hint = (f"install the Debian package {package!r} on every node"
                if package else "install it on every node")
        super().__init__(f"The program {program!r} is needed but was not "
                         f"found in PATH; {hint}.")


class CommandError(DefinitionError):
    """An external command failed; carries enough to diagnose from a log tail."""

    def __init__(self, argv: Sequence[str], returncode: int,
                 stderr_tail: str, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.hint = hint
        super().__init__(self._render())

    @property
    def status(self) -> str:
        """How the command ended, as a predicate: "failed with exit status 2"."""
        if self.returncode < 0:
            return f"was killed by signal {-self.returncode}"
        return f"failed with exit status {self.returncode}"

    def _render(self) -> str:
        lines = [f"Command {shlex.join(self.argv)} {self.status}."]
        if self.stderr_tail.strip():
            lines.append("Its last output was:")
            lines.extend("  " + line for line in
                         self.stderr_tail.rstrip().splitlines())
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class Interrupted(BaseException):
    """A termination signal arrived; raised so that every ``finally`` runs.

    It derives from BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way up swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
