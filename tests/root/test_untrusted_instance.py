"""A used instance is hostile: rename and import read it as untrusted data
and keep it out of every other user's reach while it is mounted.

The instances here are small hand-made disks (a partition table and an ext4
root holding just /etc) or dump streams of such a root: rename and import
need no more, and each case plants one trap where a file is read -- a FIFO
(a blocking open hangs), a device node (reading /dev/zero never ends), a
directory, a sparse 4 GiB file, links out of the instance or into a loop.
Each run must end within a bound, say what is wrong in its last lines, and
change nothing on the node; the leak check sees nothing left attached.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ganeti_debootstrap import backupstream
from tests.root import faultkit, scripts
from tests.root.scripts import ganeti_env, mounted_root, root_device, run_script

OLD, NEW = "ut1.example.org", "ut2.example.org"
HOSTS = f"127.0.0.1\tlocalhost\n127.0.1.1\t{OLD}\tut1\n"
# A run that hangs (a FIFO opened for reading) is killed and fails here.
DEADLINE_SECONDS = 60
HUGE_BYTES = 4 * 2**30
NOBODY = 65534

# The node's files a rename must never touch, whatever the instance links to.
NODE_FILES = ("/etc/hostname", "/etc/hosts", "/etc/mailname")


def plant(path: Path, kind: str) -> None:
    """Put the trap ``kind`` at ``path`` (inside an instance's tree)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x\n")
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(HUGE_BYTES)
    elif kind == "link-to-node":
        # Through the node's /proc, this is the node's own file.
        os.symlink(f"/proc/1/root{'/'.join(['', *path.parts[-2:]])}", path)
    elif kind == "link-climbing":
        os.symlink(f"../../..{'/'.join(['', *path.parts[-2:]])}", path)
    else:
        raise AssertionError(kind)


# What the last lines must say, beside the file's name.
TRAPS = {"fifo": "FIFO", "chardev": "character device", "directory": "directory",
         "huge": "4096.0 MiB", "link-to-node": "", "link-climbing": "symbolic links"}


def instance_tree(root: Path, traps: dict[str, str]) -> None:
    """An instance's /etc named OLD, with ``traps`` (file name -> kind) planted."""
    etc = root / "etc"
    etc.mkdir()
    files = {"hostname": f"{OLD}\n", "mailname": f"{OLD}\n", "hosts": HOSTS}
    for name, text in files.items():
        if name in traps:
            plant(etc / name, traps[name])
        else:
            (etc / name).write_text(text)
    for name, kind in traps.items():
        if name not in files:
            plant(etc / name, kind)


def small_instance(tmp_path: Path, populate: Callable[[Path], None]) -> str:
    """A 512 MiB sparse disk: an msdos table, partition 1 an ext4 root filled by ``populate``."""
    disk = scripts.sparse_disk(str(tmp_path), 512)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk],
                   input="start=2048, type=83\n", text=True, check=True)
    with root_device(disk, read_only=False) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
        with mounted_root(disk, read_only=False) as root:
            populate(Path(root))
    return disk


def stream_of(tmp_path: Path, populate: Callable[[Path], None]) -> str:
    """A dump(8) stream of an ext4 root filled by ``populate``, as export writes one."""
    src = tmp_path / "stream-src"
    src.mkdir()
    populate(src)
    image = tmp_path / "stream-fs.img"
    with open(image, "wb") as f:
        f.truncate(64 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(image)], check=True)
    stream = str(tmp_path / "stream.dump")
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        with open(stream, "wb") as out:
            subprocess.run(["dump", "-0", "-q", "-f", "-", dev], stdout=out, check=True,
                           stderr=subprocess.DEVNULL)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    image.unlink()
    return stream


def node_state() -> dict[str, tuple[int, int, bytes] | None]:
    out: dict[str, tuple[int, int, bytes] | None] = {}
    for path in NODE_FILES:
        try:
            st = os.lstat(path)
            out[path] = (st.st_ino, st.st_mtime_ns, Path(path).read_bytes())
        except FileNotFoundError:
            out[path] = None
    return out


