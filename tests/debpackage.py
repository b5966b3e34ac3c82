"""Building the Debian package from the work tree, for tests/build and tests/root.

The source is copied as a clean clone would have it (git's tracked files,
plus untracked ones .gitignore does not cover) and built the way README
documents: ``dpkg-buildpackage -us -uc -b``. One build per test session
serves the lintian test and the root tests that install the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "ganeti-instance-debootstrap"


@dataclass(frozen=True)
class BuiltPackage:
    """The result of one dpkg-buildpackage run."""

    deb: Path
    changes: Path
    log: str
    seconds: float


class PackageBuildError(Exception):
    pass


def source_files(root: Path) -> list[str]:
    """The work tree's files (tracked, and untracked but not ignored)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached",
                          "--others", "--exclude-standard"],
                         capture_output=True, check=True, timeout=60).stdout
    return sorted(n for n in out.decode().split("\0")
                  if n and os.path.lexists(root / n))


def copy_clean_tree(root: Path, dest: Path) -> None:
    """``root``'s source files into ``dest``, as a fresh clone has them."""
    for name in source_files(root):
        src, target = root / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)


def build_environment() -> dict[str, str]:
    """Ours without what would leak into the build (make, Python, coverage)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DESTDIR", "PYTHON",
                        "CONFIG_SITE", "PYTHONPATH", "DEB_BUILD_OPTIONS",
                        # the root tests point it at a directory only root may enter
                        "TMPDIR")
           and not k.startswith("COVERAGE_")}
    env["LC_ALL"] = "C.UTF-8"
    return env


def build_binary_package(root: Path, workdir: Path, timeout: float = 900) -> BuiltPackage:
    """Copy ``root`` under ``workdir`` and build the .deb there; the .deb lands in ``workdir``."""
    src = workdir / PACKAGE
    copy_clean_tree(root, src)
    start = time.monotonic()
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src,
                          env=build_environment(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        raise PackageBuildError(f"dpkg-buildpackage -us -uc -b in {src} failed "
                                f"with exit status {proc.returncode}:\n{tail}")
    debs = sorted(workdir.glob(f"{PACKAGE}_*_all.deb"))
    changes = sorted(workdir.glob(f"{PACKAGE}_*.changes"))
    if len(debs) != 1 or len(changes) != 1:
        raise PackageBuildError(f"expected one .deb and one .changes in {workdir}, "
                                f"found {sorted(p.name for p in workdir.iterdir())}")
    return BuiltPackage(debs[0], changes[0], proc.stdout, seconds)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), field], capture_output=True,
                          text=True, check=True).stdout.strip()
