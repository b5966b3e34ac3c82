"""Faults: scripts interrupted at every phase, killed outright, starved of
space or network; hooks that hang or leave processes; disks in use.

Ganeti cancels jobs with signals and runs these scripts as root on
production nodes: whatever happens, the node must not be left worse than
it was. After every interrupted or failed run this checks that nothing is
left: no mount, no loop device (or loop device over one), no temporary
mount point, no temporary or staging file in the cache, no held lock, and
no process the run started (tests/root/faultkit.py tags them).

Phases are reached with GIDB_TEST_PAUSE_AT (the script waits at the start of
the named phase, see log.phase) or by waiting until the command of a phase
runs (tar, mke2fs, restore, dump, a hook's sleep, the bootstrap waiting on
a proxy that never answers).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ganeti_debootstrap import blockdev
from tests.root import faultkit, scripts
from tests.root.bootstrap_fixture import default_key
from tests.root.faultkit import Background
from tests.root.scripts import OSTree, create_env, ganeti_env, mounted_root, read

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


@dataclass
class Scene:
    """One test's OS installation, instance disk and scratch directories."""

    tree: OSTree
    disk: str
    scope: str  # the test's directory: every mount and loop device of the run is below it
    tmpdir: str  # the scripts' TMPDIR (temporary mount points)
    results: list[str] = field(default_factory=list)

    def env(self, script: str = "create", name: str = "fault1.example.org",
            **extra: str) -> dict[str, str]:
        if script == "create":
            return create_env(name, self.disk, TMPDIR=self.tmpdir, **extra)
        prefix = script.upper()
        return ganeti_env(INSTANCE_NAME=name, DISK_COUNT="1", DISK_0_PATH=self.disk,
                          TMPDIR=self.tmpdir, **{f"{prefix}_INDEX": "0",
                                                  f"{prefix}_DISK_PATH": self.disk},
                          **extra)

    def left(self, run: Background) -> faultkit.Leftovers:
        return faultkit.leftovers(run, scope=self.scope, tmpdir=self.tmpdir,
                                  cache_dir=self.tree.cache_dir)


def make_scene(tmp_path, localstatedir: str, disk_mib: int = 1024) -> Scene:
    tree = scripts.make_os_tree(str(tmp_path / "os"), localstatedir)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    return Scene(tree, scripts.sparse_disk(str(tmp_path), disk_mib), str(tmp_path),
                 str(tmpdir))


@pytest.fixture
def scene(tmp_path, bootstrapped_localstatedir) -> Scene:
    return make_scene(tmp_path, bootstrapped_localstatedir)


def private_cache(tmp_path, shared_localstatedir: str) -> str:
    """A localstatedir whose cache holds the shared archive but no filesystem
    image (so create makes one), by hard links: nothing is copied."""
    var = tmp_path / "var"
    cache_dir = var / "cache" / "ganeti-instance-debootstrap"
    cache_dir.mkdir(parents=True)
    shared = os.path.join(shared_localstatedir, "cache", "ganeti-instance-debootstrap")
    stem = default_stem()
    for suffix in (".tar", ".inputs.json"):
        os.link(os.path.join(shared, stem + suffix), cache_dir / (stem + suffix))
    return str(var)


@functools.cache
def default_stem() -> str:
    """The file name stem of the default settings' cache entry."""
    return default_key().stem


def real_cache_files(cache_dir: str) -> dict[str, tuple[int, int]]:
    """The default key's cache files under their real names, with size and
    mtime (other keys may come and go: other test sessions share the cache)."""
    found = {}
    stem = default_stem()
    for name in sorted(os.listdir(cache_dir)):
        if (not name.startswith(stem + ".") or faultkit.CACHE_TEMPORARY.search(name)
                or name.endswith(".lock")):
            continue
        st = os.stat(os.path.join(cache_dir, name))
        found[name] = (st.st_size, st.st_mtime_ns)
    return found


def report(line: str) -> None:
    """One line of the fault matrix, shown with pytest -s (and in -rA reports)."""
    print(f"\nMATRIX {line}")


