"""``create``: put a configured Debian system onto the instance's disk 0.

The phases, each logged with its duration: check and attach the disk, write
the partition table, make the filesystem(s), mount, install the system
(from the cache, or with debootstrap and then store the cache), write the
instance's own files, run the site's hooks, unmount and release. Every
resource is released in reverse order on success, on failure and on
SIGTERM (see signals.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from . import (blockdev, bootstrap, cache, filesystems, hooks, instance_files,
               log, mounts, osparams, partitions, settings)
from .environment import Request
from .paths import Paths
from .settings import Settings
from .target import Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything create decided before touching the disk."""

    settings: Settings
    params: osparams.OSParams
    tool: str
    arch: str


def plan(request: Request, paths: Paths) -> Plan:
    """Read and check settings and parameters; nothing is touched yet."""
    conf = settings.load(paths, request.os_variant, request.api_version)
    params = osparams.validate(request.os_params)
    tool = bootstrap.choose_tool(conf.bootstrap_tool)
    arch = conf.arch or bootstrap.node_architecture()
    return Plan(conf, params, tool, arch)


def install_system(p: Plan, paths: Paths, target_dir: str) -> None:
    """Fill the mounted, empty root filesystem from the cache or a bootstrap."""
    key = cache.CacheKey.from_settings(p.settings, p.tool, p.arch)
    store = cache.Cache(paths.cache_dir, clean_days=p.settings.clean_cache_days)
    if not p.settings.generate_cache:
        # Without a cache of our own, a valid one may still exist (made
        # earlier, or preseeded by the administrator): use it if so.
        entry = store.lookup(key) if store.exists() else None
        if entry is not None:
            store.extract(entry, target_dir)
        else:
            bootstrap.run(p.settings, p.tool, p.arch, target_dir)
            bootstrap.clean_tree(target_dir)
        return
    store.expire()
    with store.locked(key):
        entry = store.lookup(key)
        if entry is None:
            logger.info("No cache for %s; bootstrapping with %s (this takes a "
                        "minute or so)", key.describe(), p.tool)
            bootstrap.run(p.settings, p.tool, p.arch, target_dir)
            bootstrap.clean_tree(target_dir)
            store.store(key, target_dir)
            return
    logger.info("Unpacking cache %s", entry.path)
    store.extract(entry, target_dir)


def run(request: Request, paths: Paths) -> None:
    """Create the instance's root (and API 5 swap) on its disk."""
    p = plan(request, paths)
    conf = p.settings
    with contextlib.ExitStack() as stack:
        with log.phase("check disk"):
            blockdev.check_disk_usable(request.disk_path)
            if request.swap_device:
                blockdev.check_disk_usable(request.swap_device)
            dev = stack.enter_context(blockdev.attached(request.disk_path))
            blockdev.require_min_size(blockdev.size_bytes(dev), blockdev.MIN_DISK_MIB)
        with log.phase("partition"):
            layout = partitions.write_table(dev, conf.partition_style,
                                            conf.partition_alignment,
                                            blockdev.size_bytes(dev), p.arch)
            root_dev = stack.enter_context(partitions.mapped_root(dev, layout))
        with log.phase("make filesystems"):
            filesystems.make_filesystem(root_dev, p.params.filesystem)
            root = instance_files.FsEntry(filesystems.uuid_of(root_dev),
                                          p.params.filesystem)
            swap = None
            if request.swap_device:
                swap_dev = stack.enter_context(blockdev.attached(request.swap_device))
                swap = instance_files.FsEntry(filesystems.make_swap(swap_dev), "swap")
        target_dir = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(root_dev, target_dir))
        with log.phase("install system"):
            install_system(p, paths, target_dir)
        target = Target(target_dir)
        with log.phase("configure instance"):
            instance_files.configure(
                target, instance_files.Instance.from_request(request),
                root=root, swap=swap)
        hook_list = hooks.list_hooks(conf.customize_dir)
        if hook_list:
            with log.phase(f"hooks ({len(hook_list)})"):
                hooks.check_safe(conf.customize_dir)
                env = hooks.environment(request, conf, p.arch, target_dir,
                                        blockdev=dev, fsysdev=root_dev)
                with mounts.api_filesystems(target_dir), hooks.daemons_prevented(target):
                    hooks.run_all(conf.customize_dir, env)
        # What is left to do is the ExitStack's: unmount (writeback) and
        # release the mappings and loop devices.
        released_from = time.monotonic()
    logger.info("unmount and release: done in %.2f s", time.monotonic() - released_from)
    logger.info("Instance %s created on %s", request.instance_name, request.disk_path)
