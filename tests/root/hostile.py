"""A tenant's hostile filesystem, made from a real instance, and the checks that
running our scripts on it is safe (docs: the tenant's data rules).

What a tenant controls inside an instance is planted into a copy of a real
created instance, mounted by the test (never by the scripts under test):

- trap programs where a tool would be (``/bin/sh``, ``grub-install``,
  ``dpkg``, ...): each records, through ``/proc/<test's pid>/root``, that
  it ran (or, without /proc, in ``/.gidb-trap-ran`` of the instance);
- symbolic links out of the root, absolute and relative, at the files the
  scripts read or write and at the directories above them, pointing at
  canary files and directories this test made on the node;
- FIFOs, device nodes, sockets, directories and 4 GiB sparse files where a
  text file is expected.

A run of a script on such an instance must end within a bound, with exit 0
or a clear error naming the file in its last lines, run no planted program,
change nothing of the node outside its disk (the canaries, byte for byte),
and leave nothing attached (conftest's leak check).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ganeti_debootstrap.target import Target
from tests.root import scripts

# A run taking longer than this hangs (an import takes a few seconds).
RUN_TIMEOUT = 60.0
# After SIGTERM, the time a hung script gets to release what it holds.
STOP_GRACE = 15.0
# The scripts' address space: reading a device or a huge file whole fails
# fast instead of eating the node's memory (the test machine is shared).
ADDRESS_SPACE_LIMIT = 2**30
# Ganeti shows the administrator this many last lines of a failed script.
TAIL_LINES = 20
HUGE_FILE_BYTES = 4 * 2**30

OLD_NAME = "hostile.example.org"
NEW_NAME = "renamed.example.org"

# The text files the scripts read or write in an instance.
TEXT_FILES = (
    "/etc/hostname", "/etc/mailname", "/etc/hosts", "/etc/fstab", "/etc/machine-id",
    "/etc/os-release", "/var/lib/dbus/machine-id", "/var/lib/systemd/random-seed",
    "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ed25519_key.pub",
    "/etc/udev/rules.d/70-persistent-net.rules", "/boot/grub/grub.cfg",
    "/var/cache/debconf/config.dat",
    "/etc/default/grub.d/ganeti-instance-debootstrap.cfg",
)
# Those the scripts read (a 4 GiB sparse file at each of the others would
# only slow dump and restore down).
READ_FILES = ("/etc/hostname", "/etc/mailname", "/etc/hosts", "/etc/fstab",
              "/etc/machine-id", "/etc/os-release", "/boot/grub/grub.cfg",
              "/var/cache/debconf/config.dat")
# The directories above them a script may write into.
DIRECTORIES = ("/etc/ssh", "/etc/udev/rules.d", "/boot/grub", "/var/lib/dbus",
               "/var/cache/debconf", "/etc/default/grub.d", "/var/lib/systemd")
# Where a script might be tempted to run a program of the instance.
TRAP_PROGRAMS = (
    "/usr/sbin/grub-install", "/usr/sbin/grub-probe", "/usr/sbin/grub-mkconfig",
    "/usr/sbin/update-grub", "/usr/sbin/grub-bios-setup", "/usr/bin/debconf-set-selections",
    "/usr/bin/dpkg", "/usr/bin/systemctl", "/usr/bin/ssh-keygen",
    "/usr/sbin/update-initramfs", "/usr/bin/perl", "/usr/bin/python3", "/sbin/ldconfig",
    "/usr/bin/env", "/usr/sbin/chroot", "/usr/bin/mount", "/usr/bin/umount",
    "/usr/bin/tar", "/usr/sbin/restore", "/usr/sbin/dump", "/usr/bin/hostname",
    "/usr/sbin/invoke-rc.d", "/usr/sbin/policy-rc.d",
)
# The interpreters: a static recorder, so that a trap script run by the
# instance's kernel path (in a chroot) records too.
TRAP_INTERPRETERS = ("/bin/sh", "/usr/bin/sh", "/bin/bash", "/usr/bin/dash")

_RECORDER_C = r"""
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
static void put(int fd, const char *s) { if (fd >= 0) (void)!write(fd, s, strlen(s)); }
int main(int argc, char **argv) {
    int fd = open(MARKER, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0)
        fd = open("/.gidb-trap-ran", O_WRONLY | O_APPEND | O_CREAT, 0644);
    put(fd, "ran:");
    for (int i = 0; i < argc; i++) { put(fd, " "); put(fd, argv[i]); }
    put(fd, "\n");
    return 0;
}
"""


def through_proc(marker: str) -> str:
    """``marker`` as seen from any root, a chroot into the instance too (with
    its /proc mounted): through this test process's root. (Not through
    /proc/1/root: the init of a VM or container may deny it.)"""
    return f"/proc/{os.getpid()}/root{marker}"


def build_recorder(directory: str, marker: str) -> str:
    """A static program appending its argv to ``marker`` on the node; its path.

    Without /proc (a chroot that did not mount it) it records in
    ``/.gidb-trap-ran`` of the root it runs in: the instance's.
    """
    source = os.path.join(directory, "recorder.c")
    binary = os.path.join(directory, "recorder")
    with open(source, "w") as f:
        f.write(_RECORDER_C)
    subprocess.run(["gcc", "-static", "-Os", f'-DMARKER="{through_proc(marker)}"',
                    "-o", binary, source],
                   check=True, capture_output=True)
    return binary


def trap_script(marker: str) -> str:
    """A trap as a shell script: it works when run on the node by mistake."""
    return ("#!/bin/sh\n"
            f'echo "ran: $0 $*" >> {through_proc(marker)} 2>/dev/null || '
            'echo "ran: $0 $*" >> /.gidb-trap-ran\n'
            "exit 0\n")


# --- the node's canaries --------------------------------------------------------

@dataclass
class Canaries:
    """Files and directories on the node that symlinks in the instance point at."""

    top: str

    def __post_init__(self) -> None:
        os.makedirs(self.top, exist_ok=True)

    def file(self, inner: str) -> str:
        """The canary standing for the instance's file ``inner`` (made if missing)."""
        path = os.path.join(self.top, "files", inner.lstrip("/").replace("/", "__"))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                # What a careless rename would accept: the old name.
                f.write(f"{OLD_NAME}\n")
            os.chmod(path, 0o644)
        return path

    def directory(self, inner: str) -> str:
        """The canary standing for the instance's directory ``inner``, with its files."""
        path = os.path.join(self.top, "dirs", inner.lstrip("/").replace("/", "__"))
        if not os.path.exists(path):
            os.makedirs(path)
            for name in {os.path.basename(f) for f in TEXT_FILES
                         if os.path.dirname(f) == inner} | {"canary"}:
                with open(os.path.join(path, name), "w") as f:
                    f.write(f"{OLD_NAME}\ncanary of {inner}\n")
            os.chmod(path, 0o755)
        return path

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """Every entry below the canaries: type, mode, owner, size, content/target."""
        return snapshot(self.top)