# --- where a run is interrupted ------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """A point in a script's run: the start of a phase, or a command running."""

    id: str
    pause: str = ""  # GIDB_TEST_PAUSE_AT
    command: str = ""  # or: interrupt once this command runs
    settings: str = ""
    hook: str = ""
    private_cache: bool = False  # a cache without filesystem image: create makes it
    # What the run must hold at that point, proving it is a point worth testing:
    # "lock" (the cache key's), "loops", "mounts", "api" (/proc... in the
    # instance too), "temporaries" (in the cache directory).
    holds: tuple[str, ...] = ()


CREATE_POINTS = [
    Point("check-disk", pause="check disk", holds=("lock",)),
    Point("partition", pause="partition", holds=("lock",)),
    Point("image-copy", pause="copy filesystem image", holds=("lock",)),
    Point("after-attach", pause="make filesystems", holds=("lock", "loops")),
    Point("unpack-start", pause="install system", settings='CACHE_IMAGE="no"\n',
          holds=("lock", "loops", "mounts")),
    Point("mid-unpack", command="tar", settings='CACHE_IMAGE="no"\n',
          holds=("lock", "loops", "mounts")),
    Point("configure", pause="configure instance", holds=("loops", "mounts")),
    Point("hooks-start", pause="hooks", hook="exit 0\n", holds=("loops", "mounts")),
    Point("mid-hook", command="sleep", hook="sleep 600\n", holds=("loops", "api")),
    Point("unmount", pause="unmount and release", holds=("loops", "mounts")),
    Point("image-build-start", pause="filesystem image", private_cache=True,
          holds=("lock",)),
    Point("mid-image-build", command="mke2fs", private_cache=True,
          holds=("lock", "temporaries")),
]


def reach(run: Background, point: Point) -> None:
    """Wait until ``run`` is at ``point``."""
    if point.pause:
        run.wait_for(rf"^PAUSED {point.pause}")
    else:
        faultkit.child_running(run, point.command)
        # Let the command get going (tar writing files, mke2fs its image).
        time.sleep(0.3)


def check_holds(scene: Scene, run: Background, point: Point) -> faultkit.Leftovers:
    held = scene.left(run)
    checks = {
        "lock": bool(held.held_locks),
        "loops": bool(held.loops),
        "mounts": bool(held.mounts),
        "api": len(held.mounts) >= 5,
        "temporaries": bool(held.cache_temporaries),
    }
    missing = [h for h in point.holds if not checks[h]]
    assert not missing, f"at {point.id} the run should hold {missing}: {held}"
    return held


def interrupt(scene: Scene, run: Background, signum: int, what: str) -> None:
    """Signal ``run``; it must exit at once with the signal's status and leave nothing."""
    sent = run.signal(signum)
    status = run.wait()
    took = time.monotonic() - sent
    left = scene.left(run)
    report(f"{what} {signal.Signals(signum).name}: exit {status} after {took:.2f} s, "
           f"{left.count()} left")
    try:
        assert status == 128 + signum, run.stderr[-3000:]
        assert f"interrupted by {signal.Signals(signum).name}" in run.last_line
        assert not left, f"left behind: {left}"
    finally:
        faultkit.release_leftovers(left)


