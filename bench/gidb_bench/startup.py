"""Script start-up: from exec to the script's first external command.

Target: under 0.1 s for each of create, import, export, rename and verify,
run as Ganeti runs them (the installed entry point, ``python3 -I``). strace
records every execve with its time (a seccomp filter stops the process at
execve and exit_group only, so the rest runs at full speed): the overhead
is the time from the script's own execve to the first execve of a child.
verify runs no command: its overhead is exec to exit. Each script also runs
untraced for its total wall time.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from . import install, procs, stats
from .context import GIB, Bench
from .procs import BenchError, Result
from .stats import Failure, Verdict

NAME = "startup"
TARGET = 0.1
SCRIPTS = ("create", "import", "export", "rename", "verify")
DISK_BYTES = 2 * GIB
STRACE = ("strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=execve,exit_group",
          "-e", "signal=none", "-ttt")

# "PID TIME call(args..." as strace -f -ttt -o FILE writes it; a call
# interrupted by another process's line shows "<unfinished ...>" here and is
# completed later by a "<... call resumed>" line, which carries no arguments.
_EVENT = re.compile(r'^(?P<pid>\d+)\s+(?P<time>\d+\.\d+)\s+(?P<call>execve|exit_group)'
                    r'\((?P<args>.*)$')
_FIRST_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Event:
    pid: int
    time: float
    call: str  # "execve" or "exit_group"
    program: str  # execve's path; "" for exit_group


def parse_trace(text: str) -> list[Event]:
    """The execve and exit_group calls in strace's output, in order."""
    events = []
    for line in text.splitlines():
        m = _EVENT.match(line)
        if not m:
            continue
        program = ""
        if m.group("call") == "execve":
            s = _FIRST_STRING.match(m.group("args"))
            program = s.group(1) if s else ""
        events.append(Event(int(m.group("pid")), float(m.group("time")), m.group("call"),
                            program))
    return events


def startup_delay(events: Sequence[Event]) -> tuple[float, str]:
    """(seconds, command) from the script's exec to its first child's exec.

    Without any child exec, the time to the script's exit, and "(exit)".
    """
    first = next((e for e in events if e.call == "execve"), None)
    if first is None:
        raise ValueError("the trace holds no execve of the script")
    for e in events:
        if e.call == "execve" and e.pid != first.pid and e.time >= first.time:
            return e.time - first.time, os.path.basename(e.program)
    for e in events:
        if e.call == "exit_group" and e.pid == first.pid:
            return e.time - first.time, "(exit)"
    raise ValueError("the trace shows neither a child's exec nor the script's exit")


@dataclass
class _Disks:
    exported: str  # a created instance disk: export and rename use it
    imported: str
    dump: str
    name: str = "startup1.example.org"


def _invocation(bench: Bench, script: str, disks: _Disks) \
        -> tuple[dict[str, str], tuple[str, ...], str | None, str | None]:
    """(env, args, stdin file, stdout file) of one run of ``script``."""
    if script == "create":
        disk = bench.fresh_disk("startup-create.img", DISK_BYTES)
        return install.create_env("startup3.example.org", disk, DISK_BYTES >> 20), (), None, None
    if script == "import":
        disk = disks.imported
        env = install.create_env(disks.name, disk, DISK_BYTES >> 20, IMPORT_INDEX="0",
                                 IMPORT_DISK_PATH=disk, IMPORT_DEVICE=disk)
        return env, (), disks.dump, None
    if script == "export":
        disk = disks.exported
        env = install.create_env(disks.name, disk, DISK_BYTES >> 20, EXPORT_INDEX="0",
                                 EXPORT_DISK_PATH=disk, EXPORT_DEVICE=disk)
        return env, (), None, os.devnull
    if script == "rename":
        old = disks.name
        disks.name = ("startup2.example.org" if old == "startup1.example.org"
                      else "startup1.example.org")
        env = install.create_env(disks.name, disks.exported, DISK_BYTES >> 20,
                                 OLD_INSTANCE_NAME=old)
        return env, (), None, None
    return install.verify_env(), ("parameters",), None, None