# The node's own files of the kinds the scripts write in an instance: a
# script that lost track of which root it works in would change these.
NODE_PATHS = ("/etc/hostname", "/etc/mailname", "/etc/hosts", "/etc/fstab",
              "/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/default/grub.d",
              "/boot/grub", "/etc/udev/rules.d", "/etc/ssh", "/var/cache/debconf",
              "/.gidb-trap-ran")


def node_state() -> dict[str, tuple[object, ...]]:
    """NODE_PATHS as :func:`snapshot` sees them (what exists of them)."""
    found: dict[str, tuple[object, ...]] = {}
    for path in NODE_PATHS:
        if os.path.lexists(path):
            found.update({os.path.normpath(os.path.join(path, k)): v
                          for k, v in snapshot(path).items()})
    return found


def snapshot(top: str) -> dict[str, tuple[object, ...]]:
    """Every entry at or below ``top`` (not following symlinks)."""
    found: dict[str, tuple[object, ...]] = {}
    if not os.path.isdir(top) or os.path.islink(top):
        st = os.lstat(top)
        return {".": _entry(top, st)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames + [""]:
            path = os.path.join(dirpath, name) if name else dirpath
            found[os.path.relpath(path, top)] = _entry(path, os.lstat(path))
    return found


def _entry(path: str, st: os.stat_result) -> tuple[object, ...]:
    """Type, mode, owner, size, mtime and content (or link target) of ``path``."""
    if stat.S_ISLNK(st.st_mode):
        content: object = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content = f.read()
    else:
        content = None
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content)


def snapshot_changes(before: Mapping[str, tuple[object, ...]],
                     after: Mapping[str, tuple[object, ...]]) -> list[str]:
    changes = [f"new: {p}" for p in sorted(set(after) - set(before))]
    changes += [f"gone: {p}" for p in sorted(set(before) - set(after))]
    changes += [f"changed: {p}" for p in sorted(set(before) & set(after))
                if before[p] != after[p]]
    return changes


# --- planting --------------------------------------------------------------------