def prepare(scene: Scene, point: Point, tmp_path, shared: str) -> None:
    if point.private_cache:
        scene.tree = OSTree(scene.tree.sysconfdir, private_cache(tmp_path, shared),
                            scene.tree.os_dir)
    scene.tree.settings(point.settings)
    if point.hook:
        scene.tree.hook("10-hook", point.hook)


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("point", CREATE_POINTS, ids=lambda p: p.id)
def test_interrupted_create_stops_at_once_and_leaves_nothing(scene, tmp_path, point, signum,
                                                             bootstrapped_localstatedir):
    prepare(scene, point, tmp_path, bootstrapped_localstatedir)
    run = faultkit.start(scene.tree, "create", scene.env(), pause_at=point.pause)
    reach(run, point)
    # (Taken here: in a fresh test session, the first create makes the
    # shared cache's filesystem image before its first phase.)
    cache_before = real_cache_files(scene.tree.cache_dir)
    check_holds(scene, run, point)
    interrupt(scene, run, signum, f"create {point.id}")
    if not point.private_cache:
        # The shared cache is exactly as it was.
        assert real_cache_files(scene.tree.cache_dir) == cache_before
    else:
        # A half-made image never appears under its real name.
        assert not [n for n in os.listdir(scene.tree.cache_dir) if n.endswith(".img")]


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("tool", ["mmdebstrap", "debootstrap"])
def test_create_interrupted_while_bootstrapping_leaves_nothing(scene, tool, signum):
    # Other inputs than the session's cache: this create must bootstrap. The
    # proxy accepts the download and never answers, so the tool waits there.
    cache_before = real_cache_files(scene.tree.cache_dir)
    with faultkit.stalling_proxy() as (proxy, connected):
        scene.tree.settings(f'EXTRA_PKGS="hello"\nBOOTSTRAP_TOOL="{tool}"\nPROXY="{proxy}"\n')
        run = faultkit.start(scene.tree, "create", scene.env())
        run.wait_for("^Bootstrapping")
        assert connected.wait(60), "the bootstrap never reached the proxy"
        faultkit.child_running(run, tool)
        check_holds(scene, run, Point("bootstrap", holds=("lock", "loops", "mounts")))
        interrupt(scene, run, signum, f"create mid-bootstrap ({tool})")
    assert real_cache_files(scene.tree.cache_dir) == cache_before
    assert not [n for n in os.listdir(scene.tree.cache_dir) if "hello" in n]


# --- import and export -----------------------------------------------------------------

@dataclass(frozen=True)
class Backup:
    disk: str  # an instance made by create
    stream: str  # its export


@pytest.fixture(scope="module")
def backup(tmp_path_factory, bootstrapped_localstatedir) -> Backup:
    base = tmp_path_factory.mktemp("backup")
    tree = scripts.make_os_tree(str(base / "os"), bootstrapped_localstatedir)
    disk = scripts.sparse_disk(str(base), 1024)
    scripts.run_script(tree, "create", create_env("bk1.example.org", disk))
    stream = str(base / "bk1.dump")
    with open(stream, "wb") as out:
        scripts.run_script(tree, "export", ganeti_env(
            INSTANCE_NAME="bk1.example.org", EXPORT_INDEX="0", EXPORT_DISK_PATH=disk),
            stdout=out.fileno())
    return Backup(disk, stream)


IMPORT_POINTS = [
    Point("check-disk", pause="check disk"),
    Point("partition", pause="partition"),
    Point("after-attach", pause="make filesystems", holds=("loops",)),
    Point("restore-start", pause="restore", holds=("loops", "mounts")),
    Point("mid-restore", command="restore", holds=("loops", "mounts")),
    Point("adapt", pause="adapt instance", holds=("loops", "mounts")),
]


@contextlib.contextmanager
def stalled_stream(path: str, first_bytes: int) -> Iterator[int]:
    """A pipe giving the first bytes of ``path`` and then nothing (a stalled sender)."""
    read_fd, write_fd = os.pipe()
    try:
        with open(path, "rb") as f:
            data = f.read(first_bytes)
        # Fits the pipe once enlarged: written at once, never blocking us.
        import fcntl
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, len(data))
        os.write(write_fd, data)
        yield read_fd
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("point", IMPORT_POINTS, ids=lambda p: p.id)
def test_interrupted_import_stops_at_once_and_leaves_nothing(scene, backup, point, signum):
    with contextlib.ExitStack() as stack:
        if point.command:
            stdin = stack.enter_context(stalled_stream(backup.stream, 1 << 20))
        else:
            stdin = stack.enter_context(open(backup.stream, "rb")).fileno()
        run = faultkit.start(scene.tree, "import", scene.env("import"),
                             pause_at=point.pause, stdin=stdin)
        reach(run, point)
        check_holds(scene, run, point)
        interrupt(scene, run, signum, f"import {point.id}")


