"""Run one program (restore) where only one directory of the node is writable.

Usage: ``/usr/bin/python3 -I -S confine.py TARGET -- PROGRAM [ARG...]``

import feeds restore(8) a stream any tenant can shape, as root. A restore
that misbehaves (a bug, or a crafted stream taking it over) must not reach
the node. This runs as its own process, single-threaded (import runs a pump
thread, so nothing of this can happen between fork and exec there), and
then becomes PROGRAM:

- new mount, network, IPC and UTS namespaces: every mount made here is
  private and vanishes with the process, whatever kills it; no network and
  no abstract unix socket of the node;
- a new root: a small read-only tmpfs holding only what the program needs,
  each a clone of the node's mount made read-only, nosuid and nodev for this
  namespace alone (the node's own mounts keep their flags): /usr (and the
  /bin, /sbin, /lib* of a system whose /usr is not merged), /etc/ld.so.cache,
  /dev/null, a private tmpfs as /tmp for restore's directory and mode tables
  (its TMPDIR), and the target as /instance, with its own mount flags, as
  the working directory. Nothing else of the node exists there: no /proc,
  no /run and its unix sockets (a read-only mount would not stop connect()),
  no device node other than /dev/null;
- only the capabilities restoring files needs (ownership, modes, device
  nodes, file capabilities, inode flags, the filesystem's reserved blocks);
  not CAP_SYS_ADMIN, CAP_SYS_CHROOT or CAP_SYS_PTRACE, so the namespace
  cannot be undone or left, and no new privileges on exec;
- a minimal environment, and SIGKILL when import dies.

This file is run by path with ``python3 -I -S`` (no site, no path taken from
the environment or the working directory), so it imports the standard
library only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# The exit status when the confinement could not be set up (restore never ran).
SETUP_FAILED = 125
# The exit status when the program is not installed (as the shell's).
NOT_FOUND = 127

# Where the new root is assembled; hidden in this namespace only. Every
# source was opened before, so the target may lie below it.
ASSEMBLY_POINT = "/tmp"
# The target's place in the new root (restore works relative to it).
INSIDE_TARGET = "/instance"
# restore's temporary tables (rstdir*, rstmode*: a few tens of bytes per
# directory entry and per directory) live in memory here, never on the
# node's disks; a quarter of the memory bounds what a hostile stream takes.
SCRATCH_SIZE = "25%"

# Capabilities restore keeps (linux/capability.h numbers).
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_LINUX_IMMUTABLE = 9
CAP_SYS_RESOURCE = 24
CAP_MKNOD = 27
CAP_SETFCAP = 31
KEPT_CAPABILITIES = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID,
                     CAP_LINUX_IMMUTABLE, CAP_SYS_RESOURCE, CAP_MKNOD, CAP_SETFCAP)

# (The PATH runner.base_environment gives by default; only /usr and the
# top-level program directories exist inside.)
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C", "TMPDIR": "/tmp", "HOME": "/"}
# Test-only: lets the fault tests find the process (tests/root/faultkit.py).
PASSED_VARIABLES = ("GIDB_TEST_TAG",)

# Top-level directories of the node that hold programs and libraries.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_REC = 0x4000
MS_PRIVATE = 0x40000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
# The same on every architecture Debian releases (system calls added since
# Linux 5.1 share their numbers); glibc 2.36 wraps them, older ones do not.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A step of the confinement failed; restore must not run."""


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags),
                       _b(data)), f"mount {target}")


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def clone_tree(path: str, *, dirfd: int = AT_FDCWD, recursive: bool = True) -> int:
    """A detached copy of the mount(s) at ``path``, as a descriptor."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if dirfd != AT_FDCWD:
        flags |= AT_EMPTY_PATH
    return _check(_libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dirfd),
                                _b(path), ctypes.c_uint(flags)), f"clone the mount of {path}")


def set_mount_flags(tree_fd: int, attrs: int, what: str) -> None:
    """Add ``attrs`` to every mount of a detached tree (this copy only)."""
    attr = MountAttr(attrs, 0, 0, 0)
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(tree_fd), b"",
                         ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))),
           f"restrict the mount of {what}")


def attach_tree(tree_fd: int, path: str) -> None:
    _check(_libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(tree_fd), b"",
                         ctypes.c_int(AT_FDCWD), _b(path),
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), f"attach {path}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def build_root(target: str) -> str:
    """Assemble the new root in this (already private) namespace; its path."""
    target_fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    trees: list[tuple[str, int]] = []
    links: list[tuple[str, str]] = []
    try:
        # The target stays writable (with its submounts' own flags), but
        # nothing restore creates there is a device it can open, a set-id
        # program or a program at all, whatever import mounted it with.
        fd = clone_tree("", dirfd=target_fd)
        trees.append((INSIDE_TARGET, fd))
        set_mount_flags(fd, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                        target)
        for name in SYSTEM_DIRS:
            path = "/" + name
            if os.path.islink(path):
                links.append((name, os.readlink(path)))
            elif os.path.isdir(path):
                fd = clone_tree(path)
                set_mount_flags(fd, ro, path)
                trees.append((path, fd))
        if os.path.isfile("/etc/ld.so.cache"):
            fd = clone_tree("/etc/ld.so.cache", recursive=False)
            set_mount_flags(fd, ro, "/etc/ld.so.cache")
            trees.append(("/etc/ld.so.cache", fd))
        # restore gives up without /dev/null (its prompt input when there
        # is no terminal): the one device node, on a nosuid read-only mount.
        fd = clone_tree("/dev/null", recursive=False)
        set_mount_flags(fd, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, "/dev/null")
        trees.append(("/dev/null", fd))

        root = ASSEMBLY_POINT
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "mode=0755,size=1m")
        for path in ("/etc", "/dev", "/tmp"):
            os.mkdir(root + path, 0o755)
        for name, link in links:
            os.symlink(link, os.path.join(root, name))
        for path, fd in trees:
            if path in ("/etc/ld.so.cache", "/dev/null"):
                os.close(os.open(root + path, os.O_CREAT | os.O_WRONLY, 0o644))
            else:
                os.mkdir(root + path, 0o755)
            attach_tree(fd, root + path)
        _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"mode=0700,size={SCRATCH_SIZE}")
        _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    finally:
        os.close(target_fd)
        for _, fd in trees:
            os.close(fd)
    return root


def current_capabilities() -> tuple[int, int]:
    """The highest capability number the kernel knows, and our permitted set."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    with open("/proc/self/status") as f:
        permitted = next(int(line.split()[1], 16) for line in f
                         if line.startswith("CapPrm:"))
    return last, permitted