def _clear(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        if os.path.lexists(path):
            os.unlink(path)
    else:
        shutil.rmtree(path)


def place(root: str, inner: str) -> str:
    """The node path of ``inner`` inside the mounted instance, its parents made,
    anything there removed. Parents resolve inside the instance (Target), so
    that planting itself never writes outside."""
    path = Target(root).path_nofollow(inner)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _clear(path)
    return path


def plant_traps(root: str, recorder: str, marker: str) -> None:
    for inner in TRAP_INTERPRETERS:
        path = place(root, inner)
        shutil.copyfile(recorder, path)
        os.chmod(path, 0o755)
    for inner in TRAP_PROGRAMS:
        path = place(root, inner)
        with open(path, "w") as f:
            f.write(trap_script(marker))
        os.chmod(path, 0o755)


def plant_kernel(root: str) -> None:
    """Fake /vmlinuz and /initrd.img links (what a grub import looks for)."""
    for name in ("vmlinuz", "initrd.img"):
        real = place(root, f"/boot/{name}-6.1.0-hostile")
        with open(real, "wb") as f:
            f.write(b"\x7fnot a kernel\n")
        link = place(root, f"/{name}")
        os.symlink(f"boot/{name}-6.1.0-hostile", link)


def plant_setuid(root: str) -> str:
    """A setuid-root copy of the node's id(1) in the instance."""
    path = place(root, "/usr/local/bin/suid-id")
    shutil.copyfile("/usr/bin/id", path)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    return path


def up_to_root(link_path: str, root: str) -> str:
    """A relative ``../..`` prefix that reaches the node's / from ``link_path``."""
    depth = os.path.dirname(link_path).count("/") + 4
    return "/".join([".."] * depth)


def plant_symlink(root: str, inner: str, dest: str, how: str) -> None:
    """``inner`` as a symlink to the node's ``dest``: absolute, via
    /proc/self/root, or relative (``../../..``).

    The link is checked to reach ``dest`` when followed on the node (where
    the instance is mounted now): what a careless script would do.
    """
    path = place(root, inner)
    if how == "absolute":
        target = dest
    elif how == "proc":
        target = "/proc/self/root" + dest
    else:
        target = up_to_root(path, root) + dest
    os.symlink(target, path)
    if os.path.realpath(path) != os.path.realpath(dest):
        raise AssertionError(f"{inner} -> {target} does not reach {dest} from {path}")


def check_traps(root: str, marker: str) -> None:
    """The planted traps record when run: on the node, and in a chroot into the
    instance without /proc (inside the instance then)."""
    subprocess.run([os.path.join(root, "usr/sbin/grub-install"), "--sanity"], check=True)
    with open(marker) as f:
        assert "grub-install --sanity" in f.read()
    os.unlink(marker)
    subprocess.run(["chroot", root, "/usr/bin/dpkg", "--sanity"], check=True)
    inside = os.path.join(root, INSTANCE_MARKER.lstrip("/"))
    with open(inside) as f:
        assert "/usr/bin/dpkg --sanity" in f.read()
    os.unlink(inside)


def plant_special(root: str, inner: str, kind: str) -> None:
    """``kind`` where a text file is expected at ``inner``."""
    path = place(root, inner)
    if kind == "fifo":
        os.mkfifo(path, 0o644)
    elif kind == "chardev":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    elif kind == "blockdev":
        # The node's own root disk: what a tenant would aim at.
        node_disk = os.stat("/").st_dev
        os.mknod(path, 0o644 | stat.S_IFBLK,
                 os.makedev(os.major(node_disk), os.minor(node_disk)))
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(os.path.dirname(path))  # a socket path is limited to 108 bytes
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(os.path.basename(path))
            sock.close()
        finally:
            os.chdir(cwd)
    elif kind == "directory":
        os.mkdir(path, 0o755)
        with open(os.path.join(path, "inside"), "w") as f:
            f.write(f"{OLD_NAME}\n")
    elif kind == "huge":
        with open(path, "wb") as f:
            f.write(f"{OLD_NAME}\n".encode())
            f.truncate(HUGE_FILE_BYTES)
    else:
        raise ValueError(kind)


# --- running ---------------------------------------------------------------------

@dataclass
class Run:
    """One bounded run of a script."""

    script: str
    returncode: int | None  # None: it hung and was stopped
    stderr: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.returncode is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.stderr.strip().splitlines()[-lines:])