def test_import_killed_mid_restore_leaves_no_restore_and_a_releasable_disk(scene, backup):
    # restore runs in its own process group and mount namespace: import
    # killed outright cannot stop it, so it must die with import, or its
    # namespace would keep the new filesystem (and the loop devices) busy.
    with stalled_stream(backup.stream, 1 << 20) as stdin:
        run = faultkit.start(scene.tree, "import", scene.env("import"), stdin=stdin)
        restore = faultkit.child_running(run, "restore")
        time.sleep(0.3)
        run.signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{restore}") and time.monotonic() < deadline:
            time.sleep(0.02)
    left = scene.left(run)
    report(f"import mid-restore SIGKILL: {left.count()} left for the test to release "
           f"({len(left.mounts)} mounts, {len(left.loops)} loop devices, "
           f"{len(left.processes)} processes)")
    try:
        assert not left.processes, left
        assert left.mounts and left.loops  # what only the script could release
    finally:
        faultkit.release_leftovers(left)
    # Released by name like any other mount: nothing of restore holds the disk.
    assert not scene.left(run)


EXPORT_POINTS = [
    Point("open-disk", pause="open disk"),
    Point("dump-start", pause="dump", holds=("loops",)),
    Point("mid-dump", command="dump", holds=("loops",)),
]


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("point", EXPORT_POINTS, ids=lambda p: p.id)
def test_interrupted_export_stops_at_once_and_leaves_nothing(scene, backup, point, signum):
    scene.disk = backup.disk
    scene.scope = os.path.dirname(backup.disk)
    # Nobody reads the stream: dump blocks writing it, as behind a stalled receiver.
    read_fd, write_fd = os.pipe()
    try:
        run = faultkit.start(scene.tree, "export", scene.env("export"),
                             pause_at=point.pause, stdout=write_fd)
        reach(run, point)
        check_holds(scene, run, point)
        interrupt(scene, run, signum, f"export {point.id}")
    finally:
        os.close(read_fd)
        os.close(write_fd)


# --- SIGKILL: no cleanup possible, the next run must still work ------------------------

# Commands that write to a disk or attach one.
WRITING_COMMANDS = ("wipefs", "sfdisk", "mke2fs", "mkswap", "losetup", "partx", "kpartx",
                    "resize2fs", "tune2fs", "tar", "restore", "mount")

KILL_POINTS = [p for p in CREATE_POINTS
               if p.id in ("after-attach", "mid-unpack", "mid-hook", "mid-image-build")]


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: p.id)
def test_after_sigkill_the_next_create_works(scene, tmp_path, point,
                                             bootstrapped_localstatedir):
    prepare(scene, point, tmp_path, bootstrapped_localstatedir)
    run = faultkit.start(scene.tree, "create", scene.env(), pause_at=point.pause)
    reach(run, point)
    check_holds(scene, run, point)
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    left = scene.left(run)
    report(f"create {point.id} SIGKILL: {left.count()} left for the test to release "
           f"({len(left.mounts)} mounts, {len(left.loops)} loop devices, "
           f"{len(left.processes)} processes, {len(left.cache_temporaries)} cache "
           f"temporaries)")
    try:
        # The lock dies with its holder: the next run does not wait for it.
        assert not left.held_locks
        # Nothing half-made under a real name in the cache.
        for name in os.listdir(scene.tree.cache_dir):
            if name.endswith(".img"):
                assert os.path.exists(os.path.join(scene.tree.cache_dir, name + ".json"))
        if left.mounts:
            # Still mounted: the next create must refuse the disk without
            # touching it. (Its contents cannot be compared: the kernel keeps
            # writing back to a mounted filesystem, and ext4 zeroes inode
            # tables in the background.) Every command is logged at
            # DEBUG_LEVEL=1: none of them may write to a disk.
            res = scripts.run_script(scene.tree, "create", scene.env(DEBUG_LEVEL="1"),
                                     check=False)
            log = res.stderr.decode()
            assert res.returncode == 1
            last = log.strip().splitlines()[-1]
            assert scene.disk in last and "in use" in last
            assert not writing_commands(log), log
    finally:
        # What SIGKILL leaves cannot be released by the script: the test does
        # it, by name, for what this run made only.
        faultkit.release_leftovers(left)
    assert not faultkit.tagged_processes(run.tag)
    if point.hook:
        scene.tree.hook("10-hook", "exit 0\n")
    again = faultkit.start(scene.tree, "create", scene.env())
    assert again.wait(120) == 0, again.stderr[-3000:]
    assert "Waiting for another run" not in again.stderr
    assert not scene.left(again)
    with mounted_root(scene.disk) as root:
        assert read(root, "/etc/hostname") == "fault1.example.org\n"
        assert not os.path.exists(os.path.join(root, "usr/sbin/policy-rc.d"))


