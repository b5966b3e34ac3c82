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

from . import (bootstrap, cache, hooks, instance_disk, instance_files, log, mounts,
               osparams, settings)
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
    """Fill the mounted, empty root filesystem from the cache or a bootstrap.

    With GENERATE_CACHE=yes the system is bootstrapped straight into the
    instance's filesystem and archived from there (no second copy); the lock
    makes concurrent creates with the same inputs bootstrap once and reuse.
    Without it, a valid cache made earlier (or preseeded) is still used.
    """
    key = cache.CacheKey.from_settings(p.settings, p.tool, p.arch)
    store = cache.Cache(paths.cache_dir, clean_days=p.settings.clean_cache_days)
    if p.settings.generate_cache:
        store.expire()
    elif not store.exists():
        _bootstrap(p, target_dir)
        return
    with store.locked(key):
        entry = store.lookup(key)
        if entry is not None:
            logger.info("Unpacking the cache %s", entry.path)
            store.extract(entry, target_dir)
            return
        logger.info("No cache for %s", key.describe())
        _bootstrap(p, target_dir)
        if p.settings.generate_cache:
            store.store(key, target_dir)


def _bootstrap(p: Plan, target_dir: str) -> None:
    bootstrap.run(p.settings, p.tool, target_dir)
    bootstrap.clean_tree(target_dir)


def run(request: Request, paths: Paths) -> None:
    """Create the instance's root (and API 5 swap) on its disk."""
    p = plan(request, paths)
    conf = p.settings
    with contextlib.ExitStack() as stack:
        disk = instance_disk.format_disk(stack, request, conf, p.params.filesystem, p.arch)
        target_dir = stack.enter_context(mounts.temporary_mountpoint())
        stack.enter_context(mounts.mounted(disk.root_device, target_dir))
        with log.phase("install system"):
            install_system(p, paths, target_dir)
        target = Target(target_dir)
        with log.phase("configure instance"):
            instance_files.configure(target, instance_files.Instance.from_request(request),
                                     root=disk.root, swap=disk.swap)
        hook_list = hooks.list_hooks(conf.customize_dir)
        if hook_list:
            with log.phase(f"hooks ({len(hook_list)})"):
                env = hooks.environment(request, conf, p.arch, target_dir,
                                        blockdev=disk.device, fsysdev=disk.root_device)
                with mounts.api_filesystems(target_dir), hooks.daemons_prevented(target):
                    hooks.run_all(conf.customize_dir, env)
        # What is left to do is the ExitStack's: unmount (writeback) and
        # release the mappings and loop devices.
        released_from = time.monotonic()
    logger.info("unmount and release: done in %.2f s", time.monotonic() - released_from)
    logger.info("Instance %s created on %s", request.instance_name, request.disk_path)