def _limits() -> None:
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_bounded(tree: scripts.OSTree, script: str, env: Mapping[str, str],
                stdin: int | None = None, stdout: int | None = None,
                timeout: float = RUN_TIMEOUT) -> Run:
    """Run ``script`` as Ganeti does, in its own session, stopped after ``timeout``.

    A run that hangs gets SIGTERM (the scripts release what they hold on
    it), then SIGKILL for its whole process group.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        [scripts.PYTHON, scripts.LAUNCHER, tree.sysconfdir, tree.localstatedir,
         tree.os_dir, script],
        env=dict(env), cwd=tree.os_dir,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE, preexec_fn=_limits, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    seconds = time.monotonic() - start
    return Run(script, code, err.decode("utf-8", "replace"), seconds)


def export_env(disk: str, name: str = OLD_NAME, **extra: str) -> dict[str, str]:
    return scripts.ganeti_env(INSTANCE_NAME=name, DISK_COUNT="1", DISK_0_PATH=disk,
                              EXPORT_INDEX="0", EXPORT_DISK_PATH=disk,
                              EXPORT_DEVICE=disk, **extra)


def import_env(disk: str, name: str = OLD_NAME, **extra: str) -> dict[str, str]:
    return scripts.ganeti_env(INSTANCE_NAME=name, DISK_COUNT="1", DISK_0_PATH=disk,
                              IMPORT_INDEX="0", IMPORT_DISK_PATH=disk,
                              IMPORT_DEVICE=disk, **extra)


def rename_env(disk: str, old: str = OLD_NAME, new: str = NEW_NAME) -> dict[str, str]:
    return scripts.ganeti_env(INSTANCE_NAME=new, OLD_INSTANCE_NAME=old, DISK_COUNT="1",
                              DISK_0_PATH=disk)


def dump_by_hand(disk: str, stream: str) -> None:
    """A level-0 dump of the disk's root, as a tenant's backup would hold it."""
    with scripts.root_device(disk) as dev, open(stream, "wb") as out:
        subprocess.run(["dump", "-0", "-q", "-f", "-", dev], stdout=out, check=True,
                       stderr=subprocess.DEVNULL)


# --- judging a run -----------------------------------------------------------------

@dataclass
class Verdict:
    """What was wrong with one run ('' when nothing)."""

    problems: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "ok" if not self.problems else "FAIL: " + "; ".join(self.problems)


INSTANCE_MARKER = "/.gidb-trap-ran"


def ran_inside(disk: str) -> str:
    """What the traps recorded inside the instance on ``disk`` ('' if nothing,
    or if the disk holds no mountable root: a failed import)."""
    try:
        with scripts.mounted_root(disk) as root:
            path = os.path.join(root, INSTANCE_MARKER.lstrip("/"))
            if os.path.lexists(path):
                with open(path, errors="replace") as f:
                    return f.read()
    except subprocess.CalledProcessError:
        pass
    return ""


def judge(run: Run, *, names: Iterable[str], marker: str,
          canary_changes: list[str], leftovers: list[str], inside: str = "") -> Verdict:
    """The specified behaviour of one run on a hostile instance.

    ``names`` are the hostile paths: a failing run must name one of them in
    the last lines the administrator sees, with the scripts' final ERROR
    line, not a traceback.
    """
    verdict = Verdict()
    if run.hung:
        verdict.problems.append(f"hung (stopped after {RUN_TIMEOUT:.0f} s)")
    elif run.returncode != 0:
        tail = run.tail()
        last = tail.splitlines()[-1] if tail else ""
        if "Traceback" in tail or "Internal error" in tail:
            raised = re.findall(r"(?m)^(\w+(?:Error|Exception)\b.*)$", tail)
            verdict.problems.append(f"exit {run.returncode} with a traceback: "
                                    f"{(raised or [last])[-1][:160]}")
        elif f"ERROR: {run.script} failed:" not in tail:
            # The message may go on over a few lines after it.
            verdict.problems.append(f"exit {run.returncode} without the scripts' "
                                    f"ERROR line at the end: {last[:160]}")
        elif names and not any(n in tail for n in names):
            verdict.problems.append(f"exit {run.returncode}, the error names none of "
                                    f"the hostile files: {last[:160]}")
    if os.path.exists(marker):
        with open(marker) as f:
            ran = sorted({" ".join(line.split()[1:3]) for line in f if len(line.split()) > 1})
        verdict.problems.append("ran the instance's " + ", ".join(ran))
        os.unlink(marker)
    if inside:
        ran = sorted({" ".join(line.split()[1:3]) for line in inside.splitlines()
                      if len(line.split()) > 1})
        verdict.problems.append("ran (in a chroot) the instance's " + ", ".join(ran))
    if canary_changes:
        verdict.problems.append("changed the node: " + ", ".join(canary_changes[:6]))
    if leftovers:
        verdict.problems.append("left behind: " + ", ".join(leftovers))
    return verdict


def exit_summary(run: Run) -> str:
    if run.hung:
        return "hung"
    if run.returncode == 0:
        return "exit 0"
    last = run.tail().splitlines()[-1:] or [""]
    return f"exit {run.returncode}: {last[0][:100]}"