# A stand-in for mmdebstrap that "bootstraps" by unpacking the session's
# archive: the cache is then stored for real (tar --create into a temporary
# name), in seconds instead of a real bootstrap's minute.
FAKE_BOOTSTRAP = """#!/bin/sh
for arg do dest=$arg; done
exec tar --extract --numeric-owner --preserve-permissions --file {archive} --directory "$dest"
"""


# tar, except that a finished --create stays running: the store is then
# caught after writing its archive and before renaming it into place.
STALLED_STORE = """#!/bin/sh
/bin/tar "$@" || exit
case " $* " in *" --create "*) exec sleep 600 ;; esac
"""


def fake_bootstrap(tmp_path, shared_localstatedir: str, stalled_store: bool = False) -> str:
    """A directory holding the stand-in mmdebstrap (and tar), to put first in PATH."""
    shared = os.path.join(shared_localstatedir, "cache", "ganeti-instance-debootstrap")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "mmdebstrap").write_text(
        FAKE_BOOTSTRAP.format(archive=os.path.join(shared, default_stem() + ".tar")))
    (fake_bin / "mmdebstrap").chmod(0o755)
    tar = fake_bin / "tar"
    if stalled_store:
        tar.write_text(STALLED_STORE)
        tar.chmod(0o755)
    elif tar.exists():
        tar.unlink()
    return str(fake_bin)


# losetup, except that an attach stays running after the kernel gave it the
# device: the script is caught after the attach and before it read the
# device's name.
STALLED_ATTACH = """#!/bin/sh
case " $* " in
*" --find "*) {losetup} "$@" || exit; exec sleep 600 ;;
esac
exec {losetup} "$@"
"""


@pytest.mark.parametrize("signum", SIGNALS)
def test_interrupted_while_attaching_a_loop_device_detaches_it(scene, tmp_path, signum):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    losetup = shutil.which("losetup", path=scripts.GANETI_PATH)
    assert losetup
    (fake_bin / "losetup").write_text(STALLED_ATTACH.format(losetup=losetup))
    (fake_bin / "losetup").chmod(0o755)
    run = faultkit.start(scene.tree, "create",
                         scene.env(PATH=f"{fake_bin}:{scripts.GANETI_PATH}"))
    faultkit.child_running(run, "sleep", timeout=60)
    # The disk file has its loop device, whose name create has not read.
    assert blockdev.loops_backed_by(scene.disk), run.stderr[-2000:]
    interrupt(scene, run, signum, "create while attaching a loop device")
    assert blockdev.loops_backed_by(scene.disk) == set()


def test_sigkill_while_storing_the_cache_never_leaves_a_partial_archive(
        scene, tmp_path, bootstrapped_localstatedir):
    var = tmp_path / "var"
    var.mkdir()
    scene.tree = OSTree(scene.tree.sysconfdir, str(var), scene.tree.os_dir)
    scene.tree.settings('BOOTSTRAP_TOOL="mmdebstrap"\n')
    env = scene.env(PATH=f"{fake_bootstrap(tmp_path, bootstrapped_localstatedir, True)}:"
                         f"{scripts.GANETI_PATH}")
    run = faultkit.start(scene.tree, "create", env)
    faultkit.child_running(run, "sleep", timeout=120)  # tar --create has written
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    left = scene.left(run)
    cache_dir = scene.tree.cache_dir
    names = sorted(os.listdir(cache_dir))
    report(f"create SIGKILL while storing the cache: cache holds {names}; "
           f"{left.count()} left for the test to release")
    try:
        assert [n for n in names if ".tar.tmp-" in n], names  # it was storing
        assert not [n for n in names if n.endswith((".tar", ".inputs.json"))], names
        assert not left.held_locks
    finally:
        faultkit.release_leftovers(left)
    fake_bootstrap(tmp_path, bootstrapped_localstatedir)  # tar as it is
    again = faultkit.start(scene.tree, "create", env)
    assert again.wait(120) == 0, again.stderr[-3000:]
    assert "left by an interrupted run" in again.stderr
    assert "Waiting for another run" not in again.stderr
    assert faultkit.cache_temporaries(cache_dir) == []
    assert [n for n in os.listdir(cache_dir) if n.endswith(".tar")] == [default_stem() + ".tar"]
    assert not scene.left(again)


