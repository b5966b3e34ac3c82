"""A recording fake for the command runner that refuses unexpected commands.

Unit tests install it with ``runner.replaced(fake)`` and then assert the
exact sequence of commands, teardown after an injected failure included.
Nothing is accepted by default: every command a test lets run is declared
with :meth:`FakeRunner.expect`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from ganeti_debootstrap.errors import CommandError
from ganeti_debootstrap.runner import Result, real_runner


@dataclass
class Rule:
    prefix: tuple[str, ...]
    stdout: bytes
    returncode: int
    stderr: str
    action: Callable[[Sequence[str]], None] | None
    times: int | None  # None: any number of times
    # Computes the standard output from the command (instead of ``stdout``).
    output: Callable[[Sequence[str]], bytes | str] | None = None
    real: bool = False  # run by the real runner (still recorded)
    # Reads its standard input (a pipe) to the end, as restore or tar would.
    reads_stdin: bool = False


class UnexpectedCommand(AssertionError):
    pass


class FakeRunner:
    """Stands in for the real runner; see the module docstring."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.calls: list[tuple[str, ...]] = []
        self.stdins: list[bytes | None] = []
        self.envs: list[Mapping[str, str] | None] = []
        # The one command made to fail (fail_at), counted as ``faked`` counts.
        self.failing: int | None = None
        self.failure_stderr = ""
        self.faked = 0  # the calls so far that were faked (not real=True)

    def fail_at(self, index: int, stderr: str = "injected failure") -> FakeRunner:
        """Make the ``index``-th faked command (from 0) exit with status 1.

        Commands run for real (``real=True``) are not counted.

        Whatever rule it matches, it does nothing (no action) and prints
        nothing: the command failed before doing what it was asked.
        """
        self.failing, self.failure_stderr = index, stderr
        return self

    def expect(self, *prefix: str, stdout: bytes | str = b"", returncode: int = 0,
               stderr: str = "", action: Callable[[Sequence[str]], None] | None = None,
               times: int | None = None,
               output: Callable[[Sequence[str]], bytes | str] | None = None,
               real: bool = False, reads_stdin: bool = False) -> FakeRunner:
        """Allow commands starting with ``prefix``; later rules win.

        ``action`` runs with the command's argv (to make what the real
        command would make); ``output``, if given, computes its standard
        output from the argv, after ``action``. ``real``: the command runs
        for real (a harmless program a test does not fake), recorded too.
        ``reads_stdin``: standard input, a pipe or file, is read to its end
        first (the stream a restore would read).
        """
        if isinstance(stdout, str):
            stdout = stdout.encode()
        self.rules.append(Rule(tuple(prefix), stdout, returncode, stderr, action, times,
                               output, real, reads_stdin))
        return self

    def __call__(self, argv: Sequence[str], *, stdin: IO[bytes] | bytes | None,
                 stdout: IO[bytes] | int | None, capture: bool, check: bool,
                 env: Mapping[str, str] | None, cwd: str | None,
                 timeout: float | None, hint: str) -> Result:
        argv = tuple(argv)
        for rule in reversed(self.rules):
            if argv[:len(rule.prefix)] == rule.prefix and rule.times != 0:
                break
        else:
            raise UnexpectedCommand(f"unexpected command: {argv}")
        if rule.times is not None:
            rule.times -= 1
        self.calls.append(argv)
        self.stdins.append(stdin if isinstance(stdin, bytes) else None)
        self.envs.append(env)
        if rule.real:
            return real_runner(argv, stdin=stdin, stdout=stdout, capture=capture, check=check,
                               env=env, cwd=cwd, timeout=timeout, hint=hint)
        self.faked += 1
        if self.faked - 1 == self.failing:
            if check:
                raise CommandError(argv, 1, self.failure_stderr, hint)
            return Result(argv, 1, b"")
        if rule.reads_stdin and stdin is not None and not isinstance(stdin, bytes):
            while stdin.read(1 << 16):
                pass
        if rule.action is not None:
            rule.action(argv)
        out = rule.stdout
        if rule.output is not None:
            computed = rule.output(argv)
            out = computed.encode() if isinstance(computed, str) else computed
        if check and rule.returncode != 0:
            raise CommandError(argv, rule.returncode, rule.stderr, hint)
        return Result(argv, rule.returncode, out if capture else b"")

    def commands(self) -> list[str]:
        """The calls as ``"prog arg ..."`` strings, for readable assertions."""
        return [" ".join(c) for c in self.calls]
