"""Run one program (restore) where only one directory of the node is writable.

Usage: ``/usr/bin/python3 -I -S confine.py TARGET -- PROGRAM [ARG...]``

import feeds restore(8) a stream any tenant can shape, as root. A restore
that misbehaves (a bug, or a crafted stream taking it over) must not reach
the node. This runs as its own process, single-threaded (import runs a pump
thread, so nothing of this can happen between fork and exec there), sets
up the confinement and runs PROGRAM in it:

- new mount, network, IPC, UTS and PID namespaces: every mount made here is
  private and vanishes with its processes, whatever kills them; no network and
  no abstract unix socket of the node; no process of the node to signal or
  to set limits on (restore runs as root, keeping CAP_SYS_RESOURCE: in the
  node's PID namespace it could kill or starve any of root's processes,
  Ganeti's daemons among them);
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
  nodes, file capabilities, inode flags, the filesystem's reserved blocks,
  and CAP_SYS_ADMIN for the ``trusted.*`` and ``security.*`` extended
  attributes); not CAP_SYS_CHROOT or CAP_SYS_PTRACE, and no new privileges
  on exec;
- a seccomp filter that refuses (EPERM) every system call CAP_SYS_ADMIN
  would turn into a way out or into the node's kernel: the mount family,
  namespaces (unshare, setns, clone with CLONE_NEW*), bpf, perf events,
  keys, quotas, swap, file handles, ptrace, filesystem ioctls other than the
  inode flags (freeze, shutdown, ...), and so on (:data:`BLOCKED_SYSCALLS`).
  On an architecture without a system call table here, no filter: restore
  runs without CAP_SYS_ADMIN (those attributes are not restored, import
  warns);
- a minimal environment, and SIGKILL when import dies.

A new PID namespace holds only the processes started after unshare(2), so
this process forks once the confinement is complete (every step above
applies to both sides) and stays outside as the supervisor: it passes
SIGTERM, SIGINT and SIGHUP on and ends as PROGRAM ended (its exit status,
or killed by the same signal). The child is the namespace's PID 1 and forks
PROGRAM as PID 2, so that PROGRAM is an ordinary process: a PID 1 ignores
every signal it has no handler for, its own abort() included. PID 1 only
waits (reaping whatever PROGRAM leaves orphaned), passes the signals on and
reports PROGRAM's end; when it exits the kernel kills everything left in
the namespace, and it dies (SIGKILL) with the supervisor. It starts a
session of its own, so that PROGRAM cannot signal even the supervisor's
process group.

This file is run by path with ``python3 -I -S`` (no site, no path taken from
the environment or the working directory), so it imports the standard
library only.
"""

from __future__ import annotations

import ctypes
import os
import resource
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
# Kept as well when the seccomp filter is in place (trusted.*, security.*).
CAP_SYS_ADMIN = 21

# (The PATH runner.base_environment gives by default; only /usr and the
# top-level program directories exist inside.)
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C", "TMPDIR": "/tmp", "HOME": "/"}
# The signals a stopped import (or an administrator) sends, passed on to the
# program: a PID 1 receives only those it handles, even from the node.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Test-only: lets the fault tests find the process (tests/root/faultkit.py).
PASSED_VARIABLES = ("GIDB_TEST_TAG",)

# Top-level directories of the node that hold programs and libraries.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
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
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
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


def _prctl(option: int, arg: int, what: str, pointer: object = None) -> None:
    """prctl(option, arg, pointer or 0, 0, 0)."""
    third = ctypes.c_ulong(0) if pointer is None else pointer
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), third,
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


# --- the seccomp filter ---------------------------------------------------------
#
# restore keeps CAP_SYS_ADMIN only to set trusted.* and security.* extended
# attributes. Everything else that capability grants (capabilities(7)) is
# taken back here, by system call: a classic BPF program run by the kernel
# on every call restore (or anything it starts: the filter is inherited and
# cannot be removed) makes.