def test_full_cache_filesystem_while_storing_the_cache_still_creates_the_instance(
        scene, tmp_path, bootstrapped_localstatedir):
    with small_filesystem(tmp_path / "var", "60M") as var:
        scene.tree = OSTree(scene.tree.sysconfdir, var, scene.tree.os_dir)
        scene.tree.settings('BOOTSTRAP_TOOL="mmdebstrap"\n')
        env = scene.env(PATH=f"{fake_bootstrap(tmp_path, bootstrapped_localstatedir)}:"
                             f"{scripts.GANETI_PATH}")
        run = faultkit.start(scene.tree, "create", env)
        status = run.wait(120)
        left = scene.left(run)
        names = sorted(os.listdir(scene.tree.cache_dir))
    report(f"create with a full cache filesystem while storing the cache: exit {status}; "
           f"cache holds {names}")
    assert status == 0, run.stderr[-3000:]
    assert "Could not store the bootstrap cache" in run.stderr
    assert names == []  # no partial archive, no inputs file, no lock
    assert not [m for m in left.mounts if not m.endswith("/var")] and not left.loops
    with mounted_root(scene.disk) as root:
        assert read(root, "/etc/hostname") == "fault1.example.org\n"


def test_leftovers_of_a_killed_cache_store_are_removed_by_the_next_run(
        scene, tmp_path, bootstrapped_localstatedir):
    var = private_cache(tmp_path, bootstrapped_localstatedir)
    scene.tree = OSTree(scene.tree.sysconfdir, var, scene.tree.os_dir)
    # Unpacking the archive: whatever the next run does with the cache, it
    # removes every temporary of its key.
    scene.tree.settings('CACHE_IMAGE="no"\n')
    cache_dir = scene.tree.cache_dir
    stem = default_stem()
    # What a run killed while storing or imaging the cache leaves: a partial
    # archive, an inputs file, a staging tree, a partial image, and the lock.
    with open(os.path.join(cache_dir, stem + ".tar.tmp-k1ll3d"), "wb") as f:
        f.write(b"\0" * 4096)
    with open(os.path.join(cache_dir, stem + ".inputs.json.tmp-k1ll3d"), "w") as f:
        f.write("{")
    os.makedirs(os.path.join(cache_dir, stem + ".staging-k1ll3d", "root", "etc"))
    with open(os.path.join(cache_dir, stem + ".ext4.img.tmp-k1ll3d"), "wb") as f:
        f.truncate(2**20)
    open(os.path.join(cache_dir, stem + ".lock"), "w").close()
    run = faultkit.start(scene.tree, "create", scene.env())
    assert run.wait(120) == 0, run.stderr[-3000:]
    assert "Waiting for another run" not in run.stderr
    assert faultkit.cache_temporaries(cache_dir) == []
    assert not scene.left(run)


# --- full disks --------------------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(path, size: str) -> Iterator[str]:
    """A tmpfs of ``size`` mounted on ``path`` (a directory the test made)."""
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "gidb-small",
                    str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("how", ["image", "archive"])
def test_instance_storage_running_full_fails_clearly_and_releases_everything(
        scene, tmp_path, how):
    # A thin disk: 1 GiB announced, 100 MiB of room under it (a thin pool or
    # a disk file's filesystem running full while the system is written).
    with small_filesystem(tmp_path / "thin", "100M") as thin:
        scene.disk = scripts.sparse_disk(thin, 1024)
        scene.tree.settings('CACHE_IMAGE="no"\n' if how == "archive" else "")
        run = faultkit.start(scene.tree, "create", scene.env())
        status = run.wait(120)
        left = scene.left(run)
        faultkit.release_leftovers(
            faultkit.Leftovers(**{**vars(left), "mounts": [m for m in left.mounts
                                                            if m != thin]}))
        report(f"create onto full storage ({how}): exit {status}, "
               f"{left.count() - 1} left; last line: {run.last_line[:160]}")
        assert status == 1, run.stderr[-3000:]
        assert scene.disk in run.last_line
        assert ("No space left" in run.last_line or "refused writes" in run.last_line)
        assert [m for m in left.mounts if m != thin] == [] and not left.loops
        assert not left.processes and not left.mount_points and not left.held_locks


