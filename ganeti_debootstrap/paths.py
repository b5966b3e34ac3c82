"""Every path the scripts use, derived in one place from what configure knows.

``common.py`` (generated from ``common.py.in``) holds only sysconfdir,
localstatedir and the OS directory; everything else is computed here, so
tests can build a :class:`Paths` for a scratch tree without configure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PACKAGE = "ganeti-instance-debootstrap"
OS_NAME = "debootstrap"


@dataclass(frozen=True)
class Paths:
    """Installation paths of the OS definition."""

    sysconfdir: str
    localstatedir: str
    os_dir: str  # the directory holding create, import, ... and variants.list

    @property
    def defaults_file(self) -> str:
        """The settings file (shell syntax), as the shell edition used."""
        return os.path.join(self.sysconfdir, "default", PACKAGE)

    @property
    def config_dir(self) -> str:
        return os.path.join(self.sysconfdir, "ganeti", "instance-debootstrap")

    @property
    def default_variants_dir(self) -> str:
        return os.path.join(self.config_dir, "variants")

    @property
    def default_hooks_dir(self) -> str:
        return os.path.join(self.config_dir, "hooks")

    @property
    def variants_list(self) -> str:
        return os.path.join(self.os_dir, "variants.list")

    @property
    def parameters_list(self) -> str:
        return os.path.join(self.os_dir, "parameters.list")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.localstatedir, "cache", PACKAGE)


def from_common(common: object, script_file: str) -> Paths:
    """Paths from the generated ``common`` module of an installed script.

    The OS directory is the script's own directory as Ganeti called it (a
    symlinked OS directory keeps its own variants.list).
    """
    return Paths(sysconfdir=str(getattr(common, "SYSCONFDIR")),
                 localstatedir=str(getattr(common, "LOCALSTATEDIR")),
                 os_dir=os.path.dirname(os.path.abspath(script_file)))


def from_installed(common: object) -> Paths:
    """Paths of the installed OS definition, for a command outside its directory.

    ganeti-debootstrap-cache lives in sbindir: the OS directory is the one
    configure recorded (``OS_DIR``), where its variants.list is.
    """
    return Paths(sysconfdir=str(getattr(common, "SYSCONFDIR")),
                 localstatedir=str(getattr(common, "LOCALSTATEDIR")),
                 os_dir=str(getattr(common, "OS_DIR")))