# System calls refused with EPERM, by what they would give a compromised
# restore holding CAP_SYS_ADMIN.
BLOCKED_SYSCALLS = (
    # Undo or leave the new root: the namespace still holds the node's whole
    # mount tree below it (a procfs mounted anywhere gives /proc/1/root).
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # Other namespaces: the node's (setns), or new ones where it is root of
    # its own mounts (unshare; clone with CLONE_NEW*, checked below).
    "unshare", "setns",
    # The node's kernel: programs, tracing, its log, its keyrings (not
    # namespaced: root's keyring is the node's), modules, kexec, reboot.
    "bpf", "perf_event_open", "syslog", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "lookup_dcookie",
    # Whole filesystems and devices: quotas (of /usr's filesystem, the
    # node's root), swap (a file of the instance as the node's swap),
    # fanotify on a filesystem, opening files by handle (past any root).
    "quotactl", "quotactl_fd", "swapon", "swapoff", "fanotify_init",
    "name_to_handle_at", "open_by_handle_at",
    # Other processes: only the namespace's PID 1 remains visible (kill,
    # tgkill, pidfd_send_signal and prlimit64 reach nothing else, so they
    # stay allowed), but it is no business of restore's either.
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "process_madvise",
    # The machine's clock and names, I/O priority, accounting, terminals, ports.
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "sethostname",
    "setdomainname", "ioprio_set", "acct", "vhangup", "iopl", "ioperm",
    # Calls made outside of seccomp's view, and faults restore never needs.
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
)

# clone's flags that make new namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS,
# NEWIPC, NEWUSER, NEWPID, NEWNET): EPERM. clone3 takes its flags in memory
# that a filter cannot read: ENOSYS, so that the C library falls back to clone.
CLONE_NEW_ANY = 0x7E020000
# The ioctl requests allowed (the others: EPERM). Filesystems' own (freeze,
# shutdown, resize, trim, btrfs subvolumes...) need only CAP_SYS_ADMIN and
# reach the node's filesystems through /usr; restore sets inode flags only.
ALLOWED_IOCTLS = (
    0x80086601, 0x40086602,  # FS_IOC_GETFLAGS, FS_IOC_SETFLAGS
    0x80046601, 0x40046602,  # FS_IOC32_GETFLAGS, FS_IOC32_SETFLAGS
    0x5401, 0x5413,          # TCGETS (isatty), TIOCGWINSZ
    0x541B, 0x5421,          # FIONREAD, FIONBIO
    0x5450, 0x5451,          # FIONCLEX, FIOCLEX
)
# madvise advice from MADV_HWPOISON (100, MADV_SOFT_OFFLINE 101) on: poisons
# a page, and libc's pages are the node's.
MADV_HWPOISON = 100
# socket and socketpair: only AF_UNIX (no node's socket is reachable). The
# others are of no use to restore; AF_VSOCK ignores network namespaces and
# reaches the hypervisor or the node's guests.
AF_UNIX = 1


class SyscallTable:
    """One architecture's system call numbers, as its kernel sees them."""

    def __init__(self, name: str, audit_arch: int, numbers: dict[str, int], *,
                 last_reviewed: int, foreign_bit: int = 0) -> None:
        self.name = name
        # AUDIT_ARCH_* the kernel reports for a call of this ABI.
        self.audit_arch = audit_arch
        self.numbers = numbers
        # Calls above this number were added after the list above was
        # drawn up: ENOSYS (the C library falls back, as on an older kernel).
        self.last_reviewed = last_reviewed
        # A bit marking another ABI's calls under the same audit arch
        # (x32 on x86_64): refused.
        self.foreign_bit = foreign_bit


# (Linux 6.10's mseal; every number above is later. The numbers from 424 on
# are shared by every architecture.)
LAST_REVIEWED = 462