def test_full_cache_filesystem_while_making_the_image_falls_back_to_the_archive(
        scene, tmp_path, bootstrapped_localstatedir):
    shared = os.path.join(bootstrapped_localstatedir, "cache", "ganeti-instance-debootstrap")
    stem = default_stem()
    archive_mib = os.path.getsize(os.path.join(shared, stem + ".tar")) // 2**20
    # Room for the archive, not for the tree the image is made from.
    with small_filesystem(tmp_path / "var", f"{archive_mib + 40}M") as var:
        cache_dir = os.path.join(var, "cache", "ganeti-instance-debootstrap")
        os.makedirs(cache_dir)
        for suffix in (".tar", ".inputs.json"):
            shutil.copy2(os.path.join(shared, stem + suffix), cache_dir)
        scene.tree = OSTree(scene.tree.sysconfdir, var, scene.tree.os_dir)
        run = faultkit.start(scene.tree, "create", scene.env())
        status = run.wait(120)
        left = scene.left(run)
        names = sorted(os.listdir(cache_dir))
    report(f"create with a full cache filesystem: exit {status}; cache holds {names}")
    assert status == 0, run.stderr[-3000:]
    assert "Cannot use a filesystem image of the cache" in run.stderr
    assert "Unpacking the cache" in run.stderr
    assert not [n for n in names if ".img" in n or faultkit.CACHE_TEMPORARY.search(n)]
    assert not [m for m in left.mounts if not m.endswith("/var")] and not left.loops
    with mounted_root(scene.disk) as root:
        assert read(root, "/etc/hostname") == "fault1.example.org\n"


# --- the bootstrap fails ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["unknown-suite-mmdebstrap", "unknown-suite-debootstrap",
                                  "no-network", "bad-mirror"])
def test_failed_bootstrap_is_explained_and_leaves_nothing(scene, case):
    closed = faultkit.closed_port()
    text = {
        "unknown-suite-mmdebstrap": 'SUITE="nosuchrelease"\nBOOTSTRAP_TOOL="mmdebstrap"\n',
        "unknown-suite-debootstrap": 'SUITE="nosuchrelease"\nBOOTSTRAP_TOOL="debootstrap"\n',
        "no-network": f'EXTRA_PKGS="hello"\nPROXY="{closed}"\n',
        "bad-mirror": f'EXTRA_PKGS="hello"\nMIRROR="{closed}/debian"\n',
    }[case]
    scene.tree.settings(text)
    before = sorted(os.listdir(scene.tree.cache_dir))
    run = faultkit.start(scene.tree, "create", scene.env())
    status = run.wait(180)
    left = scene.left(run)
    report(f"create, bootstrap fails ({case}): exit {status}, {left.count()} left; "
           f"last line: {run.last_line[:200]}")
    assert status == 1, run.stderr[-3000:]
    expected = {"unknown-suite-mmdebstrap": "nosuchrelease",
                "unknown-suite-debootstrap": "nosuchrelease",
                "no-network": "PROXY", "bad-mirror": "MIRROR"}[case]
    assert expected in run.last_line
    assert not left, left
    # Nothing was cached for these inputs, not even a lock file.
    assert sorted(os.listdir(scene.tree.cache_dir)) == before


# --- hooks that hang or leave processes ---------------------------------------------------

def test_hung_hook_is_stopped_after_hook_timeout(scene):
    scene.tree.settings('HOOK_TIMEOUT="2"\n')
    scene.tree.hook("10-hangs", "sleep 600\n")
    start = time.monotonic()
    run = faultkit.start(scene.tree, "create", scene.env())
    status = run.wait(60)
    took = time.monotonic() - start
    left = scene.left(run)
    report(f"create, hook hangs (HOOK_TIMEOUT=2): exit {status} after {took:.1f} s, "
           f"{left.count()} left")
    assert status == 1
    assert "10-hangs" in run.last_line
    assert "did not finish within 2 s" in run.stderr
    assert took < 2 + 15
    assert not left, left


