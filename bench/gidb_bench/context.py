"""What every scenario shares: the scratch directory, the installation, the
warm cache, and running our scripts and the references the same way."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO

from . import devices, install, procs
from .options import Options
from .stats import Failure, Verdict

GIB = 2**30
MIB = 2**20

_USING = re.compile(r"^(?:Using|Stored) the cache (?P<path>\S+\.tar)\b", re.MULTILINE)


def archive_from_log(log_text: str) -> str | None:
    """The cache archive a create used or stored, from its log."""
    found = _USING.findall(log_text)
    return found[-1] if found else None


def bootstrapped(log_text: str) -> bool:
    """Whether a create's log shows that it bootstrapped (a cache miss)."""
    return re.search(r"^Bootstrapping \S+ with \S+", log_text, re.MULTILINE) is not None


@dataclass
class Bench:
    """One invocation's shared state."""

    options: Options
    source_root: str
    workdir: str
    inst: install.Installation
    warm_cache: str  # the directory the cache link points at between scenarios
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    # Medians later scenarios compare with: "warm ours", "cold ours".
    medians: dict[str, float] = field(default_factory=dict)
    verdicts: list[Verdict | Failure] = field(default_factory=list)
    archive: str = ""  # the warm cache's archive (what the reference unpacks)
    _logs: int = 0

    @property
    def reference_script(self) -> str:
        return os.path.join(self.source_root, "bench", "reference-create")

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def log_path(self, name: str) -> str:
        self._logs += 1
        os.makedirs(self.path("logs"), exist_ok=True)
        return self.path("logs", f"{self._logs:03d}-{name}.log")

    def fresh_disk(self, name: str, size_bytes: int) -> str:
        """A new sparse disk file in the scratch directory (replacing an old one)."""
        path = self.path("disks", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.truncate(size_bytes)
        return path

    def fresh_cache(self, name: str) -> str:
        """A new empty cache directory, and the cache link pointing at it."""
        path = self.path("caches", name)
        self.remove_tree(path)
        os.makedirs(path)
        self.inst.use_cache(path)
        return path

    def restore_warm_cache(self) -> None:
        self.inst.use_cache(self.warm_cache)

    def remove_tree(self, path: str) -> None:
        """Remove a tree of ours, after releasing any mount left inside it."""
        if not os.path.lexists(path):
            return
        devices.release([path])
        points, _ = devices.leftovers([path])
        if points:
            raise procs.BenchError(f"cannot remove {path}: {', '.join(points)} "
                                   f"is still mounted there")
        shutil.rmtree(path)

    def discard(self, path: str) -> None:
        """remove_tree() for ``finally``: a failure is reported, never raised.

        An error on the way out must not replace the one that got there; the
        scratch directory is removed as a whole at the end anyway.
        """
        try:
            self.remove_tree(path)
        except (OSError, procs.BenchError) as err:
            self.say(f"  (could not remove {path} now: {err})")

    @staticmethod
    def quiesce() -> None:
        """Write back what earlier runs left dirty, so each run starts alike."""
        os.sync()

    # -- running ----------------------------------------------------------

    def start_ours(self, script: str, env: Mapping[str, str], log_name: str,
                   args: tuple[str, ...] = (), **kwargs: object) -> procs.Running:
        """Start one of our scripts as Ganeti does: cwd the OS dir, umask 077."""
        return procs.start(self.inst.argv(script, *args), env=env,
                           log_path=self.log_path(log_name), cwd=self.inst.os_dir,
                           umask=0o077, **kwargs)  # type: ignore[arg-type]

    def ours(self, script: str, env: Mapping[str, str], log_name: str,
             args: tuple[str, ...] = (), check: bool = True,
             **kwargs: object) -> procs.Result:
        result = procs.wait(self.start_ours(script, env, log_name, args, **kwargs))
        if check:
            procs.check_result(result)
        return result

    def ours_create(self, disk: str, name: str, log_name: str,
                    variant: str = "default") -> procs.Result:
        env = install.create_env(name, disk, os.path.getsize(disk) // MIB, variant)
        return self.ours("create", env, log_name)

    def reference_create(self, disk: str, name: str, log_name: str) -> procs.Result:
        """The shell edition's way of a warm create (bench/reference-create)."""
        env = install.create_env(name, disk, os.path.getsize(disk) // MIB)
        return procs.run(["/bin/bash", self.reference_script, disk, self.archive, name,
                          self.inst.hooks_dir],
                         env=env, log_path=self.log_path(log_name), umask=0o077)
