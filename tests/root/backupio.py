"""Running export and import on disk files as Ganeti does, and copying an
instance's tree out to compare it (test_backup.py, test_backup_kinds.py)."""

from __future__ import annotations

import os
import subprocess

from tests.root import scripts
from tests.root.scripts import ganeti_env, mounted_root, read, run_script

# Files import changes on purpose (new UUIDs in fstab, a new machine
# identity), which changes their directory's mtime; everything else must
# come back identical.
CHANGED_BY_IMPORT = ("lost+found", "etc/fstab", "etc/machine-id")
MTIME_CHANGED_BY_IMPORT = ("etc",)


def export_env(disk: str, **extra: str) -> dict[str, str]:
    return ganeti_env(INSTANCE_NAME="bk1.example.org", DISK_COUNT="1", DISK_0_PATH=disk,
                      EXPORT_INDEX="0", EXPORT_DISK_PATH=disk, EXPORT_DEVICE=disk, **extra)


def import_env(disk: str, **extra: str) -> dict[str, str]:
    return ganeti_env(INSTANCE_NAME="bk1.example.org", DISK_COUNT="1", DISK_0_PATH=disk,
                      IMPORT_INDEX="0", IMPORT_DISK_PATH=disk, IMPORT_DEVICE=disk, **extra)


def export_to_file(tree, disk: str, dest: str, **extra: str) -> subprocess.CompletedProcess:
    with open(dest, "wb") as out:
        return run_script(tree, "export", export_env(disk, **extra), stdout=out.fileno())


def export_announcing(tree, env: dict[str, str], dest: str) -> str:
    """Run export with EXP_SIZE_FD into the file ``dest``, as Ganeti does;
    the size it announced (text). Fails the test if export fails."""
    read_fd, write_fd = os.pipe()
    with open(dest, "wb") as out:
        proc = subprocess.run(
            [scripts.PYTHON, scripts.LAUNCHER, tree.sysconfdir, tree.localstatedir,
             tree.os_dir, "export"], env={**env, "EXP_SIZE_FD": str(write_fd)},
            cwd=tree.os_dir, stdout=out, stderr=subprocess.PIPE, pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        announced = f.read()
    assert proc.returncode == 0, proc.stderr.decode()
    return announced


def import_from_file(tree, disk: str, src: str, check: bool = True, **extra: str):
    with open(src, "rb") as inp:
        return run_script(tree, "import", import_env(disk, **extra), stdin=inp.fileno(),
                          check=check)


def copy_tree_out(disk: str, dest: str) -> None:
    """Copy the instance's tree out with everything tar can keep, for comparison."""
    os.makedirs(dest)
    with mounted_root(disk) as root:
        tar = subprocess.Popen(["tar", "-C", root, "--xattrs", "--xattrs-include=*",
                                "--acls", "--numeric-owner", "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        subprocess.run(["tar", "-C", dest, "--xattrs", "--xattrs-include=*", "--acls",
                        "--numeric-owner", "-xpf", "-"], stdin=tar.stdout, check=True)
        assert tar.wait() == 0


def fstab_root_and_swap(root: str) -> list[list[str]]:
    return [ln.split() for ln in read(root, "/etc/fstab").splitlines()
            if ln.strip() and not ln.startswith("#") and ln.split()[1] in ("/", "swap", "none")]
