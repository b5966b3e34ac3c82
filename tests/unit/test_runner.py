"""The command runner: argv only, stdout kept off our stdout, useful errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ganeti_debootstrap import runner
from ganeti_debootstrap.errors import CommandError, MissingProgramError

# These tests are of the real runner: every one runs real programs.
pytestmark = pytest.mark.real_commands


def test_child_stdout_goes_to_stderr_not_stdout(capfd):
    runner.run(["sh", "-c", "echo to-out; echo to-err >&2"])
    out, err = capfd.readouterr()
    assert out == ""
    assert "to-out" in err and "to-err" in err


def test_output_returns_captured_text():
    assert runner.output(["printf", "%s", "  hello  "]) == "hello"


def test_stdin_bytes_are_fed_to_the_child():
    assert runner.run(["cat"], stdin=b"payload", capture=True).stdout == b"payload"


def test_stdin_is_dev_null_by_default():
    assert runner.run(["cat"], capture=True).stdout == b""


def test_failure_carries_command_status_tail_and_hint():
    script = "for i in $(seq 1 30); do echo line$i >&2; done; exit 3"
    with pytest.raises(CommandError) as err:
        runner.run(["sh", "-c", script], hint="Check the mirror.")
    exc = err.value
    assert exc.returncode == 3
    text = str(exc)
    assert "exit status 3" in text and "line30" in text and "Check the mirror." in text
    assert "line1\n" not in text  # only the tail: Ganeti shows 20 lines
    assert len(text.splitlines()) <= runner.STDERR_TAIL_LINES + 3


def test_killed_child_is_reported_as_signal():
    with pytest.raises(CommandError, match="killed by signal 9"):
        runner.run(["sh", "-c", "kill -9 $$"])


def test_unchecked_failure_returns_status():
    assert runner.run(["false"], check=False).returncode == 1


def test_missing_program_names_the_debian_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingProgramError, match="'kpartx'.*package 'kpartx'"):
        runner.run(["kpartx", "-l", "/dev/null"])


def test_fixed_locale_for_children():
    assert runner.output(["sh", "-c", "echo $LC_ALL"]) == "C"


def test_arguments_are_never_interpreted_by_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    runner.run(["echo", f"; touch {marker}", f"$(touch {marker})"])
    assert not marker.exists()


def test_timeout_kills_the_child():
    with pytest.raises(subprocess.TimeoutExpired):
        runner.run(["sleep", "30"], timeout=0.2)


def test_fake_runner_refuses_undeclared_commands(fake_runner):
    fake_runner.expect("blkid", stdout="ext4")
    assert runner.output(["blkid", "-p", "/dev/x"]) == "ext4"
    with pytest.raises(AssertionError, match="unexpected command"):
        runner.run(["mkfs.ext4", "/dev/x"])
    assert fake_runner.commands() == ["blkid -p /dev/x"]


def test_script_stdout_stays_clean_end_to_end(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from ganeti_debootstrap import runner;"
            "runner.run(['echo', 'noise']); sys.stdout.write('DATA')" % os.getcwd())
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout == "DATA" and "noise" in res.stderr


def test_timeout_also_stops_what_the_command_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        runner.run(["sh", "-c", script], timeout=0.5)
    pid = int(pidfile.read_text())
    # The background child was in the command's process group: it is gone.
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        import time
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the command's child survived the timeout")