@pytest.mark.parametrize("how,body", [
    ("background", 'cd "$TARGET"; sleep 600 &\n'),
    ("setsid-in-target", 'cd "$TARGET"; setsid sleep 600 </dev/null >/dev/null 2>&1 &\n'),
    ("setsid-elsewhere", 'cd /; setsid sleep 600 &\n'),
    ("chrooted-daemon", 'chroot "$TARGET" sh -c "sleep 600 </dev/null >/dev/null 2>&1 &"\n'),
])
def test_hook_leaving_a_process_is_reported_by_name_and_cleaned_up(scene, how, body):
    scene.tree.hook("10-starts-something", body)
    run = faultkit.start(scene.tree, "create", scene.env())
    status = run.wait(60)
    left = scene.left(run)
    report(f"create, hook leaves a process ({how}): exit {status}, {left.count()} left; "
           f"last line: {run.last_line[:200]}")
    assert status == 1, run.stderr[-3000:]
    assert "10-starts-something left processes running: sleep (pid " in run.last_line
    assert not left, left


# --- disks in use ----------------------------------------------------------------------------

@contextlib.contextmanager
def attached(path: str, *extra: str) -> Iterator[str]:
    dev = subprocess.run(["losetup", "--find", "--show", *extra, path], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


@contextlib.contextmanager
def mounted(dev: str, where) -> Iterator[None]:
    os.makedirs(where)
    subprocess.run(["mount", dev, str(where)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def made(scene) -> Scene:
    """The scene's disk holds an instance (msdos table, ext4 root)."""
    scripts.run_script(scene.tree, "create", scene.env())
    return scene


def refused(scene: Scene, disk_path: str, what: str) -> str:
    """Run create on ``disk_path``; it must fail naming it, and write nothing.

    The disk holds an instance, whose contents the kernel may still change
    (ext4 zeroes inode tables in the background while it is mounted, and
    another test session's new mount namespace can keep a copy of a mount
    alive): what is checked is that create ran no command that writes to or
    attaches a disk (DEBUG_LEVEL=1 logs every command).
    """
    res = scripts.run_script(scene.tree, "create",
                             create_env("other.example.org", disk_path, TMPDIR=scene.tmpdir,
                                        DEBUG_LEVEL="1"), check=False)
    log = res.stderr.decode()
    last = log.strip().splitlines()[-1]
    report(f"create on a disk in use ({what}): exit {res.returncode}; last line: {last[:200]}")
    assert res.returncode == 1
    assert disk_path in last
    assert not writing_commands(log), log
    return last


def writing_commands(log: str) -> list[str]:
    """The commands a DEBUG_LEVEL=1 log shows that write to or attach a disk."""
    return [ln for ln in log.splitlines()
            if ln.startswith("running: ") and ln.split()[1] in WRITING_COMMANDS]


def test_disk_file_whose_root_is_mounted_is_refused(made, tmp_path):
    with mounted_root(made.disk):
        assert "is mounted on" in refused(made, made.disk, "file, root mounted")


def test_disk_file_open_in_a_process_is_refused_naming_it(made):
    with open(made.disk, "rb") as f:
        holder = subprocess.Popen(["sleep", "600"], stdin=f)
    try:
        last = refused(made, made.disk, "file open in a process")
        assert f"sleep (pid {holder.pid})" in last
    finally:
        holder.kill()
        holder.wait()


def test_block_disk_whose_partition_is_mounted_is_refused(made, tmp_path):
    with attached(made.disk) as dev:
        subprocess.run(["partx", "-a", dev], check=True)
        try:
            with mounted(dev + "p1", tmp_path / "mnt"):
                assert "is mounted on" in refused(made, dev, "partition of a mounted disk")
                assert "is mounted on" in refused(made, dev + "p1", "mounted partition")
        finally:
            subprocess.run(["partx", "-d", dev], check=True)


def test_block_disk_held_exclusively_is_refused(made):
    with attached(made.disk) as dev:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            assert "in use" in refused(made, dev, "held exclusively")
        finally:
            os.close(fd)