def drop_privileges(last: int, permitted: int) -> None:
    """Keep only KEPT_CAPABILITIES (those of ``permitted`` we have), for
    good: bounding set, ambient set, no new privileges."""
    for cap in range(last + 1):
        if cap not in KEPT_CAPABILITIES:
            _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap}")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    mask = sum(1 << cap for cap in KEPT_CAPABILITIES) & permitted
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)(CapData(mask, mask, 0), CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(header), data), "set capabilities")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")


def confine(target: str) -> None:
    """Enter the confinement; afterwards the working directory is the target."""
    parent = os.getppid()
    # Killed with import, even by SIGKILL: the namespace and its mounts go too.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    if os.getppid() != parent:
        raise SetupError("import exited before restore started")
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
                                      | CLONE_NEWUTS)), "unshare")
    # Nothing mounted here may propagate back to the node.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    last_cap, permitted = current_capabilities()
    root = build_root(target)
    os.chdir(root)
    os.chroot(".")
    os.chdir(INSIDE_TARGET)
    drop_privileges(last_cap, permitted)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--" or not os.path.isabs(argv[1]):
        print("usage: confine.py /TARGET -- PROGRAM [ARG...]", file=sys.stderr)
        return SETUP_FAILED
    target, command = argv[1], argv[3:]
    try:
        confine(target)
    except (SetupError, OSError) as exc:
        print(f"confine: cannot confine {command[0]} to {target}: {exc}", file=sys.stderr)
        return SETUP_FAILED
    env = dict(ENVIRONMENT)
    env.update({k: os.environ[k] for k in PASSED_VARIABLES if k in os.environ})
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"confine: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return NOT_FOUND if isinstance(exc, FileNotFoundError) else SETUP_FAILED
    return SETUP_FAILED  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