X86_64 = SyscallTable("x86_64", 0xC000003E, {
    "ioctl": 16, "madvise": 28, "socket": 41, "socketpair": 53, "clone": 56,
    "ptrace": 101, "syslog": 103, "vhangup": 153, "pivot_root": 155,
    "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179,
    "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "ioprio_set": 251,
    "unshare": 272, "perf_event_open": 298, "fanotify_init": 300,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438,
    "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443,
}, last_reviewed=LAST_REVIEWED, foreign_bit=0x40000000)

# arm64: the kernel's generic table (asm-generic/unistd.h); no iopl/ioperm.
AARCH64 = SyscallTable("aarch64", 0xC00000B7, {
    "lookup_dcookie": 18, "ioctl": 29, "ioprio_set": 30, "umount2": 39,
    "mount": 40, "pivot_root": 41, "chroot": 51, "vhangup": 58, "quotactl": 60,
    "acct": 89, "unshare": 97, "kexec_load": 104, "init_module": 105,
    "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117,
    "reboot": 142, "sethostname": 161, "setdomainname": 162, "settimeofday": 170,
    "adjtimex": 171, "socket": 198, "socketpair": 199, "add_key": 217,
    "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224,
    "swapoff": 225, "madvise": 233, "perf_event_open": 241, "fanotify_init": 262,
    "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266,
    "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
    "finit_module": 273, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438,
    "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443,
}, last_reviewed=LAST_REVIEWED)

TABLES = {"x86_64": X86_64, "aarch64": AARCH64}


def host_table(machine: str | None = None, pointer_size: int | None = None,
               byteorder: str | None = None) -> SyscallTable | None:
    """This interpreter's system call table, or None where there is none here.

    The interpreter's own ABI counts, not only the kernel's: a 32-bit
    userland on a 64-bit kernel makes calls of another audit arch.
    """
    machine = os.uname().machine if machine is None else machine
    pointer_size = ctypes.sizeof(ctypes.c_void_p) if pointer_size is None else pointer_size
    byteorder = sys.byteorder if byteorder is None else byteorder
    if pointer_size != 8 or byteorder != "little":
        return None
    return TABLES.get(machine)


# Classic BPF (linux/filter.h, linux/seccomp.h).
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGT_K = 0x25
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
ENOSYS = 38
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer;
# __u64 args[6]. The low half of an argument (little endian): every argument
# checked is an int or flags the kernel truncates to 32 bits.
DATA_NR = 0
DATA_ARCH = 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


Instruction = tuple[int, int, int, int]  # code, jt, jf, k


