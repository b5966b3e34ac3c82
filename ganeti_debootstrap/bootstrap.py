"""Running debootstrap or mmdebstrap, and making the tree fit for reuse.

Both tools install the same package set: debootstrap's default on Debian is
Priority required + important (plus their dependencies), which is what
mmdebstrap's ``important`` variant installs (its manual: "This is the default
of debootstrap"; measured here: the same 144 packages for trixie). The trees
still differ in small ways (mmdebstrap's default sources.list adds the
-updates and -security suites when MIRROR is empty, debootstrap keeps its
downloaded packages), which is why the tool is part of the cache key.
"""

from __future__ import annotations

import logging
import os
import shutil
from . import runner
from .errors import CommandError, ConfigError, MissingProgramError
from .settings import BOOTSTRAP_TOOLS, BootstrapTool, Settings
from .target import Target

log = logging.getLogger(__name__)

# The programs BOOTSTRAP_TOOL names (all but "auto").
TOOLS = tuple(t for t in BOOTSTRAP_TOOLS if t != "auto")

# debootstrap knows a suite only if it ships a script for it.
DEBOOTSTRAP_SCRIPTS = "/usr/share/debootstrap/scripts"

# mmdebstrap's variant installing what debootstrap installs by default.
MMDEBSTRAP_VARIANT = "important"

# apt options for mmdebstrap's own apt runs. Without a source package cache
# (srcpkgcache.bin, a second index of every package list built beside
# pkgcache.bin), apt's peak memory during a trixie bootstrap drops from 108
# to 75 MiB, measured here, at no cost in time: the largest process of a
# cold create then stays under 100 MiB. mmdebstrap also writes --aptopt
# options into the tree's apt.conf.d/99mmdebstrap; the customize hook
# removes that file once apt is done, so instances keep Debian's defaults.
MMDEBSTRAP_APT_OPTIONS = ('Dir::Cache::srcpkgcache ""',)
MMDEBSTRAP_CLEANUP_HOOK = 'rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"'

# Lines of debootstrap's own log kept in the error: its stderr usually only
# says "see debootstrap.log", and that log goes away with the staging tree.
DEBOOTSTRAP_LOG_LINES = 6


def choose_tool(setting: BootstrapTool) -> str:
    """The tool to run for BOOTSTRAP_TOOL ``setting`` (auto, or a tool name).

    ``auto`` prefers mmdebstrap (it bootstraps in a third of debootstrap's
    time here) and falls back to debootstrap; a named tool must be installed.
    """
    if setting == "auto":
        return "mmdebstrap" if shutil.which("mmdebstrap") else "debootstrap"
    if not shutil.which(setting):
        raise MissingProgramError(setting, runner.PACKAGES.get(setting, setting))
    return setting


def resolved_arch(settings: Settings) -> str:
    """ARCH, or the node's own dpkg architecture when ARCH is empty.

    The one place the architecture is decided (create and import: plan.py):
    the node's is what the tools install by default.
    """
    return settings.arch or runner.output(["dpkg", "--print-architecture"])


def packages(settings: Settings) -> tuple[str, ...]:
    """EXTRA_PKGS sorted and without duplicates: their order changes nothing."""
    return tuple(sorted(set(settings.extra_pkgs)))


def command(settings: Settings, tool: str, dest: str) -> list[str]:
    """The argv that bootstraps ``settings`` into the directory ``dest``."""
    extra = packages(settings)
    if tool == "debootstrap":
        argv = ["debootstrap"]
        if settings.arch:
            argv.append(f"--arch={settings.arch}")
    elif tool == "mmdebstrap":
        # root mode: we are root, and it needs no subuid ranges; directory
        # format explicitly, as mmdebstrap guesses it from the target name.
        argv = ["mmdebstrap", "--mode=root", "--format=directory",
                f"--variant={MMDEBSTRAP_VARIANT}"]
        argv += [f"--aptopt={option}" for option in MMDEBSTRAP_APT_OPTIONS]
        argv.append(f"--customize-hook={MMDEBSTRAP_CLEANUP_HOOK}")
        if settings.arch:
            argv.append(f"--architectures={settings.arch}")
    else:
        raise ValueError(f"unknown bootstrap tool {tool!r}")
    if extra:
        argv.append("--include=" + ",".join(extra))
    if settings.components:
        argv.append("--components=" + ",".join(settings.components))
    argv += [settings.suite, dest]
    if settings.mirror:
        argv.append(settings.mirror)
    return argv


def proxy_environment(settings: Settings) -> dict[str, str]:
    """PROXY as the variables wget (debootstrap) and apt (mmdebstrap) read.

    Passed in the environment only: neither tool writes it into the tree
    (mmdebstrap's apt configuration in the target comes from --aptopt alone,
    whose file we remove, and its temporary one is removed at the end).
    """
    if not settings.proxy:
        return {}
    return {"http_proxy": settings.proxy, "https_proxy": settings.proxy}


