"""A recording fake for the command runner that refuses unexpected commands.

Unit tests install it with ``runner.replaced(fake)`` and then assert the
exact sequence of commands, teardown after an injected failure included.
Nothing is accepted by default: every command a test lets run is declared
with :meth:`FakeRunner.expect`; one declared ``real=True`` is recorded and
then run for real (a harmless command whose output the test needs, such as
the shell reading the settings files).
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
    real: bool = False  # run it for real (after recording it)


class UnexpectedCommand(AssertionError):
    pass


class FakeRunner:
    """Stands in for the real runner; see the module docstring."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.calls: list[tuple[str, ...]] = []
        self.stdins: list[bytes | None] = []
        self.envs: list[Mapping[str, str] | None] = []

    def expect(self, *prefix: str, stdout: bytes | str = b"", returncode: int = 0,
               stderr: str = "", action: Callable[[Sequence[str]], None] | None = None,
               times: int | None = None, real: bool = False) -> FakeRunner:
        """Allow commands starting with ``prefix``; later rules win.

        ``real``: the command runs for real, the other options unused.
        """
        if isinstance(stdout, str):
            stdout = stdout.encode()
        self.rules.append(Rule(tuple(prefix), stdout, returncode, stderr, action, times,
                               real))
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
            return real_runner(argv, stdin=stdin, stdout=stdout, capture=capture,
                               check=check, env=env, cwd=cwd, timeout=timeout, hint=hint)
        if rule.action is not None:
            rule.action(argv)
        if check and rule.returncode != 0:
            raise CommandError(argv, rule.returncode, rule.stderr, hint)
        return Result(argv, rule.returncode, rule.stdout if capture else b"")

    def commands(self) -> list[str]:
        """The calls as ``"prog arg ..."`` strings, for readable assertions."""
        return [" ".join(c) for c in self.calls]
