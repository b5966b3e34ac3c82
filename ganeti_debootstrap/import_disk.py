"""``import``: restore a backup stream from stdin onto a fresh disk.

Reads what export (or the shell edition's export) wrote; the stream's
first bytes say what it holds (backupstream.detect), whatever the disk
held before, so that any stream imports onto any filesystem type the
parameters ask for:

- disk 0 (IMPORT_INDEX 0), a dump or tar stream: the disk is partitioned
  and formatted exactly as create would, the stream is restored into the
  new root (restore(8) or tar, confined: confine.py), then the instance is
  adapted to its new disks (``/etc/fstab`` root and swap lines point at the
  new UUIDs, whatever form the old lines had) and gets a new machine
  identity, as create gives one;
- a data disk (IMPORT_INDEX > 0), a dump or tar stream: a filesystem on the
  whole disk, the stream restored into it, nothing else changed;
- a data disk, a raw stream: its bytes written back, holes zeroed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from . import (backupstream, blockdev, bootloader, confine, filesystems, instance_disk,
               instance_files, log, mounts, runner)
from .backupstream import Kind
from .dumpstream import DumpEnd, StreamPump, Tracker
from .environment import Request
from .filesystems import FsEntry
from .errors import CommandError, DefinitionError, MissingProgramError
from .osparams import OSParams
from .paths import Paths
from .plan import prepare
from .target import Target

logger = logging.getLogger(__name__)


# How long a failed or interrupted import waits for the stream pump to stop.
PUMP_STOP_SECONDS = 1.0

# The interpreter that runs the confinement: the system's, never one from PATH.
PYTHON = "/usr/bin/python3"


class ImportError_(DefinitionError):
    """The backup stream could not be restored."""


def restore_command(target_dir: str) -> list[str]:
    """restore(8) reading stdin into ``target_dir``, confined to it (confine.py).

    The system Python runs the confinement by path, isolated (-I: nothing from
    the environment or the working directory on its path; -S: no site).
    """
    return [PYTHON, "-I", "-S", confine.__file__, target_dir, "--",
            "restore", "-r", "-y", "-f", "-"]


def tar_command(target_dir: str) -> list[str]:
    """GNU tar extracting stdin into ``target_dir``, confined to it as restore is.

    Owners, modes, ACLs, extended attributes and capabilities kept (as root,
    tar's default: --same-owner, --preserve-permissions); the directories
    that exist (the new filesystem's root) keep their own metadata; names
    with a leading ``/`` are taken below the target and members with ``..``
    skipped (tar's defaults, kept: no --absolute-names); the links a member
    could follow lead nowhere but the target in the confinement's root.
    """
    return [PYTHON, "-I", "-S", confine.__file__, target_dir, "--",
            "tar", "--extract", "--file=-", *backupstream.TAR_OPTIONS, "--same-owner",
            "--preserve-permissions", "--no-overwrite-dir", "--delay-directory-restore"]


# What each kind is restored with, and what a stream it fails on is not.
_RESTORERS = {"dump": ("restore", "not a dump(8) stream"),
              "tar": ("tar", "not a tar archive")}


def _tar_truncated(tar_end: backupstream.TarEnd, total: int) -> str:
    return (f"The backup stream (a tar archive) {backupstream.tar_damage(tar_end, total)}: "
            f"it is truncated or damaged, so the disk holds an incomplete copy. Check "
            f"the export (its size, the transfer) and import again.")


def restore_stream(target_dir: str, source_fd: int, kind: Kind = "dump",
                   head: bytes = b"") -> int:
    """Restore the dump or tar stream read from ``source_fd`` into ``target_dir``.

    ``head``: its first bytes, already read. Returns the stream's size;
    raises when the stream is not complete.
    """
    program, what = _RESTORERS[kind]
    if confine.host_table() is None:
        # (confine.py runs restore without CAP_SYS_ADMIN then.)
        logger.warning("%s cannot be given CAP_SYS_ADMIN safely on this architecture "
                       "(%s: no system call table for its seccomp filter), so the "
                       "trusted.* and security.* extended attributes of the backup "
                       "(other than file capabilities) are not restored",
                       program, os.uname().machine)
    tar_end = backupstream.TarEnd()
    tracker: Tracker = DumpEnd()
    if kind == "tar":
        tracker = tar_end
    read_fd, write_fd = os.pipe()
    pump = StreamPump(source_fd, write_fd, prefix=head, tracker=tracker)
    pump.start()
    command = restore_command(target_dir) if kind == "dump" else tar_command(target_dir)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            runner.run(command, stdin=pipe,
                       hint=f"The backup stream is damaged or is {what}; check "
                            f"the export it came from.")
    except CommandError as exc:
        pump.join(timeout=PUMP_STOP_SECONDS)
        if kind == "tar" and pump.ended and not tar_end.complete:
            # tar stops at a cut inside a member ("Unexpected EOF"): the
            # stream's end, not tar, is the problem to report.
            raise ImportError_(_tar_truncated(tar_end, pump.total)) from None
        if exc.returncode == confine.NOT_FOUND:
            raise MissingProgramError(program, runner.PACKAGES[program]) from None
        if exc.returncode == confine.SETUP_FAILED:
            raise ImportError_(
                f"{program} could not be confined to the new disk, so it was not run:\n"
                f"{exc.stderr_tail.strip()}\nThe node's kernel must provide mount "
                f"namespaces and open_tree/mount_setattr (Linux 5.12 or later), "
                f"and import must run as root with CAP_SYS_ADMIN.") from None
        raise
    except BaseException:
        # The program is gone (failed, or stopped by a signal) and its end
        # of the pipe is closed; the pump may still wait for input that a
        # stalled sender never writes. It is a daemon thread and ends with
        # the process: waiting for it would hang the cleanup.
        pump.join(timeout=PUMP_STOP_SECONDS)
        raise
    # tar stops reading at the end-of-archive blocks: what a sender still
    # writes after them is not waited for.
    pump.join(timeout=PUMP_STOP_SECONDS if pump.complete else None)
    if kind == "tar":
        if not tar_end.complete:
            raise ImportError_(_tar_truncated(tar_end, pump.total))
    elif not pump.complete:
        raise ImportError_(
            f"The backup stream ended after {pump.total} bytes without dump's "
            f"end-of-dump trailer: it is truncated or damaged, so the disk holds "
            f"an incomplete system. Check the export (its size, the transfer) "
            f"and import again.")
    # restore -r leaves its bookkeeping in the root of what it restored.
    symtable = os.path.join(target_dir, "restoresymtable")
    if kind == "dump" and os.path.isfile(symtable):
        os.unlink(symtable)
    return pump.total


def read_kind(source_fd: int) -> tuple[Kind, bytes]:
    """The stream's kind and the bytes read to tell it (bounded: PEEK_BYTES)."""
    head = backupstream.read_head(source_fd)
    kind = backupstream.detect(head)
    if kind is None:
        raise backupstream.StreamError(
            f"The backup stream is not a dump, tar or raw stream as export writes "
            f"them ({backupstream.describe(head)}): it is truncated or damaged, or "
            f"was written by something else. Check the export it came from.")
    logger.info("The backup stream is a %s stream", kind)
    return kind, head


def ganeti_uuid(request: Request, index: int) -> str:
    """Ganeti's UUID of disk ``index`` (DISK_N_UUID), "" when not given."""
    return next((d.uuid for d in request.disks if d.index == index), "")


def imported_data_mounts(request: Request, params: OSParams,
                         ) -> tuple[instance_files.DataMount, ...]:
    """The fstab entries of the data disks, as their imports make them.

    Each data disk's import (IMPORT_INDEX N) makes its filesystem with
    Ganeti's UUID of the disk, so disk 0's import can name it before (or
    after) that runs. A data disk Ganeti gives no UUID for keeps the line
    the backup had (its filesystem's new UUID is unknown here); it is
    logged.
    """
    mounts_: list[instance_files.DataMount] = []
    for disk in instance_disk.data_disks(request, params):
        if not disk.uuid:
            logger.warning("Ganeti passed no DISK_%d_UUID: /etc/fstab keeps the backup's "
                           "line for data disk %d, which names its old filesystem; "
                           "correct it in the instance (blkid shows the new UUID)",
                           disk.index, disk.index)
            continue
        mounts_.append(instance_files.DataMount(
            disk.index, FsEntry(disk.uuid, params.data_filesystem)))
    return tuple(mounts_)


def import_data_disk(request: Request, params: OSParams, kind: Kind, head: bytes) -> None:
    """A data disk: a raw stream written back, another restored into a new filesystem."""
    path = request.disk_path
    source_fd = sys.stdin.fileno()
    with log.phase("check disk"):
        blockdev.check_disk_usable(path)
    if kind == "raw":
        with log.phase("write raw disk"), open(path, "r+b") as disk:
            fd = disk.fileno()
            size = backupstream.read_raw(source_fd, head, fd, os.lseek(fd, 0, os.SEEK_END))
            os.fsync(fd)
        logger.info("Data disk %d (%s): %d bytes of raw disk image written",
                    request.disk_index, path, size)
        return
    fstype = params.data_filesystem
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(blockdev.attached(path))
        with log.phase("make filesystems"):
            # Ganeti's UUID of the disk, as create gives it: disk 0's import
            # names it in fstab, whichever of the two runs first.
            filesystems.make_filesystem(dev, fstype, uuid=ganeti_uuid(request,
                                                                      request.disk_index))
        target_dir = stack.enter_context(mounts.instance_root(
            dev, fstype, path, mounts.UNTRUSTED_OPTIONS))
        with log.phase("restore"):
            total = restore_stream(target_dir, source_fd, kind, head)
    logger.info("Data disk %d (%s): %d bytes of %s stream restored into %s",
                request.disk_index, path, total, kind, fstype)


def run(request: Request, paths: Paths) -> None:
    """Format the imported disk as create would and restore stdin onto it."""
    # The same settings, parameters and disk layout as create.
    p = prepare(request, paths)
    conf = p.settings
    # A wrong disk path is refused first, naming the disk, whatever the
    # stream holds (the node's own disk must never be a matter of input).
    blockdev.check_disk_usable(request.disk_path)
    # Told before the disk is touched: a stream of no kind we know leaves
    # the disk as it was.
    kind, head = read_kind(sys.stdin.fileno())
    if request.disk_index > 0:
        import_data_disk(request, p.params, kind, head)
        return
    if kind == "raw":
        raise ImportError_(
            "The backup stream is a raw disk image, which export writes for a data "
            "disk with no filesystem, but it is imported as disk 0, the instance's "
            "root. Import it as the data disk it was exported from (the same disk "
            "index).")
    with contextlib.ExitStack() as stack:
        disk = instance_disk.format_disk(stack, request, conf, p.params.filesystem, p.arch,
                                         swap_bytes=p.params.swap_bytes)
        # The stream is the tenant's: its setuid programs and device nodes
        # must mean nothing on the node (restore still makes them).
        target_dir = stack.enter_context(mounts.instance_root(
            disk.root_device, disk.root.fstype, request.disk_path, mounts.UNTRUSTED_OPTIONS))
        with log.phase("restore"):
            size = restore_stream(target_dir, sys.stdin.fileno(), kind, head)
            logger.info("restored %d bytes of %s stream", size, kind)
        target = Target(target_dir)
        with log.phase("adapt instance"):
            # The swap file (PARTITION_STYLE=none) is made anew, as create
            # makes it, whatever the backup held in its place.
            swap_file = (instance_files.make_swap_file(target, disk.swap_file_bytes,
                                                       disk.root.fstype)
                         if disk.swap_file_bytes else "")
            instance_files.rewrite_fstab(target, root=disk.root, swap=disk.swap,
                                         esp=disk.esp, swap_file=swap_file,
                                         data=imported_data_mounts(request, p.params))
            instance_files.remove_persistent_net_rules(target)
            instance_files.reset_identity(target)
        # The old GRUB looked for the old root UUID on the old disk. The
        # node's GRUB: nothing of the restored system runs.
        # grub-efi: the ESP is a new one (export dumps the root only).
        bootloader.install_from_node(target, request, conf, disk_device=disk.device,
                                     root_uuid=disk.root.uuid, esp_device=disk.esp_device,
                                     fstype=disk.root.fstype)
    logger.info("Instance %s imported onto %s", request.instance_name, request.disk_path)