def check_suite_known(suite: str, tool: str) -> None:
    """Refuse a suite debootstrap has no script for, before downloading.

    mmdebstrap needs no script: apt itself rejects a suite the mirror lacks.
    """
    if tool != "debootstrap":
        return
    scripts_dir = DEBOOTSTRAP_SCRIPTS
    if os.path.exists(os.path.join(scripts_dir, suite)):
        return
    raise ConfigError(
        f"debootstrap on this node does not know the suite {suite!r} (there "
        f"is no {os.path.join(scripts_dir, suite)}). Upgrade debootstrap on "
        f"every node (a backport knows newer releases), set SUITE to a "
        f"release it knows, or install mmdebstrap and set BOOTSTRAP_TOOL="
        f"mmdebstrap.")


def failure_hint(settings: Settings, tool: str) -> str:
    """What to check when the bootstrap fails: network, mirror, suite."""
    mirror = settings.mirror or f"{tool}'s default mirror"
    via = f" through the proxy {settings.proxy}" if settings.proxy else ""
    extra = (f", and that EXTRA_PKGS ({','.join(settings.extra_pkgs)}) are "
             f"packages of that suite" if settings.extra_pkgs else "")
    return (f"Bootstrapping {settings.suite} with {tool} failed: check that "
            f"this node reaches {mirror}{via} (MIRROR, PROXY), that the suite "
            f"{settings.suite!r} exists there for the architecture "
            f"{settings.arch or 'of the node'} (SUITE, ARCH){extra}.")


def run(settings: Settings, tool: str, dest: str) -> None:
    """Bootstrap the system ``settings`` describe into the empty ``dest``.

    Raises ConfigError for a suite debootstrap does not know, and
    CommandError (with the tool's last output and a hint) when it fails.
    """
    check_suite_known(settings.suite, tool)
    argv = command(settings, tool, dest)
    hint = failure_hint(settings, tool)
    log.info("Bootstrapping %s with %s (this takes a minute or two)",
             settings.suite, tool)
    try:
        runner.run(argv, env=proxy_environment(settings), hint=hint)
    except CommandError as err:
        detail = _debootstrap_log_tail(dest) if tool == "debootstrap" else ""
        if not detail:
            raise
        tail = err.stderr_tail.rstrip() + f"\nEnd of {tool}'s log:\n" + detail
        raise CommandError(err.argv, err.returncode, tail, err.hint) from err


def _debootstrap_log_tail(dest: str) -> str:
    """The last lines of debootstrap's own log in ``dest``, or ''."""
    try:
        with open(os.path.join(dest, "debootstrap", "debootstrap.log"),
                  encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-DEBOOTSTRAP_LOG_LINES:])


# Files that make every instance made from one tree share an identity, or
# that carry the node's identity into the tree (both tools copy the node's
# /etc/hostname and /etc/resolv.conf in for their own use); create writes
# the instance's own. SSH host keys exist when EXTRA_PKGS has openssh-server:
# create must generate new ones for each instance.
IDENTITY_FILES = ("/etc/hostname", "/etc/resolv.conf",
                  "/etc/udev/rules.d/70-persistent-net.rules",
                  "/var/lib/dbus/machine-id")
SSH_DIR = "/etc/ssh"
MACHINE_ID = "/etc/machine-id"

# Downloaded data: packages (debootstrap keeps them, the shell edition
# removed them) and package lists (stale within days; mmdebstrap removes them
# too, so both tools' trees match). Directories and apt's lock stay.
DOWNLOAD_DIRS = ("/var/cache/apt/archives", "/var/cache/apt/archives/partial",
                 "/var/lib/apt/lists", "/var/lib/apt/lists/partial")
DOWNLOAD_KEEP = ("lock",)


def clean_tree(root: str) -> list[str]:
    """Make a bootstrapped tree instance-neutral; returns what changed.

    Removes downloaded packages and package lists, node and instance
    identity files and SSH host keys, and empties /etc/machine-id (so that
    systemd makes a new one at the instance's first boot, per machine-id(5)).
    """
    target = Target(root)
    changed: list[str] = []
    for inner in DOWNLOAD_DIRS:
        directory = target.path(inner)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if name in DOWNLOAD_KEEP:
                continue
            if target.remove(f"{inner}/{name}"):
                changed.append(f"{inner}/{name}")
    for inner in IDENTITY_FILES:
        # dbus's machine-id may be a symlink to /etc/machine-id: only a copy
        # of the ID (a regular file) is removed.
        if inner == "/var/lib/dbus/machine-id" and os.path.islink(
                target.path_nofollow(inner)):
            continue
        if target.remove(inner):
            changed.append(inner)
    ssh_dir = target.path(SSH_DIR)
    if os.path.isdir(ssh_dir):
        for name in sorted(os.listdir(ssh_dir)):
            if name.startswith("ssh_host_") and target.remove(f"{SSH_DIR}/{name}"):
                changed.append(f"{SSH_DIR}/{name}")
    machine_id = target.path_nofollow(MACHINE_ID)
    if os.path.isfile(machine_id) and not os.path.islink(machine_id) \
            and os.path.getsize(machine_id) > 0:
        # Truncate in place: the file's mode (0444 from debootstrap) and
        # owner stay; an empty file, not a missing one, is what an image has.
        os.truncate(machine_id, 0)
        changed.append(MACHINE_ID)
    for inner in changed:
        log.debug("cleaned from the bootstrapped tree: %s", inner)
    return changed