def etc_state(disk: str) -> dict[str, tuple[int, int, bytes | str]]:
    """The instance's /etc entries: type, size and content (or link target)."""
    out: dict[str, tuple[int, int, bytes | str]] = {}
    with mounted_root(disk) as root:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, "etc")):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                content: bytes | str = b""
                if stat.S_ISLNK(st.st_mode):
                    content = os.readlink(path)
                elif stat.S_ISREG(st.st_mode) and st.st_size < 2**20:
                    content = Path(path).read_bytes()
                out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_size,
                                                    content)
    return out


def rename_env(disk: str, tmpdir: str) -> dict[str, str]:
    return ganeti_env(INSTANCE_NAME=NEW, OLD_INSTANCE_NAME=OLD, DISK_COUNT="1",
                      DISK_0_PATH=disk, TMPDIR=tmpdir)


def import_env(disk: str, tmpdir: str) -> dict[str, str]:
    return ganeti_env(INSTANCE_NAME=OLD, DISK_COUNT="1", DISK_0_PATH=disk,
                      IMPORT_INDEX="0", IMPORT_DISK_PATH=disk, IMPORT_DEVICE=disk,
                      TMPDIR=tmpdir)


@pytest.fixture
def os_tree(tmp_path):
    # rename and import need no bootstrap cache: a scratch one, empty.
    return scripts.make_os_tree(str(tmp_path / "os"), str(tmp_path / "var"))


@pytest.fixture
def scratch(tmp_path) -> str:
    path = tmp_path / "tmp"
    path.mkdir()
    return str(path)


def run_timed(tree, script: str, env: dict[str, str], **kwargs):
    started = time.monotonic()
    res = run_script(tree, script, env, check=False, timeout=DEADLINE_SECONDS, **kwargs)
    elapsed = time.monotonic() - started
    lines = res.stderr.decode(errors="replace").strip().splitlines()
    print(f"\nUNTRUSTED {script}: exit {res.returncode} in {elapsed:.1f} s; "
          f"last line: {lines[-1] if lines else ''}")
    return res, lines


# --- rename -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(TRAPS))
def test_rename_refuses_a_hostname_that_is_not_text_and_changes_nothing(
        os_tree, tmp_path, scratch, kind):
    disk = small_instance(tmp_path, lambda root: instance_tree(root, {"hostname": kind}))
    node_before, etc_before = node_state(), etc_state(disk)
    res, lines = run_timed(os_tree, "rename", rename_env(disk, scratch))
    assert res.returncode == 1
    tail = "\n".join(lines[-3:])
    assert "ERROR" in tail and "/etc/hostname" in tail and TRAPS[kind] in tail, tail
    assert "Internal error" not in tail
    assert node_state() == node_before
    assert etc_state(disk) == etc_before
    assert faultkit.mount_points_left(scratch) == []


@pytest.mark.parametrize("name", ["mailname", "hosts"])
@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory", "huge", "link-climbing"])
def test_rename_warns_about_an_optional_file_that_is_not_text_and_leaves_it(
        os_tree, tmp_path, scratch, name, kind):
    disk = small_instance(tmp_path, lambda root: instance_tree(root, {name: kind}))
    node_before, etc_before = node_state(), etc_state(disk)
    res, lines = run_timed(os_tree, "rename", rename_env(disk, scratch))
    assert res.returncode == 0, "\n".join(lines[-5:])
    warnings = [ln for ln in lines if "rename leaves it alone" in ln]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith(f"/etc/{name} in the instance "), warnings
    assert TRAPS[kind] in warnings[0]
    assert node_state() == node_before
    etc_after = etc_state(disk)
    assert etc_after[f"etc/{name}"] == etc_before[f"etc/{name}"]
    assert etc_after["etc/hostname"][2] == f"{NEW}\n".encode()
    assert faultkit.mount_points_left(scratch) == []