def filter_program(table: SyscallTable) -> list[Instruction]:
    """The BPF program for ``table``: (code, jump if true, jump if false, k)."""
    code: list[tuple[int, int | str, int | str, int]] = []
    labels: dict[str, int] = {}

    def op(opcode: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        code.append((opcode, jt, jf, k))

    nr = table.numbers
    op(BPF_LD_W_ABS, DATA_ARCH)
    op(BPF_JEQ_K, table.audit_arch, 0, "eperm")  # another ABI (i386's int 0x80...)
    op(BPF_LD_W_ABS, DATA_NR)
    if table.foreign_bit:
        op(BPF_JGE_K, table.foreign_bit, "eperm")
    op(BPF_JGT_K, table.last_reviewed, "enosys")
    op(BPF_JEQ_K, nr["clone3"], "enosys")
    for name in BLOCKED_SYSCALLS:
        if name in nr:
            op(BPF_JEQ_K, nr[name], "eperm")
    op(BPF_JEQ_K, nr["clone"], "clone")
    op(BPF_JEQ_K, nr["ioctl"], "ioctl")
    op(BPF_JEQ_K, nr["madvise"], "madvise")
    op(BPF_JEQ_K, nr["socket"], "socket")
    op(BPF_JEQ_K, nr["socketpair"], "socket")
    op(BPF_RET_K, SECCOMP_RET_ALLOW)
    labels["clone"] = len(code)
    op(BPF_LD_W_ABS, _arg_low(0))
    op(BPF_JSET_K, CLONE_NEW_ANY, "eperm", "allow")
    labels["madvise"] = len(code)
    op(BPF_LD_W_ABS, _arg_low(2))
    op(BPF_JGE_K, MADV_HWPOISON, "eperm", "allow")
    labels["socket"] = len(code)
    op(BPF_LD_W_ABS, _arg_low(0))
    op(BPF_JEQ_K, AF_UNIX, "allow", "eperm")
    labels["ioctl"] = len(code)
    op(BPF_LD_W_ABS, _arg_low(1))
    for request in ALLOWED_IOCTLS:
        op(BPF_JEQ_K, request, "allow")
    labels["eperm"] = len(code)
    op(BPF_RET_K, SECCOMP_RET_ERRNO | EPERM)
    labels["enosys"] = len(code)
    op(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS)
    labels["allow"] = len(code)
    op(BPF_RET_K, SECCOMP_RET_ALLOW)

    def offset(at: int, jump: int | str) -> int:
        if isinstance(jump, int):
            return jump
        distance = labels[jump] - at - 1
        if not 0 <= distance <= 255:
            raise ValueError(f"BPF jump to {jump} out of range at {at}")
        return distance

    return [(c, offset(i, jt), offset(i, jf), k) for i, (c, jt, jf, k) in enumerate(code)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_filter(program: list[Instruction]) -> None:
    """Install ``program`` for this process and all it starts, for good."""
    instructions = (SockFilter * len(program))(*(SockFilter(*i) for i in program))
    fprog = SockFprog(len(program), instructions)
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, "install the seccomp filter",
           ctypes.byref(fprog))


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


def drop_privileges(last: int, permitted: int, table: SyscallTable | None) -> bool:
    """Keep only KEPT_CAPABILITIES (those of ``permitted`` we have), for
    good: bounding set, ambient set, no new privileges; and CAP_SYS_ADMIN
    behind the seccomp filter for ``table``, when there is one and the
    kernel takes it. Whether it did.
    """
    kept = KEPT_CAPABILITIES + ((CAP_SYS_ADMIN,) if table is not None else ())
    for cap in range(last + 1):
        if cap not in kept:
            _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap}")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    filtered = False
    if table is not None:
        try:
            install_filter(filter_program(table))
            filtered = True
        except SetupError as exc:
            # (Still holding CAP_SETPCAP: the capabilities are set below.)
            _prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, "drop capability CAP_SYS_ADMIN")
            kept = KEPT_CAPABILITIES
            print(f"confine: warning: {exc}; trusted.* and security.* extended "
                  f"attributes (other than file capabilities) are not restored",
                  file=sys.stderr)
    mask = sum(1 << cap for cap in kept) & permitted
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)(CapData(mask, mask, 0), CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(header), data), "set capabilities")
    return filtered


def confine(target: str) -> None:
    """Enter the confinement; afterwards the working directory is the target."""
    parent = os.getppid()
    # Killed with import, even by SIGKILL: the namespace and its mounts go too.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    if os.getppid() != parent:
        raise SetupError("import exited before restore started")
    # (The new PID namespace is for the children only: see run_confined.)
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
                                      | CLONE_NEWUTS | CLONE_NEWPID)), "unshare")
    # Nothing mounted here may propagate back to the node.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    last_cap, permitted = current_capabilities()
    root = build_root(target)
    os.chdir(root)
    os.chroot(".")
    os.chdir(INSIDE_TARGET)
    drop_privileges(last_cap, permitted, host_table())


def _forward_signals(pidfd: int) -> None:
    """Pass FORWARDED_SIGNALS on to the process behind ``pidfd`` (never to
    another process that got its number once it is gone)."""
    def forward(signum: int, _frame: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)


