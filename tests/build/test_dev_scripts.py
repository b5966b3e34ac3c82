"""The developer and CI scripts: present, executable, and refusing what they must."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .conftest import ROOT

SCRIPTS = ("autogen.sh", "devel/install-deps", "devel/run-tests",
           "devel/demo-create", ".ci/run")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_and_parses(script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK)
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    assert subprocess.run([shell, "-n", str(path)]).returncode == 0


def test_ci_runs_exactly_the_readme_test_command() -> None:
    lines = [ln for ln in (ROOT / ".ci/run").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "set -euo pipefail"
    assert lines[-1] == "exec ./devel/run-tests"


def run_as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a copy of ``script`` as nobody (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="gidb-nobody-"))
    try:
        (base / "devel").mkdir()
        shutil.copy(ROOT / script, base / script)
        for d in (base, base / "devel"):
            d.chmod(0o755)
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             str(base / script), *args], capture_output=True, text=True,
            stdin=subprocess.DEVNULL, cwd="/")
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize("script", ["devel/run-tests", "devel/demo-create"])
def test_script_refuses_to_run_without_root(script: str) -> None:
    proc = run_as_nobody(script)
    assert proc.returncode == 1
    assert "must run as root" in proc.stderr
