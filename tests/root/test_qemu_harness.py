"""Tests of the qemu boot harness itself (tests/root/qemu_boot.py).

Most tests drive a fake guest: a small Python program that speaks like a
serial console (login prompt, optional password prompt, a root shell), so
the console logic is checked in seconds. Real qemu runs once here, on a
blank disk that never boots (the timeout path must kill qemu); the real
boots of instances made by create are in test_boot.py.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.root.qemu_boot import (BootFailed, BootResult, boot_and_run,
                                  run_console_session)

FAKE_GUEST = textwrap.dedent(r'''
    import os, subprocess, sys, time
    opts = dict(a.split("=", 1) for a in sys.argv[1:])
    for stub in ("dmesg", "systemctl"):
        if not os.access(os.path.join(opts["stubs"], stub), os.X_OK):
            sys.exit("fake guest: stub %s missing" % stub)
    if "pidfile" in opts:
        with open(opts["pidfile"], "w") as f:
            f.write(str(os.getpid()))
    out = sys.stdout
    def say(text):
        out.write(text.replace("\n", "\r\n"))
        out.flush()
    say("[    0.000000] Linux version fake\nStarting fake guest...\n")
    if opts.get("behave") == "hang":
        time.sleep(3600)
    if opts.get("behave") == "die":
        sys.exit(3)
    say("\nDebian GNU/Linux 13 %s ttyS0\n\n%s login: " % (opts["host"], opts["host"]))
    user = sys.stdin.readline().strip()
    given = None
    if opts.get("password") == "ask":
        say("Password: ")
        given = sys.stdin.readline().rstrip("\n")
    if (opts.get("password") == "refuse" or user != "root"
            or ("want" in opts and given != opts["want"])):
        say("\nLogin incorrect\n%s login: " % opts["host"])
        time.sleep(3600)
    say("\nThe programs included with the Debian GNU/Linux system are free.\n")
    prompt = "\x1b[?2004hroot@%s:~# " % opts["host"]
    say(prompt)
    for line in sys.stdin:
        say(line.rstrip("\n") + "\n\x1b[?2004l")
        if line.strip() == "poweroff":
            say("[   40.000000] reboot: Power down\n")
            sys.exit(0)
        # The stubs directory comes first: the harness's settle step
        # (dmesg, systemctl) must never reach the host's real programs.
        res = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                             env={"PATH": opts["stubs"] + ":/usr/bin:/bin"})
        say(res.stdout + res.stderr)
        say(prompt)
''')


@pytest.fixture
def fake_guest(tmp_path: Path):
    """Returns argv for a fake guest with the given options (key=value)."""
    script = tmp_path / "fake_guest.py"
    script.write_text(FAKE_GUEST)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("dmesg", "systemctl"):
        (stubs / name).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {tmp_path}/stub.log\n")
        (stubs / name).chmod(0o755)

    def argv(**opts: str) -> list[str]:
        opts.setdefault("host", "inst1")
        opts["stubs"] = str(stubs)
        return [sys.executable, str(script), *(f"{k}={v}" for k, v in opts.items())]
    return argv


def session(argv: list[str], tmp_path: Path, **kwargs) -> BootResult:
    kwargs.setdefault("commands", [])
    kwargs.setdefault("expect_hostname", "inst1")
    kwargs.setdefault("timeout", 20)
    return run_console_session(argv, transcript_path=tmp_path / "console.log", **kwargs)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_command_outputs_are_separated_from_the_typed_lines(fake_guest, tmp_path):
    result = session(fake_guest(), tmp_path,
                     commands=["echo MARK-$((6*7)); echo second", "printf 'no newline'",
                               "echo tail & wait # a comment"])
    assert result.outputs == ("MARK-42\nsecond\n", "no newline", "tail\n")
    assert result.statuses == (0, 0, 0)
    assert "inst1 login: " in result.transcript
    assert "MARK-42" in (tmp_path / "console.log").read_text()


def test_settling_waits_for_the_boot_and_quiets_the_kernel_before_commands(
        fake_guest, tmp_path):
    stub_log = tmp_path / "stub.log"
    session(fake_guest(), tmp_path, commands=["true"], settle=False)
    assert not stub_log.exists()
    session(fake_guest(), tmp_path, commands=["true"])
    calls = stub_log.read_text().splitlines()
    assert [c.split("/")[-1] for c in calls] == [
        "dmesg --console-level emerg", "systemctl is-system-running --wait"]


def test_an_asked_password_is_answered_empty(fake_guest, tmp_path):
    result = session(fake_guest(password="ask"), tmp_path, commands=["echo in"])
    assert result.outputs == ("in\n",)


def test_a_given_password_is_typed_when_asked(fake_guest, tmp_path):
    result = session(fake_guest(password="ask", want="s3cret pw"), tmp_path,
                     password="s3cret pw", commands=["echo in"])
    assert result.outputs == ("in\n",)


def test_a_wrong_given_password_fails_with_the_reason(fake_guest, tmp_path):
    with pytest.raises(BootFailed, match="with the given password was refused"):
        session(fake_guest(password="ask", want="right"), tmp_path, password="wrong")


def test_a_given_password_that_is_never_asked_for_fails(fake_guest, tmp_path):
    with pytest.raises(BootFailed, match="without being asked for the password"):
        session(fake_guest(), tmp_path, password="s3cret")


def test_the_during_callback_runs_after_login_before_the_commands(fake_guest, tmp_path):
    seen = []

    def during():
        seen.append((tmp_path / "stub.log").read_text())
        return "done"
    result = session(fake_guest(), tmp_path, during=during, commands=["echo in"])
    assert result.during == "done"
    # The settle step ran before it (the system is up when it runs).
    assert "systemctl is-system-running --wait" in seen[0]


def test_a_refused_login_fails_with_the_reason(fake_guest, tmp_path):
    with pytest.raises(BootFailed, match="empty password was refused"):
        session(fake_guest(password="refuse"), tmp_path)


def test_a_wrong_hostname_at_the_login_prompt_fails(fake_guest, tmp_path):
    with pytest.raises(BootFailed, match="hostname 'other', expected 'inst1'"):
        session(fake_guest(host="other"), tmp_path)


def test_a_fully_qualified_hostname_matches_its_first_label(fake_guest, tmp_path):
    result = session(fake_guest(), tmp_path, expect_hostname="inst1.example.org")
    assert result.outputs == ()
    with pytest.raises(BootFailed, match="expected 'other'"):
        session(fake_guest(), tmp_path, expect_hostname="other.example.org")


def test_a_failing_command_fails_the_boot_unless_unchecked(fake_guest, tmp_path):
    with pytest.raises(BootFailed, match="exit_3' exited with status 3"):
        session(fake_guest(), tmp_path, commands=["exit_3() { return 3; }; exit_3"])
    # The function is defined in the command itself: the exit status is the
    # last statement's.
    result = session(fake_guest(), tmp_path, check=False,
                     commands=["f() { echo out; return 3; }; f"])
    assert result.outputs == ("out\n",) and result.statuses == (3,)


def test_a_guest_that_exits_early_fails_with_the_console_tail(fake_guest, tmp_path):
    with pytest.raises(BootFailed) as err:
        session(fake_guest(behave="die"), tmp_path)
    assert "exited (status 3) while waiting for login prompt" in str(err.value)
    assert "Starting fake guest..." in str(err.value)


def test_timeout_kills_the_guest_and_reports_the_console_tail(fake_guest, tmp_path):
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(BootFailed) as err:
        session(fake_guest(behave="hang", pidfile=str(pidfile)), tmp_path, timeout=3)
    assert time.monotonic() - start < 10
    assert "No login prompt after" in str(err.value)
    assert "Starting fake guest..." in str(err.value)
    assert process_gone(int(pidfile.read_text()))


def test_an_interrupt_kills_the_guest(fake_guest, tmp_path):
    pidfile = tmp_path / "pid"

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            session(fake_guest(behave="hang", pidfile=str(pidfile)), tmp_path,
                    timeout=30)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert process_gone(int(pidfile.read_text()))


def qemu_processes_using(path: Path) -> list[int]:
    """Pids of running processes whose command line names ``path``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if os.fsencode(path) in cmdline and b"qemu" in cmdline:
            pids.append(int(entry))
    return pids


def test_a_disk_that_never_boots_times_out_and_qemu_is_killed(tmp_path):
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(BootFailed) as err:
        boot_and_run(blank, workdir=tmp_path / "boot", mode="disk", timeout=8)
    assert "No login prompt after" in str(err.value)
    assert qemu_processes_using(blank) == []
