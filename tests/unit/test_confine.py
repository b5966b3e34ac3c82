"""The seccomp filter confine.py puts in front of restore, without root: its
system call tables against the kernel's headers, and the BPF program run on
made-up calls by a small interpreter of the instructions it uses."""

from __future__ import annotations

import re
import struct

import pytest

from ganeti_debootstrap import confine

HEADERS = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
           "aarch64": "/usr/include/asm-generic/unistd.h"}

AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028

ALLOW = confine.SECCOMP_RET_ALLOW
EPERM = confine.SECCOMP_RET_ERRNO | 1
ENOSYS = confine.SECCOMP_RET_ERRNO | 38

# What restore -r made (strace of a 250 MiB stream of /usr/share/doc and
# /usr/lib/python3, with xattrs, device nodes, immutable files), and what it
# may make on other streams (hard links, renames, aborting).
RESTORE_CALLS = (
    "read", "write", "pread64", "lseek", "openat", "close", "newfstatat", "fstat",
    "utimensat", "chown", "fchown", "lchown", "fchownat", "chmod", "fchmod", "fchmodat",
    "mkdir", "mkdirat", "symlink", "symlinkat", "link", "linkat", "rename", "renameat",
    "unlink", "unlinkat", "rmdir", "mknod", "mknodat", "lsetxattr", "setxattr",
    "fsetxattr", "lgetxattr", "llistxattr", "statfs", "fstatfs", "getdents64",
    "readlink", "readlinkat", "ftruncate", "fcntl", "access", "faccessat", "umask",
    "setuid", "getuid", "geteuid", "getpid", "mmap", "munmap", "mprotect", "brk",
    "rt_sigaction", "rt_sigprocmask", "set_tid_address", "set_robust_list", "rseq",
    "prlimit64", "getrandom", "execve", "exit_group", "arch_prctl", "tgkill",
    "wait4", "capget", "capset", "prctl",
)


def header_numbers(arch: str) -> dict[str, int]:
    with open(HEADERS[arch]) as f:
        return {name: int(nr) for name, nr in
                re.findall(r"#define __NR_(\w+)\s+(\d+)\b", f.read())}


def run(program: list[confine.Instruction], nr: int, arch: int,
        args: tuple[int, ...] = ()) -> int:
    """What the kernel would do with the call: the program's return value."""
    args = args + (0,) * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(a & (2**64 - 1) for a in args))
    acc = 0
    pc = 0
    for _ in range(len(program)):
        code, jt, jf, k = program[pc]
        pc += 1
        if code == confine.BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == confine.BPF_RET_K:
            return k
        else:
            taken = {confine.BPF_JEQ_K: acc == k, confine.BPF_JGT_K: acc > k,
                     confine.BPF_JGE_K: acc >= k, confine.BPF_JSET_K: bool(acc & k)}[code]
            pc += jt if taken else jf
    raise AssertionError("the program ran off its end")


TABLES = [confine.X86_64, confine.AARCH64]


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_the_tables_hold_the_kernels_numbers_for_every_call_filtered(table):
    numbers = header_numbers(table.name)
    for name, nr in table.numbers.items():
        assert numbers[name] == nr, name
    absents: dict[str, set[str]] = {"x86_64": set(), "aarch64": {"iopl", "ioperm"}}
    absent = absents[table.name]
    needed = set(confine.BLOCKED_SYSCALLS) | {"clone", "clone3", "ioctl", "madvise",
                                              "socket", "socketpair"}
    assert set(table.numbers) == needed - absent
    assert absent.isdisjoint(numbers)


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_the_escape_calls_fail_with_eperm_and_what_restore_does_is_allowed(table):
    program = confine.filter_program(table)
    assert len(program) < 4096  # BPF_MAXINSNS
    arch = table.audit_arch
    for name in confine.BLOCKED_SYSCALLS:
        if name in table.numbers:
            assert run(program, table.numbers[name], arch) == EPERM, name
    numbers = header_numbers(table.name)
    for name in RESTORE_CALLS:
        if name in numbers:
            assert run(program, numbers[name], arch) == ALLOW, name
    assert run(program, table.numbers["ioctl"], arch, (3, 0x40086602)) == ALLOW


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_clone_makes_no_namespace_and_clone3_falls_back(table):
    program = confine.filter_program(table)
    clone, arch = table.numbers["clone"], table.audit_arch
    fork = 0x01200011     # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
    thread = 0x003D0F00   # what pthread_create asks for
    spawn = 0x00004111    # CLONE_VM | CLONE_VFORK | SIGCHLD (posix_spawn)
    for flags in (fork, thread, spawn, fork | (0xFFFFFFFF << 32)):
        assert run(program, clone, arch, (flags,)) == ALLOW, hex(flags)
    for new in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                0x20000000, 0x40000000):
        assert run(program, clone, arch, (fork | new,)) == EPERM, hex(new)
    assert run(program, table.numbers["clone3"], arch) == ENOSYS


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_ioctl_madvise_and_socket_are_checked_by_argument(table):
    program = confine.filter_program(table)
    nr, arch = table.numbers, table.audit_arch
    for request in confine.ALLOWED_IOCTLS:
        assert run(program, nr["ioctl"], arch, (0, request)) == ALLOW
    # FIFREEZE, FITRIM, EXT4_IOC_SHUTDOWN, BTRFS_IOC_SNAP_DESTROY, BLKRRPART, TIOCSTI
    for request in (0xC0045877, 0xC0185879, 0x8004587D, 0x5000940F, 0x125F, 0x5412):
        assert run(program, nr["ioctl"], arch, (0, request)) == EPERM, hex(request)
    for advice in (0, 4, 8, 14, 25):  # NORMAL, DONTNEED, FREE, MERGEABLE, COLLAPSE
        assert run(program, nr["madvise"], arch, (0, 4096, advice)) == ALLOW
    for advice in (100, 101):         # HWPOISON, SOFT_OFFLINE
        assert run(program, nr["madvise"], arch, (0, 4096, advice)) == EPERM
    for call in ("socket", "socketpair"):
        assert run(program, nr[call], arch, (1, 1, 0)) == ALLOW
        for family in (2, 10, 16, 40):  # INET, INET6, NETLINK, VSOCK
            assert run(program, nr[call], arch, (family, 1, 0)) == EPERM


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_other_abis_and_calls_newer_than_the_list_are_refused(table):
    program = confine.filter_program(table)
    getpid = header_numbers(table.name)["getpid"]
    for foreign in (AUDIT_ARCH_I386, AUDIT_ARCH_ARM, confine.X86_64.audit_arch,
                    confine.AARCH64.audit_arch):
        if foreign != table.audit_arch:
            assert run(program, getpid, foreign) == EPERM
    if table.name == "x86_64":  # x32's calls: the same audit arch, bit 30 set
        assert run(program, 0x40000000 | getpid, table.audit_arch) == EPERM
    assert run(program, confine.LAST_REVIEWED, table.audit_arch) == ALLOW
    for newer in (confine.LAST_REVIEWED + 1, 467, 1000):  # 467: open_tree_attr
        assert run(program, newer, table.audit_arch) == ENOSYS


def test_the_table_is_chosen_by_the_interpreters_abi():
    assert confine.host_table("x86_64", 8, "little") is confine.X86_64
    assert confine.host_table("aarch64", 8, "little") is confine.AARCH64
    assert confine.host_table("x86_64", 4, "little") is None  # x32 or i386 userland
    assert confine.host_table("aarch64", 8, "big") is None
    assert confine.host_table("ppc64le", 8, "little") is None
    assert confine.host_table("riscv64", 8, "little") is None