def _exit_code(status: int) -> int:
    """A wait status as an exit code (a signal: 128 + its number, as the shell's)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _end_like(status: int) -> int:
    """End this process the way the one with this wait status ended: killed
    by the same signal (so that import reports it as restore's), or the
    exit code to return."""
    if not os.WIFSIGNALED(status):
        return os.waitstatus_to_exitcode(status)
    signum = os.WTERMSIG(status)
    # The program's core file, if any, was its own; none of this process.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(PR_SET_DUMPABLE, 0, "give up core dumps")
    if signum != signal.SIGKILL:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    return 128 + signum  # a signal that does not end a process (never reported)


def _exec(command: list[str], env: dict[str, str], mask: set[int | signal.Signals]) -> None:
    """Become the program (PID 2 of the namespace); never returns."""
    code = SETUP_FAILED
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            os.execvpe(command[0], command, env)
        except OSError as exc:
            print(f"confine: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
            if isinstance(exc, FileNotFoundError):
                code = NOT_FOUND
    finally:
        sys.stderr.flush()
        os._exit(code)


def _fork(what: str) -> int | None:
    """os.fork(); None, once said why, when it fails."""
    try:
        return os.fork()
    except OSError as exc:
        print(f"confine: cannot confine {what}: fork: {exc.strerror}", file=sys.stderr)
        return None


def _init(command: list[str], env: dict[str, str], what: str, mask: set[int | signal.Signals],
          alive_fd: int, status_fd: int) -> int:
    """PID 1 of the new PID namespace: start the program, wait for it (and
    reap whatever else ends here), pass the signals on; report its wait
    status to the supervisor on ``status_fd``. Our exit code."""
    # Killed with the supervisor, even by SIGKILL: the kernel then kills
    # the whole namespace. The supervisor may have died just before.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    os.set_blocking(alive_fd, False)
    try:
        if os.read(alive_fd, 1) == b"":
            return SETUP_FAILED
    except BlockingIOError:
        pass
    os.close(alive_fd)
    # Out of the supervisor's process group: kill(0, ...) reaches only us.
    os.setsid()
    pid = _fork(what)
    if pid is None:
        return SETUP_FAILED
    if pid == 0:
        _exec(command, env, mask)
    _forward_signals(os.pidfd_open(pid))
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    while True:
        reaped, status = os.waitpid(-1, 0)
        if reaped == pid:
            break
    os.write(status_fd, str(status).encode())
    return _exit_code(status)


def run_confined(command: list[str], env: dict[str, str], what: str) -> int:
    """Run the program in the new PID namespace (confine() done); its end as ours."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    alive_read, alive_write = os.pipe()  # EOF: the supervisor is gone
    status_read, status_write = os.pipe()  # the program's wait status
    sys.stderr.flush()
    pid = _fork(what)
    if pid is None:
        return SETUP_FAILED
    if pid == 0:
        code = SETUP_FAILED
        try:
            os.close(alive_write)
            os.close(status_read)
            code = _init(command, env, what, mask, alive_read, status_write)
        except BaseException as exc:
            print(f"confine: cannot confine {what}: {exc}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(alive_read)
    os.close(status_write)
    try:
        _forward_signals(os.pidfd_open(pid))
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)  # (not reaped: still our child)
        os.waitpid(pid, 0)
        print(f"confine: cannot confine {what}: pidfd_open: {exc.strerror}",
              file=sys.stderr)
        return SETUP_FAILED
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _, status = os.waitpid(pid, 0)
    # The program's status, as PID 1 reported it; else (PID 1 was killed
    # before it could) PID 1's own.
    reported = os.read(status_read, 32)
    if reported.isdigit() and int(reported) <= 0xFFFF:
        status = int(reported)
    return _end_like(status)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--" or not os.path.isabs(argv[1]):
        print("usage: confine.py /TARGET -- PROGRAM [ARG...]", file=sys.stderr)
        return SETUP_FAILED
    target, command = argv[1], argv[3:]
    what = f"{command[0]} to {target}"
    try:
        confine(target)
    except (SetupError, OSError) as exc:
        print(f"confine: cannot confine {what}: {exc}", file=sys.stderr)
        return SETUP_FAILED
    env = dict(ENVIRONMENT)
    env.update({k: os.environ[k] for k in PASSED_VARIABLES if k in os.environ})
    return run_confined(command, env, what)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