def _run_script(bench: Bench, script: str, disks: _Disks, log_name: str,
                trace: str | None) -> Result:
    env, args, stdin_path, stdout_path = _invocation(bench, script, disks)
    stdin = open(stdin_path, "rb") if stdin_path else None
    stdout = open(stdout_path, "wb") if stdout_path else None
    try:
        if trace is None:
            return bench.ours(script, env, log_name, args, stdin=stdin, stdout=stdout)
        argv = [*STRACE, "-o", trace, *bench.inst.argv(script, *args)]
        result = procs.wait(procs.start(argv, env=env, log_path=bench.log_path(log_name),
                                        cwd=bench.inst.os_dir, umask=0o077,
                                        stdin=stdin, stdout=stdout))
        procs.check_result(result)
        return result
    finally:
        for f in (stdin, stdout):
            if f is not None:
                f.close()


def _prepare(bench: Bench) -> _Disks:
    disks = _Disks(bench.fresh_disk("startup-export.img", DISK_BYTES),
                   bench.fresh_disk("startup-import.img", DISK_BYTES),
                   bench.path("startup.dump"))
    bench.ours_create(disks.exported, disks.name, "startup-setup-create")
    env = install.create_env(disks.name, disks.exported, DISK_BYTES >> 20,
                             EXPORT_INDEX="0", EXPORT_DISK_PATH=disks.exported,
                             EXPORT_DEVICE=disks.exported)
    with open(disks.dump, "wb") as out:
        bench.ours("export", env, "startup-setup-export", stdout=out)
    return disks


def run(bench: Bench) -> None:
    runs = bench.options.runs
    if not shutil.which("strace"):
        bench.verdicts.append(Failure(NAME, "strace is not installed (apt-get install "
                                            "strace): it times each script's first command"))
        bench.say("  " + bench.verdicts[-1].line())
        return
    bench.say(f"The installed scripts, Ganeti's clean environment, cwd the OS dir, "
              f"umask 077; a created 2 GiB instance disk for export, rename and import "
              f"(its dump). Runs: {runs} of each script untraced and {runs} under strace, "
              f"interleaved.")
    disks = _prepare(bench)
    rows = []
    for script in SCRIPTS:
        delays: list[float] = []
        commands: set[str] = set()
        walls: list[float] = []
        for round_no, mode in stats.interleaved(["plain", "traced"], runs):
            log_name = f"startup-{script}-{round_no + 1}-{mode}"
            bench.quiesce()
            if mode == "plain":
                walls.append(_run_script(bench, script, disks, log_name, None).seconds)
                continue
            trace = bench.path("logs", log_name + ".strace")
            _run_script(bench, script, disks, log_name, trace)
            with open(trace, encoding="utf-8", errors="replace") as f:
                try:
                    delay, command = startup_delay(parse_trace(f.read()))
                except ValueError as err:
                    raise BenchError(f"cannot read the start-up of {script} from "
                                     f"{trace}: {err}") from None
            delays.append(delay)
            commands.add(command)
        delay = stats.median(delays)
        rows.append([script, f"{delay:.3f}", "/".join(sorted(commands)),
                     stats.seconds(stats.median(walls))])
        bench.verdicts.append(Verdict(NAME, f"{script}: exec to first command", delay,
                                      TARGET, " s",
                                      note="exec to exit: it runs no command"
                                      if commands == {"(exit)"} else ""))
    for line in stats.table(["script", "exec->1st command (s)", "1st command",
                             "wall (s)"], rows):
        bench.say("  " + line)
    bench.say("  (medians; exec->1st command under strace; wall = the whole script, "
              "exec to exit, untraced)")
    for verdict in bench.verdicts[-len(SCRIPTS):]:
        bench.say("  " + verdict.line())