# --- import --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "chardev", "huge", "directory"])
def test_import_refuses_an_fstab_that_is_not_text(os_tree, tmp_path, scratch, kind):
    stream = stream_of(tmp_path, lambda root: instance_tree(root, {"fstab": kind}))
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    node_before = node_state()
    with open(stream, "rb") as inp:
        res, lines = run_timed(os_tree, "import", import_env(disk, scratch),
                               stdin=inp.fileno())
    assert res.returncode == 1
    tail = "\n".join(lines[-3:])
    assert "/etc/fstab" in tail and TRAPS[kind] in tail and "export and import" in tail, tail
    assert node_state() == node_before
    assert faultkit.mount_points_left(scratch) == []


def mounts_below(top: str) -> list[list[str]]:
    """The /proc/self/mounts lines of mounts below ``top``."""
    with open("/proc/self/mounts") as f:
        return [fields for fields in (line.split() for line in f)
                if fields[1].startswith(top.rstrip("/") + "/")]


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True)


@pytest.fixture
def world_tmpdir() -> Iterator[str]:
    """A TMPDIR every user may enter (as /tmp is), so that only our own
    directory can keep them out; pytest's directories are root-only."""
    path = tempfile.mkdtemp(prefix="gidb-world.", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    left = os.listdir(path)
    shutil.rmtree(path)
    assert left == [], f"left in TMPDIR: {left}"


def test_nobody_else_can_enter_the_instance_while_import_holds_it_mounted(
        os_tree, tmp_path, world_tmpdir):
    stream = stream_of(tmp_path, lambda root: instance_tree(root, {}))
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    read_fd, write_fd = os.pipe()
    run = faultkit.start(os_tree, "import", import_env(disk, world_tmpdir), stdin=read_fd)
    os.close(read_fd)
    # The stream's first KiB (import tells the stream's kind from it before
    # touching the disk), then the rest is held back: import mounts, then
    # waits in restore.
    with open(stream, "rb") as src:
        head = src.read(backupstream.PEEK_BYTES)
    os.write(write_fd, head)
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not mounts_below(world_tmpdir) and run.proc.poll() is None:
            assert time.monotonic() < deadline, "import never mounted the instance"
            time.sleep(0.05)
        found = mounts_below(world_tmpdir)
        assert len(found) == 1, (found, run.proc.poll())
        _, mount_point, fstype, options = found[0][:4]
        assert fstype == "ext4"
        assert {"nosuid", "nodev", "rw"} <= set(options.split(","))
        parent = os.path.dirname(mount_point)
        assert os.path.dirname(parent) == world_tmpdir
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
        # nobody reaches TMPDIR itself, and sees our directory there...
        listing = as_nobody("ls", world_tmpdir)
        assert listing.returncode == 0 and os.path.basename(parent) in listing.stdout
        # ...but neither the mounted instance nor what is inside it.
        for path in (mount_point, parent, os.path.join(mount_point, "etc")):
            denied = as_nobody("ls", path)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, path
        entered = as_nobody(scripts.PYTHON, "-c", "import os, sys; os.chdir(sys.argv[1])",
                            mount_point)
        assert entered.returncode != 0 and "PermissionError" in entered.stderr
    finally:
        writer = threading.Thread(target=_send, args=(stream, write_fd, len(head)),
                                  daemon=True)
        writer.start()
        try:
            status = run.proc.wait(timeout=DEADLINE_SECONDS)
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            writer.join(DEADLINE_SECONDS)
        err = run.proc.stderr.read().decode(errors="replace") if run.proc.stderr else ""
    assert status == 0, err[-3000:]
    assert mounts_below(world_tmpdir) == []
    with mounted_root(disk) as root:
        assert scripts.read(root, "/etc/hostname") == f"{OLD}\n"


def _send(stream: str, fd: int, offset: int = 0) -> None:
    """Write the stream (from byte ``offset``) to ``fd``, then close it (EPIPE
    if import died)."""
    try:
        with open(stream, "rb") as src, os.fdopen(fd, "wb") as dest:
            src.seek(offset)
            shutil.copyfileobj(src, dest)
    except BrokenPipeError:
        pass


# --- what each script mounts -------------------------------------------------------

def recording_mount(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose mount(8) logs its arguments, then mounts; and the log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "mount.log"
    script = bindir / "mount"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\nexec /bin/mount \"$@\"\n")
    script.chmod(0o755)
    return f"{bindir}:{scripts.GANETI_PATH}", log


def mount_calls(log: Path, scratch: str) -> list[str]:
    """The logged mounts of the instance root (not create's /proc... for hooks)."""
    if not log.exists():
        return []
    return [line.replace(scratch, "TMP") for line in log.read_text().splitlines()
            if line.split()[-1].endswith("/root")]


def test_rename_and_import_mount_nosuid_nodev_with_the_type_given(os_tree, tmp_path,
                                                                  scratch):
    path, log = recording_mount(tmp_path)
    disk = small_instance(tmp_path, lambda root: instance_tree(root, {}))
    res, lines = run_timed(os_tree, "rename", dict(rename_env(disk, scratch), PATH=path))
    assert res.returncode == 0, lines[-5:]
    calls = mount_calls(log, scratch)
    assert len(calls) == 1
    assert re.fullmatch(r"-t ext4 -o nosuid,nodev /dev/loop\d+ "
                        r"TMP/ganeti-debootstrap\.\w+/root", calls[0]), calls
    log.unlink()
    stream = stream_of(tmp_path, lambda root: instance_tree(root, {}))
    new_disk = scripts.sparse_disk(str(tmp_path), 1024, "new.img")
    with open(stream, "rb") as inp:
        res, lines = run_timed(os_tree, "import",
                               dict(import_env(new_disk, scratch), PATH=path,
                                    OSP_FILESYSTEM="ext3"), stdin=inp.fileno())
    assert res.returncode == 0, lines[-5:]
    calls = mount_calls(log, scratch)
    assert len(calls) == 1
    assert re.fullmatch(r"-t ext3 -o nosuid,nodev /dev/loop\d+ "
                        r"TMP/ganeti-debootstrap\.\w+/root", calls[0]), calls


def test_create_mounts_with_the_type_given_inside_a_private_directory(tree, tmp_path,
                                                                     scratch):
    path, log = recording_mount(tmp_path)
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    run_script(tree, "create", scripts.create_env(OLD, disk, PATH=path, TMPDIR=scratch,
                                                  OSP_FILESYSTEM="ext4"))
    calls = mount_calls(log, scratch)
    assert len(calls) == 1
    assert re.fullmatch(r"-t ext4 /dev/loop\d+ TMP/ganeti-debootstrap\.\w+/root",
                        calls[0]), calls
    assert faultkit.mount_points_left(scratch) == []


def test_export_mounts_nothing_and_reads_no_file_of_the_instance(os_tree, tmp_path,
                                                                 scratch):
    # Every trap at once: dump copies them as they are, opening none.
    traps = {"hostname": "fifo", "mailname": "chardev", "hosts": "huge",
             "fstab": "directory", "os-release": "link-to-node"}
    disk = small_instance(tmp_path, lambda root: instance_tree(root, traps))
    bindir = tmp_path / "trap"
    bindir.mkdir()
    canary = tmp_path / "canary"
    for tool in ("mount", "umount"):
        (bindir / tool).write_text(f"#!/bin/sh\necho {tool} >> {canary}\nexit 1\n")
        (bindir / tool).chmod(0o755)
    stream = tmp_path / "out.dump"
    env = ganeti_env(INSTANCE_NAME=OLD, DISK_COUNT="1", DISK_0_PATH=disk,
                     EXPORT_INDEX="0", EXPORT_DISK_PATH=disk, EXPORT_DEVICE=disk,
                     TMPDIR=scratch, PATH=f"{bindir}:{scripts.GANETI_PATH}")
    with open(stream, "wb") as out:
        res, lines = run_timed(os_tree, "export", env, stdout=out.fileno())
    assert res.returncode == 0, lines[-5:]
    assert not canary.exists()
    listing = subprocess.run(["restore", "-t", "-f", str(stream)], capture_output=True,
                             text=True, check=True).stdout
    for name in traps:
        assert f"./etc/{name}\n" in listing
