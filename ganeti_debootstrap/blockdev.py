"""The instance's disks: checks before touching them, size, loop devices.

Ganeti hands us a block device (LVM, DRBD, ...) or, for file-based disk
templates, a regular file that must be attached to a loop device first.
Before anything is written the disk is checked: a wrong path in a variable
must not end in a node's own disk being partitioned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from . import mounts, procs, runner
from .errors import CommandError, DiskError
from .log import failure_logged, released

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# The smallest disk a Debian root fits on with room to spare: the shell
# edition refused anything smaller, and administrators know this number.
MIN_DISK_MIB = 512

SYS_DEV_BLOCK = "/sys/dev/block"
SYS_BLOCK = "/sys/block"
PROC_SWAPS = "/proc/swaps"

# losetup -d fails with EBUSY on old kernels while someone (udev's blkid,
# a process that just closed the device) still holds it; newer kernels
# accept the detach and finish it when the last user closes the device.
# Either way the holder goes away quickly: retry, then wait for the kernel.
DETACH_DELAYS = (0.1, 0.2, 0.4, 0.8)
DETACH_SETTLE_SECONDS = 2.0

_BLKSSZGET = 0x1268  # <linux/fs.h>: logical sector size, an int

_sleep = time.sleep  # replaced by unit tests


# --- sysfs --------------------------------------------------------------

Devnum = tuple[int, int]


def _devnum(st_rdev: int) -> Devnum:
    return os.major(st_rdev), os.minor(st_rdev)


def _sysdir(dev: Devnum) -> str:
    return os.path.join(SYS_DEV_BLOCK, f"{dev[0]}:{dev[1]}")


def _read_devnum(dev_file: str) -> Devnum | None:
    """The ``MAJ:MIN`` in a sysfs ``dev`` file, None if it is gone."""
    try:
        with open(dev_file, encoding="ascii") as f:
            major, minor = f.read().strip().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _partitions(dev: Devnum) -> list[Devnum]:
    """Partitions the kernel knows on a disk (subdirectories with a ``partition`` file)."""
    base = _sysdir(dev)
    found = []
    for name in _listdir(base):
        sub = os.path.join(base, name)
        if os.path.exists(os.path.join(sub, "partition")):
            num = _read_devnum(os.path.join(sub, "dev"))
            if num:
                found.append(num)
    return found


def _related(dev: Devnum, kind: str) -> list[Devnum]:
    """The devices in ``holders`` (built on dev) or ``slaves`` (dev built on)."""
    base = os.path.join(_sysdir(dev), kind)
    found = []
    for name in _listdir(base):
        num = _read_devnum(os.path.join(base, name, "dev"))
        if num:
            found.append(num)
    return found


def _parent_disk(dev: Devnum) -> Devnum | None:
    """The whole disk a partition belongs to, None for a whole disk."""
    base = _sysdir(dev)
    if not os.path.exists(os.path.join(base, "partition")):
        return None
    return _read_devnum(os.path.join(os.path.realpath(base), "..", "dev"))


def _attached_loops() -> Iterator[tuple[str, str]]:
    """Attached loop devices as (name, backing file path)."""
    for name in _listdir(SYS_BLOCK):
        if not name.startswith("loop"):
            continue
        try:
            with open(os.path.join(SYS_BLOCK, name, "loop", "backing_file"),
                      encoding="utf-8", errors="surrogateescape") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # not attached
        yield name, backing


def _loop_devices() -> Iterator[tuple[Devnum, str]]:
    """Attached loop devices as (devnum, backing file path)."""
    for name, backing in _attached_loops():
        num = _read_devnum(os.path.join(SYS_BLOCK, name, "dev"))
        if num:
            yield num, backing


def _loops_backed_by(st: os.stat_result) -> list[Devnum]:
    """Loop devices whose backing file is the file or block device ``st``."""
    found = []
    for num, backing in _loop_devices():
        try:
            bst = os.stat(backing)
        except OSError:
            continue  # deleted backing file: "(deleted)" suffix
        if stat.S_ISBLK(st.st_mode):
            same = stat.S_ISBLK(bst.st_mode) and bst.st_rdev == st.st_rdev
        else:
            same = (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino)
        if same:
            found.append(num)
    return found


def _reachable(start: Iterable[Devnum],
               neighbours: Callable[[Devnum], list[Devnum]]) -> set[Devnum]:
    """``start`` and every device ``neighbours`` leads to from it, recursively."""
    seen: set[Devnum] = set()
    todo = list(start)
    while todo:
        dev = todo.pop()
        if dev in seen:
            continue
        seen.add(dev)
        todo += neighbours(dev)
    return seen


def _built_on(start: Iterable[Devnum]) -> set[Devnum]:
    """``start`` and every device using it: partitions, holders (device-mapper,
    md) and loop devices over it, recursively."""
    return _reachable(start, _users)


def _users(dev: Devnum) -> list[Devnum]:
    """The partitions, holders and loop devices directly over ``dev``."""
    users = _partitions(dev) + _related(dev, "holders")
    node = _node_stat(dev)
    if node is not None:
        users += _loops_backed_by(node)
    return users


def _node_stat(dev: Devnum) -> os.stat_result | None:
    """A stat result describing block device ``dev`` (for loop matching)."""
    name = os.path.basename(os.path.realpath(_sysdir(dev)))
    try:
        st = os.stat(os.path.join("/dev", name))
    except OSError:
        return None
    return st if stat.S_ISBLK(st.st_mode) and _devnum(st.st_rdev) == dev else None


def _root_devices() -> set[Devnum]:
    """The device holding / and every device under it (parent disk,
    device-mapper and md members, a loop device's backing device)."""
    roots = [e for e in mounts.current_mounts() if e.mount_point == "/"]
    if not roots:
        return set()
    return _reachable((d for d in _mount_devices(roots[-1]) if d[0] != 0), _under)


def _under(dev: Devnum) -> list[Devnum]:
    """The devices ``dev`` is built on: parent disk, slaves, a loop's backing device."""
    parent = _parent_disk(dev)
    return ([parent] if parent else []) + _related(dev, "slaves") + _loop_backing_device(dev)


def _loop_backing_device(dev: Devnum) -> list[Devnum]:
    """For a loop device, the block device its backing file lives on (or is)."""
    path = os.path.join(_sysdir(dev), "loop", "backing_file")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            st = os.stat(f.read().rstrip("\n"))
    except OSError:
        return []
    return [_devnum(st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev)]


def _mount_devices(entry: mounts.MountEntry) -> set[Devnum]:
    """The device numbers a mount stands for: its own and its source's."""
    found = {(entry.major, entry.minor)}
    # btrfs and others report an anonymous device number (major 0) in
    # mountinfo; the source then names the real device.
    if entry.source.startswith("/"):
        with contextlib.suppress(OSError):
            st = os.stat(entry.source)
            if stat.S_ISBLK(st.st_mode):
                found.add(_devnum(st.st_rdev))
    return found


def _swap_devices() -> set[Devnum]:
    """Block devices in use as swap."""
    found: set[Devnum] = set()
    try:
        with open(PROC_SWAPS, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        if not line.split():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(mounts.unescape(line.split()[0]))
            if stat.S_ISBLK(st.st_mode):
                found.add(_devnum(st.st_rdev))
    return found


# --- checks -------------------------------------------------------------

def check_disk_usable(path: str) -> None:
    """Refuse (DiskError) a disk path we must not partition.

    It must exist and be a block device or a regular file; neither it nor
    anything built on it (partitions, mappings, loop devices) may be mounted
    or used as swap; and it must not be the node's root disk.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DiskError(
            f"The instance disk {path} does not exist. Check that the disk is "
            f"activated on this node (gnt-instance activate-disks) and that "
            f"the path Ganeti passed is right.") from None
    except OSError as exc:
        raise DiskError(f"Cannot examine the instance disk {path}: {exc.strerror}. "
                        f"Check the path and its permissions.") from None
    if stat.S_ISDIR(st.st_mode):
        raise DiskError(
            f"The instance disk {path} is a directory, not a disk. Ganeti "
            f"passes a block device or a disk image file; check the disk "
            f"template and the path.")
    if stat.S_ISBLK(st.st_mode):
        dev = _devnum(st.st_rdev)
        if dev in _root_devices():
            raise DiskError(
                f"The instance disk {path} is (or holds) this node's root "
                f"filesystem; installing onto it would destroy the node. Check "
                f"the disk path Ganeti passed (DISK_0_PATH) and the instance's "
                f"disk configuration.")
        users = _built_on([dev])
    elif stat.S_ISREG(st.st_mode):
        users = _built_on(_loops_backed_by(st))
    else:
        raise DiskError(
            f"The instance disk {path} is neither a block device nor a regular "
            f"file. Check the disk template and the path Ganeti passed.")
    for entry in mounts.current_mounts():
        if _mount_devices(entry) & users:
            raise DiskError(
                f"The instance disk {path} is in use: {entry.source} is mounted "
                f"on {entry.mount_point}. Stop the instance, unmount it "
                f"(umount {entry.mount_point}) and retry.")
    if users & _swap_devices():
        raise DiskError(
            f"The instance disk {path} is in use as swap on this node. Turn it "
            f"off (swapoff) and retry.")
    if stat.S_ISBLK(st.st_mode):
        _check_no_holders(path, _devnum(st.st_rdev))
        _check_not_claimed(path)
    if stat.S_ISREG(st.st_mode) and not_open_elsewhere(path):
        return
    _check_not_open(path)


def not_open_elsewhere(path: str) -> bool:
    """Whether the kernel says that nothing else has the regular file ``path``
    open: no process, no loop device, no mapping. True is certain; False
    means open elsewhere, or that this kernel or filesystem cannot tell.

    Asked with a write lease, taken and dropped at once: the kernel grants
    it only while the file has no other open file. It is trusted only after
    a second open of our own is seen to stop it (kernels that do not count
    readers would miss a read-only user). A few system calls instead of
    reading every process's open files and mappings (/proc), which on a
    node running many instances takes tens of milliseconds. SIGIO, which
    the kernel sends a lease holder when someone opens the file meanwhile,
    is ignored for the instant the lease exists.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        second = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if _lease_granted(fd):
                return False  # our own second open went unseen
        finally:
            os.close(second)
        return _lease_granted(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, previous)


def _lease_granted(fd: int) -> bool:
    """Take a write lease on ``fd`` and drop it; whether it was granted."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return False
        raise
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def holder_names(dev: Devnum) -> list[str]:
    """The devices built directly on ``dev``: device-mapper names, else the kernel's."""
    base = os.path.join(_sysdir(dev), "holders")
    names = []
    for entry in _listdir(base):
        try:
            with open(os.path.join(base, entry, "dm", "name"), encoding="utf-8",
                      errors="surrogateescape") as f:
                names.append(f.read().strip() or entry)
        except OSError:
            names.append(entry)  # md, DRBD: no device-mapper name
    return names


def _check_no_holders(path: str, dev: Devnum) -> None:
    """Refuse a block device something is built on (a kpartx mapping, DRBD...).

    The exclusive open below would refuse it too, but without naming the
    holder; a partition mapping left by an interrupted run (or someone
    else's) is common on nodes with device-mapper, and its name says what
    to remove.
    """
    names = holder_names(dev)
    if not names:
        return
    raise DiskError(
        f"The instance disk {path} is in use: {', '.join(names)} "
        f"{'is' if len(names) == 1 else 'are'} built on it. Partition mappings "
        f"(names ending in -part1, -part2...) left by an interrupted run or "
        f"another tool are removed with 'kpartx -d -p -part {path}' once "
        f"nothing uses them; otherwise find the user (dmsetup ls --tree; "
        f"lsblk {path}) and release it before retrying.")


def _check_not_open(path: str) -> None:
    """Refuse a disk that a process has open (a running instance's qemu...).

    The exclusive open above cannot see a plain open of a block device, and
    a disk file has no such thing at all; the processes' open files can.
    Compared by the path the kernel shows (never stat: an open file on a
    hung network filesystem would hang us).
    """
    holders = procs.processes_using(os.path.realpath(path))
    if holders:
        who = ", ".join(f"{name} (pid {pid})" for pid, name in holders)
        raise DiskError(
            f"The instance disk {path} is open in {who}: something (a running "
            f"instance?) is using it. Stop the instance, or these processes, "
            f"and retry.")


def _check_not_claimed(path: str) -> None:
    """Refuse a block device the kernel holds for something else.

    An exclusive open fails with EBUSY while the device is mounted, a swap
    area, an LVM physical volume or md member in use, or held by any other
    exclusive opener: it catches what the checks above cannot name.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DiskError(
                f"The instance disk {path} is in use by the kernel (held by "
                f"device-mapper, md, a mount or another exclusive user). Find "
                f"the user (lsblk {path}; dmsetup ls --tree) and release it "
                f"before retrying.") from None
        raise DiskError(f"Cannot open the instance disk {path}: {exc.strerror}. "
                        f"Check that it is activated and readable.") from None
    os.close(fd)


@contextlib.contextmanager
def _opened(dev: str) -> Iterator[int]:
    """``dev`` open for reading, as a descriptor closed on exit."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def size_bytes(dev: str) -> int:
    """The size of a block device or file in bytes."""
    with _opened(dev) as fd:
        # Seeking to the end gives a block device's size without an ioctl.
        return os.lseek(fd, 0, os.SEEK_END)


def logical_sector_size(dev: str) -> int:
    """The sector size partition tables on ``dev`` count in (512 for files)."""
    with _opened(dev) as fd:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return 512
        raw = fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4)
        return int(struct.unpack("i", raw)[0])


def require_min_size(size: int, min_mib: int, what: str = "The instance disk") -> None:
    """Refuse (DiskError) a disk of ``size`` bytes smaller than ``min_mib`` MiB."""
    if size >= min_mib * MIB:
        return
    found = f"{size // MIB} MiB" if size % MIB == 0 else f"{size / MIB:.1f} MiB"
    raise DiskError(
        f"{what} is {found} ({size} bytes), but at least {min_mib} MiB are "
        f"needed for the root filesystem. Grow the disk (gnt-instance "
        f"grow-disk) or recreate the instance with a disk of {min_mib} MiB "
        f"or more.")


# --- loop devices -------------------------------------------------------

def is_block_device(path: str) -> bool:
    """Whether ``path`` is (a symlink to) a block device node."""
    return stat.S_ISBLK(os.stat(path).st_mode)


@contextlib.contextmanager
def attached(path: str, read_only: bool = False) -> Iterator[str]:
    """A block device for the disk: a block device itself, a file through a
    new loop device (detached on exit)."""
    if is_block_device(path):
        yield path
        return
    with loop_device(path, read_only=read_only) as dev:
        yield dev


@contextlib.contextmanager
def loop_device(backing: str, offset: int = 0, size: int | None = None,
                read_only: bool = False) -> Iterator[str]:
    """Attach ``backing`` (from byte ``offset``, ``size`` bytes long) to a new
    loop device; yield its path and detach it on exit."""
    # --find --show lets losetup pick a free device and claim it atomically
    # (LOOP_CTL_GET_FREE, retried on a race): two scripts running at once
    # never get the same device, which guessing a free name would allow.
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    if offset:
        argv += ["--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    argv.append(backing)
    before = loops_backed_by(backing)
    try:
        dev = runner.output(argv)
    except BaseException:
        # Interrupted (or failed) after losetup may have attached a device
        # whose name we never read: release any that appeared on the file.
        for new in sorted(loops_backed_by(backing) - before):
            with failure_logged(f"detaching {new}"):
                detach_loop(new)
        raise
    if not dev.startswith("/dev/"):
        raise DiskError(f"losetup attached {backing} but printed {dev!r} instead "
                        f"of a device name; check 'losetup -a' for a device to "
                        f"detach.")
    with released(f"detaching {dev}", lambda: detach_loop(dev)):
        yield dev


def loops_backed_by(path: str) -> set[str]:
    """The loop devices whose backing file is ``path`` (after symlinks)."""
    target = os.path.realpath(path)
    return {f"/dev/{name}" for name, backing in _attached_loops() if backing == target}


def detach_loop(dev: str) -> None:
    """Detach a loop device, retrying while it is busy."""
    failures = 0
    while True:
        try:
            runner.run(["losetup", "--detach", dev])
            break
        except CommandError as exc:
            if not _loop_attached(dev):
                # Someone else detached it already (ENXIO): nothing to release.
                log.debug("%s was already detached", dev)
                return
            if failures == len(DETACH_DELAYS):
                raise DiskError(
                    f"Cannot detach the loop device {dev}: it stays busy. Find "
                    f"its user (mount; dmsetup ls; fuser -v {dev}), release it "
                    f"and run 'losetup -d {dev}'.") from exc
            log.debug("%s busy, retrying the detach", dev)
            _sleep(DETACH_DELAYS[failures])
            failures += 1
    _wait_detached(dev)


def _loop_attached(dev: str) -> bool:
    """Whether the loop device ``dev`` still has a backing file."""
    return os.path.exists(os.path.join(SYS_BLOCK, os.path.basename(dev), "loop",
                                       "backing_file"))


def _wait_detached(dev: str) -> None:
    """Wait until the kernel really released ``dev`` (a deferred detach)."""
    backing = os.path.join(SYS_BLOCK, os.path.basename(dev), "loop", "backing_file")
    deadline = time.monotonic() + DETACH_SETTLE_SECONDS
    while os.path.exists(backing):
        if time.monotonic() >= deadline:
            log.warning("%s is still in use; the kernel will detach it when "
                        "its last user closes it (see 'losetup -a')", dev)
            return
        _sleep(0.05)
