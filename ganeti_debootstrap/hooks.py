"""The site's customisation hooks: which run, whether that is safe, and with what.

The shell edition ran ``run-parts $CUSTOMIZE_DIR`` once the instance was
configured. The same files run here, in the same order and with the same
variables, one at a time; the first failure stops the install (run-parts
went on with the next hook and failed at the end).

Hooks run as root on the node with the instance's root filesystem mounted:
a hook directory that someone else can change is a way to run code as root
on every node, so it is refused (:func:`check_safe`, with trust.py's
check), as sudo refuses a world-writable sudoers file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Collection, Iterator

from . import fsutil, procs, runner, trust
from .environment import Request
from .errors import CommandError, HookError, MissingProgramError
from .settings import Settings
from .target import Target, UnsafeFileError

log = logging.getLogger(__name__)

# run-parts(8) without --lsbsysinit or --regex: ASCII letters, digits,
# underscores and hyphens only, so "x.sh", "x~" and "x.dpkg-old" never run.
HOOK_NAME = re.compile(r"[A-Za-z0-9_-]+")

# What hooks get, whatever the node's PATH: Ganeti's own order differs, and
# site hooks are written against the usual system directories.
HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# run-parts sets this umask before running each script; Ganeti runs us with
# 077, under which files a hook writes into the instance would be private.
HOOK_UMASK = fsutil.PACKAGE_UMASK

def _scan(directory: str) -> tuple[list[str], list[str]]:
    """The hooks of ``directory`` and the entries run-parts would complain about."""
    if not directory:
        return [], []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return [], []
    except NotADirectoryError:
        raise HookError(
            f"CUSTOMIZE_DIR={directory} is not a directory. Point CUSTOMIZE_DIR "
            f"at the directory holding the hooks (or leave it unset).") from None
    found, odd = [], []
    # The names are ASCII once filtered: code point order is byte order.
    for name in sorted(n for n in names if HOOK_NAME.fullmatch(n)):
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError as exc:
            odd.append(f"{path}: {exc.strerror}")
            continue
        if stat.S_ISREG(st.st_mode):
            if os.access(path, os.X_OK):
                found.append(path)
        elif not stat.S_ISDIR(st.st_mode):
            odd.append(f"{path}: not an executable plain file")
    return found, odd


def list_hooks(directory: str) -> list[str]:
    """The hooks run-parts would run from ``directory``, in its order.

    Executable regular files (a symlink counts as what it points to) whose
    names follow run-parts' rules, sorted in C locale byte order. A missing
    directory has no hooks.
    """
    return _scan(directory)[0]


def _purpose(directory: str) -> trust.Purpose:
    return trust.Purpose(
        action=f"run the customisation hooks in {directory}",
        reason="Hooks run as root on the node", consequence="run commands as root",
        error=HookError,
        alternative=" (or set CUSTOMIZE_DIR to a directory that only root can change)")


def check_safe(directory: str, *, trusted_uids: Collection[int] | None = None) -> None:
    """Refuse (HookError) hooks that anyone but root could have changed.

    The hook directory, each hook, and every directory and symlink on the
    way from / must belong to root (or ``trusted_uids``; by default root and
    the user running the script, see trust.default_uids) and not be
    writable by group or others. A sticky directory on the way (/tmp) is
    accepted: others cannot replace what root owns in it. A missing
    directory has no hooks and passes.
    """
    if not directory or not os.path.lexists(directory):
        return
    purpose = _purpose(directory)
    trust.check_path(directory, purpose, trusted_uids=trusted_uids)
    for hook in list_hooks(directory):
        trust.check_path(hook, purpose, trusted_uids=trusted_uids)


def environment(request: Request, settings: Settings, arch: str, target_dir: str,
                *, blockdev: str, fsysdev: str) -> dict[str, str]:
    """The variables hooks see: Ganeti's, plus the shell edition's and ours.

    The shell edition exported TARGET, SUITE, ARCH, PARTITION_STYLE,
    EXTRA_PKGS, BLOCKDEV and FSYSDEV; MIRROR, COMPONENTS and PROXY are
    added so hooks installing packages can use the same archive. ``arch``
    is the resolved architecture, never empty.
    """
    env = dict(request.ganeti_env)
    # API 5 passes the name as an option: give hooks the API 10 variable.
    env.setdefault("INSTANCE_NAME", request.instance_name)
    env.update({
        "TARGET": target_dir,
        "SUITE": settings.suite,
        "ARCH": arch,
        "PARTITION_STYLE": settings.partition_style,
        "EXTRA_PKGS": ",".join(settings.extra_pkgs),
        "COMPONENTS": ",".join(settings.components),
        "MIRROR": settings.mirror,
        "PROXY": settings.proxy,
        "BLOCKDEV": blockdev,
        "FSYSDEV": fsysdev,
        "PATH": HOOK_PATH,
        "LC_ALL": "C",
    })
    return env


def _failed(hook: str, what: str, tail: str = "") -> HookError:
    lines = [f"The customisation hook {hook} {what}; the hooks after it did "
             f"not run."]
    if tail.strip():
        lines.append("Its last output was:")
        lines.extend("  " + line for line in tail.rstrip().splitlines())
    # Named again in the last line: Ganeti shows the log's last lines.
    lines.append(f"Fix the hook {hook} (or remove its execute permission to skip "
                 f"it) and reinstall the instance.")
    return HookError("\n".join(lines))


def run_hook(hook: str, env: dict[str, str], *, timeout: float | None = None) -> None:
    """Run one hook with ``env``, stdin /dev/null, output to our stderr."""
    try:
        with fsutil.umask(HOOK_UMASK):
            runner.run([hook], env=env, timeout=timeout)
    except CommandError as exc:
        raise _failed(hook, exc.status, exc.stderr_tail) from None
    except subprocess.TimeoutExpired:
        raise _failed(hook, f"did not finish within {timeout:g} s and was "
                            f"killed") from None
    except MissingProgramError:
        # The file was there when listed: its #! interpreter is missing.
        raise _failed(hook, "could not be started: the interpreter on its "
                            "#! line is not installed on the node") from None
    except OSError as exc:
        # e.g. "Exec format error": a script without a #! line (run-parts
        # cannot run those either).
        raise _failed(hook, f"could not be started: {exc.strerror}") from None


def run_all(directory: str, env: dict[str, str], *, timeout: float | None = None,
            trusted_uids: Collection[int] | None = None) -> list[str]:
    """Check, then run every hook of ``directory`` in order; return those run.

    A failing hook raises HookError naming it, with its status and the tail
    of its error output; the hooks after it do not run. ``timeout`` limits
    each hook, in seconds.
    """
    check_safe(directory, trusted_uids=trusted_uids)
    hooks, odd = _scan(directory)
    for entry in odd:
        log.warning("Ignoring hook %s", entry)
    for hook in hooks:
        log.info("hook %s: running", os.path.basename(hook))
        with leftovers_stopped(hook, env.get("TARGET", "")):
            run_hook(hook, env, timeout=timeout)
    return hooks


# --- processes a hook leaves running -------------------------------------------

# How long leftover processes get to exit after SIGTERM (then SIGKILL).
LEFTOVER_GRACE_SECONDS = 3.0

_sleep = time.sleep  # replaced by unit tests


def leftover_processes(target_dir: str) -> list[tuple[int, str]]:
    """Processes (pid, name) still running from the hooks of ``target_dir``.

    Those using a file inside the instance (cwd, root, open or mapped file:
    they keep its filesystem busy) and those a hook started, found by the
    TARGET variable they inherited, even after setsid or a chroot.
    """
    found = dict(procs.processes_using(target_dir))
    found.update(procs.processes_with_variable("TARGET", target_dir))
    found.pop(os.getpid(), None)
    return sorted(found.items())


def stop_processes(pids: Collection[int]) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those still running after a grace period.

    Returns the pids that survived even SIGKILL (stuck in the kernel).
    """
    alive = list(pids)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
        while True:
            alive = [pid for pid in alive if procs.running(pid)]
            if not alive or time.monotonic() >= deadline:
                break
            _sleep(0.05)
        if not alive:
            break
    return alive


