"""What configure accepts and refuses, and make distcheck."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Build, build_env, python_has_debian, run

pytestmark = pytest.mark.autotools


def configure(srcdir: Path, builddir: Path, *args: str,
              env: dict[str, str] | None = None) -> tuple[int, str]:
    builddir.mkdir(parents=True, exist_ok=True)
    proc = run([str(srcdir / "configure"), *args], cwd=builddir,
               env=env if env is not None else build_env(), check=False)
    return proc.returncode, proc.stdout


def pythons_without_debian(venv_python: str) -> list[str]:
    """A venv Python, and the python3 first in PATH if it also lacks python3-debian."""
    found = [venv_python]
    path_python = shutil.which("python3")
    if path_python and not python_has_debian(path_python):
        found.append(path_python)
    return found


def test_configure_refuses_with_python_lacking_python3_debian(
        build: Build, python_without_debian: str, tmp_path: Path) -> None:
    for n, python in enumerate(pythons_without_debian(python_without_debian)):
        status, output = configure(build.srcdir, tmp_path / f"b{n}",
                                   f"--with-python={python}")
        assert status != 0, python
        assert "python3-debian" in "\n".join(output.splitlines()[-3:]), output[-800:]


def test_configure_refuses_python_variable_lacking_python3_debian(
        build: Build, python_without_debian: str, tmp_path: Path) -> None:
    env = build_env()
    env["PYTHON"] = python_without_debian
    status, output = configure(build.srcdir, tmp_path, env=env)
    assert status != 0
    assert "apt-get install python3-debian" in output


def test_configure_accepts_an_explicit_python_with_python3_debian(
        build: Build, tmp_path: Path) -> None:
    status, output = configure(build.srcdir, tmp_path, "--with-python=python3",
                               env=build_env(extra_path="/usr/bin"))
    assert status == 0, output[-800:]
    assert "debian.deb822 (python3-debian)... /usr/bin/python3" in output


def test_configure_names_the_debian_package_of_each_missing_program(
        build: Build, tmp_path: Path) -> None:
    env = build_env()
    env["SFDISK"] = "/nonexistent/sfdisk"
    env["RUN_PARTS"] = "/nonexistent/run-parts"
    status, output = configure(build.srcdir, tmp_path, env=env)
    assert status != 0
    assert "sfdisk (Debian package fdisk)" in output
    assert "run-parts (Debian package debianutils)" in output
    assert "apt-get install fdisk debianutils" in output


def test_configure_reports_the_optional_programs(build: Build) -> None:
    assert "checking for kpartx..." in build.configure_output
    assert "kpartx (optional):" in build.configure_output
    assert "mmdebstrap (optional):" in build.configure_output


def test_configure_finds_a_systemd_unit_directory_or_installs_none(
        build: Build, tmp_path: Path) -> None:
    assert re.search(r"systemd units: +/\S*lib/systemd/system\n", build.configure_output)
    status, output = configure(build.srcdir, tmp_path, "--without-systemdsystemunitdir")
    assert status == 0, output
    assert re.search(r"systemd units: +not installed\n", output)


def test_configure_refuses_a_relative_os_dir(build: Build, tmp_path: Path) -> None:
    status, output = configure(build.srcdir, tmp_path, "--with-os-dir=ganeti/os")
    assert status != 0
    assert "not an absolute path" in output


def test_make_distcheck_passes(build: Build, report: Callable[[str], None]) -> None:
    # Builds the tarball, then configures, builds, runs make check,
    # installs, checks the installed verify and uninstalls from it, with
    # a read-only source tree.
    start = time.monotonic()
    proc = build.make("distcheck")
    report(f"make distcheck: {time.monotonic() - start:.1f} s")
    assert "archives ready for distribution" in proc.stdout
