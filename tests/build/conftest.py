"""Build and install tests: a scratch copy of the source, configured and installed.

Tests marked ``autotools`` run autoreconf, configure and make in a copy of
the work tree under pytest's temporary directory, so they never touch the
source tree (which may itself be configured in-tree: that would stop an
out-of-tree build). The copy, its build and a DESTDIR installation are made
once per session. ``make check`` runs the other tests here, not these:
``make distcheck`` is one of them and itself runs ``make check``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.terminal import TerminalReporter

ROOT = Path(__file__).resolve().parents[2]

# The PATH Ganeti gives OS scripts.
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"

# Installation directories of the session build, as a Debian package has them.
PREFIX = "/usr"
SYSCONFDIR = "/etc"
LOCALSTATEDIR = "/var"
OS_DIR = "usr/share/ganeti/os/debootstrap"  # relative to DESTDIR

# Build products never copied when the tree is not a git checkout.
_SKIP_NAMES = {".git", "__pycache__", "autom4te.cache", ".pytest_cache",
               ".mypy_cache", ".ruff_cache", "build-aux", ".coverage"}
_SKIP_TOP = {"Makefile", "Makefile.in", "configure", "configure~",
             "config.status", "config.log", "aclocal.m4", "common.py",
             "create", "import", "export", "rename", "verify"}

_measurements: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "autotools: runs autoreconf/configure/make in a scratch copy "
                   "of the source (not run by make check)")


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if _measurements:
        terminalreporter.section("build and install measurements")
        for line in _measurements:
            terminalreporter.write_line(line)


@pytest.fixture
def report() -> Callable[[str], None]:
    """Print a line in the terminal summary (measurements, not assertions)."""
    return _measurements.append


def source_files(root: Path) -> list[str]:
    """The work tree's source files, relative to ``root``, build products excluded.

    In a git checkout: tracked files plus untracked ones that .gitignore does
    not cover (other people's new modules count); otherwise every file but
    the known build products.
    """
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
        return sorted(n for n in names if os.path.lexists(root / n))
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_NAMES]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name in _SKIP_NAMES or name.endswith((".pyc", ".tar.gz")):
                continue
            if rel == "." and name in _SKIP_TOP:
                continue
            found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found)


def copy_source(root: Path, dest: Path) -> None:
    """Copy the source files of ``root`` to ``dest``, keeping modes and symlinks."""
    for name in source_files(root):
        src = root / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)


def build_env(extra_path: str = "") -> dict[str, str]:
    """Our environment without what would leak into configure and make."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DESTDIR", "PYTHON",
                        "CONFIG_SITE", "PYTHONPATH")}
    env["LC_ALL"] = "C"
    if extra_path:
        env["PATH"] = extra_path + os.pathsep + env.get("PATH", "")
    return env


def run(argv: list[str], cwd: Path, env: Mapping[str, str] | None = None,
        check: bool = True, umask: int = -1) -> subprocess.CompletedProcess[str]:
    """Run a build command; a failure shows the end of its output."""
    proc = subprocess.run(argv, cwd=cwd, env=env if env is not None else build_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, umask=umask)
    if check and proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        pytest.fail(f"{' '.join(argv)} (in {cwd}) failed with exit status "
                    f"{proc.returncode}:\n{tail}", pytrace=False)
    return proc


def python_has_debian(python: str) -> bool:
    """Whether ``python`` can import python3-debian."""
    try:
        return subprocess.run([python, "-c", "import debian.deb822"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="session")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the work tree with configure generated (./autogen.sh)."""
    dest = tmp_path_factory.mktemp("source") / "ganeti-instance-debootstrap"
    copy_source(ROOT, dest)
    run(["./autogen.sh"], cwd=dest)
    return dest


@pytest.fixture(scope="session")
def python_without_debian(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python 3 that cannot import python3-debian (a venv without system site)."""
    venv = tmp_path_factory.mktemp("venv") / "nodebian"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = str(venv / "bin" / "python3")
    assert not python_has_debian(python), f"{python} unexpectedly has python3-debian"
    return python


@dataclass(frozen=True)
class Build:
    """The session's configured build and its DESTDIR installation."""

    srcdir: Path
    builddir: Path
    destdir: Path
    configure_output: str
    make_output: str
    install_seconds: float

    @property
    def os_dir(self) -> Path:
        return self.destdir / OS_DIR

    def make(self, *args: str, umask: int = -1,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["make", *args], cwd=self.builddir, umask=umask, check=check)


@pytest.fixture(scope="session")
def build(source_copy: Path, python_without_debian: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    """configure (with a python3 lacking python3-debian first in PATH), make,
    and make install DESTDIR=... under umask 077, as root installs often run."""
    import time
    base = tmp_path_factory.mktemp("build")
    builddir = base / "build"
    destdir = base / "dest"
    builddir.mkdir()
    env = build_env(extra_path=os.path.dirname(python_without_debian))
    configured = run([str(source_copy / "configure"), f"--prefix={PREFIX}",
                      f"--sysconfdir={SYSCONFDIR}",
                      f"--localstatedir={LOCALSTATEDIR}"], cwd=builddir, env=env)
    made = run(["make"], cwd=builddir)
    start = time.monotonic()
    run(["make", "install", f"DESTDIR={destdir}"], cwd=builddir, umask=0o077)
    took = time.monotonic() - start
    yield Build(source_copy, builddir, destdir, configured.stdout, made.stdout, took)