@contextlib.contextmanager
def leftovers_stopped(hook: str, target_dir: str) -> Iterator[None]:
    """Stop what ``hook`` left running in the instance when the block ends.

    A process left behind keeps the instance's filesystem busy, so it is
    stopped whatever happened. After a hook that succeeded, leaving one is
    an error (HookError naming them): what it was doing is unfinished.
    Without a target directory there is nothing to look at.
    """
    if not target_dir:
        yield
        return
    try:
        yield
    except BaseException:
        try:
            left = leftover_processes(target_dir)
            if left:
                log.warning("Stopping what the hook %s left running: %s", hook,
                            procs.describe(left))
                stop_processes([pid for pid, _ in left])
        except Exception:
            log.exception("Could not stop what the hook %s left running", hook)
        raise
    left = leftover_processes(target_dir)
    if not left:
        return
    stuck = stop_processes([pid for pid, _ in left])
    fate = (f"; {', '.join(str(p) for p in stuck)} could not be killed"
            if stuck else "")
    raise HookError(
        f"The customisation hook {hook} left processes running: "
        f"{procs.describe(left)}. They were stopped so that the "
        f"instance's filesystem can be unmounted{fate}, and what they were "
        f"doing is unfinished, so the install failed. Fix the hook: wait for "
        f"what it starts in the background, and start no daemon (while hooks "
        f"run, the instance's policy-rc.d refuses service starts); then "
        f"reinstall the instance.")


