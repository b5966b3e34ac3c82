"""The OS definition under test: a scratch ``make install``, or the source tree.

The installed entry point is what Ganeti runs (``#!/usr/bin/python3 -I``,
byte-compiled modules), so that is the default: the work tree's source
files are copied (an in-tree configure would stop an out-of-tree build),
configured with every directory inside the scratch directory, built and
installed. ``--source-tree`` runs the scripts through tests/launch.py
instead, as the root tests do.

The cache directory (localstatedir/cache/ganeti-instance-debootstrap) is a
symbolic link that the scenarios point at the warm cache or at an empty
directory: configure fixes localstatedir, and one installation serves both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from .procs import GANETI_PATH, BenchError

PYTHON = "/usr/bin/python3"
PACKAGE = "ganeti-instance-debootstrap"
SCRIPTS = ("create", "import", "export", "rename", "verify")
ADMIN_COMMAND = "ganeti-debootstrap-cache"

# Build products of an in-tree build: copied, they would stop the scratch
# out-of-tree configure ("source directory already configured").
_SKIP_DIRS = {".git", "__pycache__", "autom4te.cache", "build-aux", ".pytest_cache",
              ".mypy_cache"}
_SKIP_TOP = {"Makefile", "config.status", "config.log", "common.py", *SCRIPTS}


@dataclass(frozen=True)
class Installation:
    """Where the OS definition and its configuration are, and how to run a script."""

    sysconfdir: str
    localstatedir: str
    os_dir: str
    launcher: str = ""  # tests/launch.py when running from the source tree
    sbindir: str = ""  # where make install put the administrator's command

    @property
    def config_dir(self) -> str:
        return os.path.join(self.sysconfdir, "ganeti", "instance-debootstrap")

    @property
    def defaults_file(self) -> str:
        return os.path.join(self.sysconfdir, "default", PACKAGE)

    @property
    def hooks_dir(self) -> str:
        return os.path.join(self.config_dir, "hooks")

    @property
    def cache_link(self) -> str:
        return os.path.join(self.localstatedir, "cache", PACKAGE)

    def argv(self, script: str, *args: str) -> list[str]:
        """The command Ganeti would run (cwd: the OS directory)."""
        if self.launcher:
            return [PYTHON, self.launcher, self.sysconfdir, self.localstatedir,
                    self.os_dir, script, *args]
        return [os.path.join(self.os_dir, script), *args]

    def admin_argv(self, *args: str) -> list[str]:
        """The administrator's command (ganeti-debootstrap-cache) with ``args``."""
        if self.launcher:
            return [PYTHON, self.launcher, self.sysconfdir, self.localstatedir,
                    self.os_dir, ADMIN_COMMAND, *args]
        return [os.path.join(self.sbindir, ADMIN_COMMAND), *args]

    def add_variant(self, name: str, text: str) -> None:
        """A variant file, listed in variants.list (the one the OS dir reads)."""
        with open(os.path.join(self.config_dir, "variants", name + ".conf"), "w") as f:
            f.write(text)
        with open(os.path.join(self.os_dir, "variants.list"), "a") as f:
            f.write(name + "\n")

    def use_cache(self, directory: str) -> None:
        """Point the cache directory at ``directory`` (replacing the link atomically)."""
        os.makedirs(os.path.dirname(self.cache_link), exist_ok=True)
        tmp = self.cache_link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(directory, tmp)
        os.replace(tmp, self.cache_link)


def source_files(root: str) -> list[str]:
    """The work tree's files (tracked, or new and not ignored), relative to root."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = b""
    names = [n for n in out.decode().split("\0") if n]
    if names:
        return sorted(n for n in names if os.path.lexists(os.path.join(root, n)))
    # Not a git checkout (an unpacked release): everything but build products.
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        top = os.path.samefile(dirpath, root)
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                  if not f.endswith(".pyc") and not (top and f in _SKIP_TOP)]
    return sorted(found)


def source_state(root: str) -> str:
    """The commit the work tree is at, and how many files differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True,
                                  text=True).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"{root} (not a git checkout)"
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no")
               .splitlines() if line.strip()]
    return (f"{root} at commit {commit}" +
            (f", with uncommitted changes in {len(changed)} tracked file(s)"
             if changed else ""))


def _copy_tree(root: str, dest: str) -> None:
    for name in source_files(root):
        src, target = os.path.join(root, name), os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)


