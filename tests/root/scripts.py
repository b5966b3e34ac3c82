"""Helpers for tests that run the OS scripts for real, as Ganeti would.

A scratch OS installation (settings file, variants, hooks directory,
variants.list) lives in the test's temporary directory; the scripts run in
their own process with a Ganeti-style clean environment through
tests/launch.py; the resulting disk is inspected by mounting its root
read-only through an offset loop device (this kernel does not parse
partition tables), always released afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO

from tests.root.sparse import sparse_file

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(os.path.dirname(HERE), "launch.py")
PYTHON = "/usr/bin/python3"
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"


@dataclass(frozen=True)
class OSTree:
    """A scratch installation of the OS definition's configuration."""

    sysconfdir: str
    localstatedir: str
    os_dir: str

    @property
    def defaults_file(self) -> str:
        return os.path.join(self.sysconfdir, "default", "ganeti-instance-debootstrap")

    @property
    def config_dir(self) -> str:
        return os.path.join(self.sysconfdir, "ganeti", "instance-debootstrap")

    @property
    def hooks_dir(self) -> str:
        return os.path.join(self.config_dir, "hooks")

    @property
    def variants_dir(self) -> str:
        return os.path.join(self.config_dir, "variants")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.localstatedir, "cache", "ganeti-instance-debootstrap")

    def settings(self, text: str) -> None:
        """Replace the settings file's content."""
        with open(self.defaults_file, "w") as f:
            f.write(text)

    def variant(self, name: str, text: str, listed: bool = True) -> None:
        with open(os.path.join(self.variants_dir, name + ".conf"), "w") as f:
            f.write(text)
        if listed:
            with open(os.path.join(self.os_dir, "variants.list"), "a") as f:
                f.write(name + "\n")

    def hook(self, name: str, body: str) -> str:
        path = os.path.join(self.hooks_dir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\nset -e\n" + body)
        os.chmod(path, 0o755)
        return path


def make_os_tree(base: str, localstatedir: str) -> OSTree:
    """Lay out a scratch OS installation under ``base`` using ``localstatedir``."""
    tree = OSTree(os.path.join(base, "etc"), localstatedir, os.path.join(base, "os"))
    for d in (os.path.dirname(tree.defaults_file), tree.hooks_dir, tree.variants_dir,
              tree.os_dir):
        os.makedirs(d, mode=0o755, exist_ok=True)
    tree.settings("")
    tree.variant("default", "")
    return tree


def ganeti_env(**variables: str) -> dict[str, str]:
    """A Ganeti-style clean environment (API 20) plus ``variables``."""
    env = {"PATH": GANETI_PATH, "OS_API_VERSION": "20", "OS_NAME": "debootstrap",
           "OS_VARIANT": "default", "DEBUG_LEVEL": "0", "HYPERVISOR": "kvm",
           "NIC_COUNT": "0"}
    # Not Ganeti's, but harmless: coverage of the script's process, and its
    # temporary mount points inside this test session's directory.
    for passed in ("COVERAGE_PROCESS_START", "COVERAGE_FILE", "COVERAGE_RCFILE", "TMPDIR"):
        if os.environ.get(passed):
            env[passed] = os.environ[passed]
    env.update(variables)
    return env


def create_env(name: str, disk: str, **variables: str) -> dict[str, str]:
    """The environment Ganeti gives create for a one-disk instance."""
    return ganeti_env(INSTANCE_NAME=name, DISK_COUNT="1", DISK_0_PATH=disk,
                      DISK_0_ACCESS="rw", **variables)


def run_script(tree: OSTree, script: str, env: Mapping[str, str],
               args: tuple[str, ...] = (), stdin: int | None = None,
               stdout: int | None = subprocess.PIPE, check: bool = True,
               timeout: float = 900) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` in its own process, cwd = the OS dir, umask 077 like Ganeti."""
    proc = subprocess.run(
        [PYTHON, LAUNCHER, tree.sysconfdir, tree.localstatedir, tree.os_dir,
         script, *args],
        env=dict(env), cwd=tree.os_dir, stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout, stderr=subprocess.PIPE, timeout=timeout,
        preexec_fn=lambda: os.umask(0o077))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n"
                             + proc.stderr.decode(errors="replace")[-4000:])
    sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    return proc


def start_script(tree: OSTree, script: str, env: Mapping[str, str],
                 args: tuple[str, ...], stdout: IO[bytes],
                 stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ``script`` as run_script does, without waiting for it."""
    return subprocess.Popen(
        [PYTHON, LAUNCHER, tree.sysconfdir, tree.localstatedir, tree.os_dir,
         script, *args],
        env=dict(env), cwd=tree.os_dir, stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=stderr, preexec_fn=lambda: os.umask(0o077))


def sparse_disk(directory: str, mib: int, name: str = "disk0.img") -> str:
    """A sparse instance disk (tests/root/sparse.py) named as Ganeti's disk 0."""
    return sparse_file(directory, mib, name)


def root_offset(disk: str) -> tuple[int, int | None]:
    """Byte offset and size of the root filesystem: partition 1, or the whole disk."""
    res = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        return 0, None
    table = json.loads(res.stdout)["partitiontable"]
    part = table["partitions"][0]
    sector = table.get("sectorsize", 512)
    return part["start"] * sector, part["size"] * sector


@contextlib.contextmanager
def root_device(disk: str, read_only: bool = True) -> Iterator[str]:
    """A loop device over the disk's root filesystem, detached afterwards."""
    offset, size = root_offset(disk)
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    dev = subprocess.run(argv + [disk], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def mounted_root(disk: str, read_only: bool = True) -> Iterator[str]:
    """The disk's root filesystem mounted (read-only by default), released afterwards."""
    with root_device(disk, read_only) as dev:
        mnt = tempfile.mkdtemp(prefix="gidb-inspect.")
        try:
            subprocess.run(["mount"] + (["-o", "ro"] if read_only else []) + [dev, mnt],
                           check=True)
            try:
                yield mnt
            finally:
                subprocess.run(["umount", mnt], check=True)
        finally:
            os.rmdir(mnt)


def blkid(dev: str, tag: str) -> str:
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, dev],
                          capture_output=True, text=True).stdout.strip()


def read(root: str, inner: str) -> str:
    with open(os.path.join(root, inner.lstrip("/"))) as f:
        return f.read()


# The read-only check of each root filesystem type: exit status 0 when clean.
FSCK_COMMANDS = {"ext4": ["e2fsck", "-fn"], "ext3": ["e2fsck", "-fn"],
                 "ext2": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"],
                 "btrfs": ["btrfs", "check", "--readonly"]}


def assert_fs_clean(dev: str, fstype: str) -> None:
    """The filesystem on ``dev`` passes its type's read-only check."""
    res = subprocess.run([*FSCK_COMMANDS[fstype], dev], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def filesystem_bytes(dev: str, fstype: str) -> int:
    """How many bytes of ``dev`` the filesystem on it spans, from its superblock."""
    if fstype == "xfs":
        out = subprocess.run(["xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks blocksize", dev],
                             capture_output=True, text=True, check=True).stdout
        fields = dict(ln.split(" = ") for ln in out.splitlines())
        return int(fields["dblocks"]) * int(fields["blocksize"])
    if fstype == "btrfs":
        out = subprocess.run(["btrfs", "inspect-internal", "dump-super", dev],
                             capture_output=True, text=True, check=True).stdout
        return int([ln for ln in out.splitlines()
                    if ln.startswith("total_bytes")][0].split()[-1])
    info = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True).stdout
    blocks = int([ln for ln in info.splitlines()
                  if ln.startswith("Block count:")][0].split()[-1])
    return blocks * 4096