# --- no daemons started from the instance while hooks run ---------------------

POLICY_RC_D = "/usr/sbin/policy-rc.d"
# invoke-rc.d and deb-systemd-invoke (what maintainer scripts call) ask
# policy-rc.d first; 101 means "action forbidden", so apt in a hook does not
# start the instance's daemons in the node's namespaces.
DENY_ALL = ("#!/bin/sh\n"
            "# Written by ganeti-instance-debootstrap while the customisation\n"
            "# hooks run, and removed afterwards: no daemon may start.\n"
            "exit 101\n")
_SAVED_SUFFIX = ".ganeti-saved"


def _is_ours(t: Target) -> bool:
    if os.path.islink(t.path_nofollow(POLICY_RC_D)):
        return False
    try:
        # A hook may have left anything there: read no more than ours holds.
        return t.read_text(POLICY_RC_D, limit=len(DENY_ALL)) == DENY_ALL
    except (FileNotFoundError, UnsafeFileError):
        return False


def _restore_policy(t: Target, saved: bool) -> None:
    """Remove our policy-rc.d and put back the one that was there, if any."""
    # Paths are resolved again: a hook may have changed the tree.
    dest = t.path_nofollow(POLICY_RC_D)
    aside = t.path_nofollow(POLICY_RC_D + _SAVED_SUFFIX)
    if _is_ours(t):
        os.unlink(dest)
    elif os.path.lexists(dest):
        log.warning("A hook replaced %s in the instance; keeping its version.",
                    POLICY_RC_D)
        if saved:
            os.unlink(aside)
        return
    if saved:
        os.replace(aside, dest)


@contextlib.contextmanager
def daemons_prevented(t: Target) -> Iterator[None]:
    """Forbid daemon starts in the instance inside the block (policy-rc.d).

    A policy-rc.d the tree already has is set aside and put back; ours is
    removed. Released in ``finally``; a failed release is logged, never
    hiding the error that ended the block.
    """
    saved = written = False
    try:
        dest = t.path_nofollow(POLICY_RC_D)
        if os.path.lexists(dest) and not _is_ours(t):
            # Renaming keeps everything: a symlink, owner, mode.
            os.replace(dest, t.path_nofollow(POLICY_RC_D + _SAVED_SUFFIX))
            saved = True
        t.write_text(POLICY_RC_D, DENY_ALL, mode=0o755)
        written = True
        yield
    except BaseException:
        if saved or written:
            try:
                _restore_policy(t, saved)
            except Exception:
                log.exception("Could not restore %s in the instance", POLICY_RC_D)
        raise
    _restore_policy(t, saved)