def _build_step(argv: list[str], cwd: str, log_path: str) -> None:
    env: Mapping[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                              "LC_ALL": "C"}
    with open(log_path, "ab") as log:
        res = subprocess.run(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log)
    if res.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-15:]
        raise BenchError(f"{' '.join(argv)} failed (exit status {res.returncode}) "
                         f"building the OS definition; the end of {log_path}:\n"
                         + "\n".join("  | " + line for line in tail)
                         + "\nThe build needs autoconf, automake and make "
                           "(devel/install-deps), or use --source-tree.")


def install(source_root: str, base: str, log_path: str) -> Installation:
    """Copy, configure, build and install into ``base``; return the installation."""
    src, build, prefix = (os.path.join(base, d) for d in ("src", "build", "inst"))
    for d in (src, build):
        os.makedirs(d)
    _copy_tree(source_root, src)
    _build_step(["./autogen.sh"], src, log_path)
    sysconfdir = os.path.join(prefix, "etc")
    localstatedir = os.path.join(prefix, "var")
    _build_step([os.path.join(src, "configure"), "--prefix=" + os.path.join(prefix, "usr"),
                 "--sysconfdir=" + sysconfdir, "--localstatedir=" + localstatedir,
                 "--with-python=" + PYTHON], build, log_path)
    _build_step(["make"], build, log_path)
    _build_step(["make", "install"], build, log_path)
    os_dir = os.path.join(prefix, "usr", "share", "ganeti", "os", "debootstrap")
    for script in SCRIPTS:
        if not os.access(os.path.join(os_dir, script), os.X_OK):
            raise BenchError(f"make install left no executable {script} in {os_dir}")
    sbindir = os.path.join(prefix, "usr", "sbin")
    if not os.access(os.path.join(sbindir, ADMIN_COMMAND), os.X_OK):
        raise BenchError(f"make install left no executable {ADMIN_COMMAND} in {sbindir}")
    return Installation(sysconfdir, localstatedir, os_dir, sbindir=sbindir)


def source_tree(source_root: str, base: str) -> Installation:
    """A scratch configuration tree for running the source tree's scripts."""
    sysconfdir = os.path.join(base, "etc")
    inst = Installation(sysconfdir, os.path.join(base, "var"), os.path.join(base, "os"),
                        launcher=os.path.join(source_root, "tests", "launch.py"))
    for d in (os.path.dirname(inst.defaults_file), inst.hooks_dir,
              os.path.join(inst.config_dir, "variants"), inst.os_dir):
        os.makedirs(d, mode=0o755, exist_ok=True)
    shutil.copy(os.path.join(source_root, "defaults"), inst.defaults_file)
    shutil.copy(os.path.join(source_root, "variants", "default.conf"),
                os.path.join(inst.config_dir, "variants"))
    for name in ("variants.list", "parameters.list", "ganeti_api_version"):
        shutil.copy(os.path.join(source_root, name), inst.os_dir)
    return inst


def configure_settings(inst: Installation) -> None:
    """The settings the benchmark runs with: the shipped ones, and no expiry.

    CLEAN_CACHE is emptied because the cache may be links to an
    administrator's archive of any age, which expiry would remove.
    """
    with open(inst.defaults_file, "a") as f:
        f.write('\n# bench/run: never expire the (possibly linked) cache.\nCLEAN_CACHE=""\n')


def ganeti_env(**variables: str) -> dict[str, str]:
    """The clean environment Ganeti gives an OS script (API 20) plus ``variables``."""
    env = {"PATH": GANETI_PATH, "OS_API_VERSION": "20", "OS_NAME": "debootstrap",
           "OS_VARIANT": "default", "DEBUG_LEVEL": "0", "HYPERVISOR": "kvm",
           "NIC_COUNT": "0", "INSTANCE_OS": "debootstrap+default",
           "INSTANCE_PRIMARY_NODE": "node1.example.org"}
    env.update(variables)
    return env


def create_env(name: str, disk: str, size_mib: int, variant: str = "default",
               **variables: str) -> dict[str, str]:
    """What Ganeti gives create (and import, rename) for a one-disk instance."""
    return ganeti_env(INSTANCE_NAME=name, DISK_COUNT="1", DISK_0_PATH=disk,
                      DISK_0_ACCESS="rw", DISK_0_SIZE=str(size_mib),
                      DISK_0_BACKEND_TYPE="file:loop", OSP_FILESYSTEM="ext4",
                      OS_VARIANT=variant, INSTANCE_OS=f"debootstrap+{variant}",
                      **variables)


def verify_env() -> dict[str, str]:
    """verify sees only OS_*, OSP_*, DEBUG_LEVEL and PATH."""
    return {"PATH": GANETI_PATH, "OS_API_VERSION": "20", "OS_NAME": "debootstrap",
            "OS_VARIANT": "default", "DEBUG_LEVEL": "0", "OSP_FILESYSTEM": "ext4"}
