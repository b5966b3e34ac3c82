"""``import``: restore a dump(8) stream from stdin onto a freshly formatted disk.

Reads what export (or the shell edition's export) wrote: the disk is
partitioned and formatted exactly as create would, the stream is restored
into the new root, then the instance is adapted to its new disks
(``/etc/fstab`` root and swap lines point at the new UUIDs, whatever form the
old lines had) and gets a new machine identity, as create gives one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from . import bootloader, confine, instance_disk, instance_files, log, mounts, runner
from .dumpstream import StreamPump
from .environment import Request
from .errors import CommandError, DefinitionError, MissingProgramError
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


def restore_stream(target_dir: str, source_fd: int) -> int:
    """Restore the dump stream read from ``source_fd`` into ``target_dir``.

    Returns the stream's size; raises when the stream is not a complete dump.
    """
    if confine.host_table() is None:
        # (confine.py runs restore without CAP_SYS_ADMIN then.)
        logger.warning("restore cannot be given CAP_SYS_ADMIN safely on this architecture "
                       "(%s: no system call table for its seccomp filter), so the "
                       "trusted.* and security.* extended attributes of the backup "
                       "(other than file capabilities) are not restored",
                       os.uname().machine)
    read_fd, write_fd = os.pipe()
    pump = StreamPump(source_fd, write_fd)
    pump.start()
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            runner.run(restore_command(target_dir), stdin=pipe,
                       hint="The backup stream is damaged or is not a dump(8) "
                            "stream; check the export it came from.")
    except CommandError as exc:
        pump.join(timeout=PUMP_STOP_SECONDS)
        if exc.returncode == confine.NOT_FOUND:
            raise MissingProgramError("restore", runner.PACKAGES["restore"]) from None
        if exc.returncode == confine.SETUP_FAILED:
            raise ImportError_(
                f"restore could not be confined to the new disk, so it was not run:\n"
                f"{exc.stderr_tail.strip()}\nThe node's kernel must provide mount "
                f"namespaces and open_tree/mount_setattr (Linux 5.12 or later), "
                f"and import must run as root with CAP_SYS_ADMIN.") from None
        raise
    except BaseException:
        # restore is gone (failed, or stopped by a signal) and its end of
        # the pipe is closed; the pump may still wait for input that a
        # stalled sender never writes. It is a daemon thread and ends with
        # the process: waiting for it would hang the cleanup.
        pump.join(timeout=PUMP_STOP_SECONDS)
        raise
    pump.join()
    if not pump.complete:
        raise ImportError_(
            f"The backup stream ended after {pump.total} bytes without dump's "
            f"end-of-dump trailer: it is truncated or damaged, so the disk holds "
            f"an incomplete system. Check the export (its size, the transfer) "
            f"and import again.")
    # restore -r leaves its bookkeeping in the root of what it restored.
    symtable = os.path.join(target_dir, "restoresymtable")
    if os.path.isfile(symtable):
        os.unlink(symtable)
    return pump.total


def run(request: Request, paths: Paths) -> None:
    """Format the imported disk as create would and restore stdin onto it."""
    # The same settings, parameters and disk layout as create.
    p = prepare(request, paths)
    conf = p.settings
    with contextlib.ExitStack() as stack:
        disk = instance_disk.format_disk(stack, request, conf, p.params.filesystem, p.arch,
                                         swap_bytes=p.params.swap_bytes)
        # The stream is the tenant's: its setuid programs and device nodes
        # must mean nothing on the node (restore still makes them).
        target_dir = stack.enter_context(mounts.instance_root(
            disk.root_device, disk.root.fstype, request.disk_path, mounts.UNTRUSTED_OPTIONS))
        with log.phase("restore"):
            size = restore_stream(target_dir, sys.stdin.fileno())
            logger.info("restored %d bytes of dump stream", size)
        target = Target(target_dir)
        with log.phase("adapt instance"):
            # The swap file (PARTITION_STYLE=none) is made anew, as create
            # makes it, whatever the backup held in its place.
            swap_file = (instance_files.make_swap_file(target, disk.swap_file_bytes,
                                                       disk.root.fstype)
                         if disk.swap_file_bytes else "")
            instance_files.rewrite_fstab(target, root=disk.root, swap=disk.swap,
                                         esp=disk.esp, swap_file=swap_file)
            instance_files.remove_persistent_net_rules(target)
            instance_files.reset_identity(target)
        # The old GRUB looked for the old root UUID on the old disk. The
        # node's GRUB: nothing of the restored system runs.
        # grub-efi: the ESP is a new one (export dumps the root only).
        bootloader.install_from_node(target, request, conf, disk_device=disk.device,
                                     root_uuid=disk.root.uuid, esp_device=disk.esp_device,
                                     fstype=disk.root.fstype)
    logger.info("Instance %s imported onto %s", request.instance_name, request.disk_path)
