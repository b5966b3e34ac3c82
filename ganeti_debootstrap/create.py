"""``create``: put a configured Debian system onto the instance's disk 0.

The phases, each logged with its duration: format the data disks (OS
parameter data_disks=format), check and attach disk 0, write the partition
table, make the filesystem(s) and swap, mount, install the system (from
the cache, or with debootstrap and then store the cache), make the swap
file (PARTITION_STYLE=none), write the instance's own files (and where its
system came from: origin.py), run the site's hooks, unmount and release.
Every resource is released in reverse order on success, on failure and on
SIGTERM (see signals.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from . import (blockdev, bootloader, bootstrap, cache, hooks, image_copy, instance_disk,
               instance_files, log, mounts, network, origin, osparams)
from .environment import Request
from .paths import Paths
from .plan import prepare
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
    # What the instance's own files are made from; NIC variables checked.
    instance: instance_files.Instance


def plan(request: Request, paths: Paths) -> Plan:
    """Read and check settings and parameters; nothing is touched yet."""
    common = prepare(request, paths, bootstraps=True)
    conf, params = common.settings, common.params
    instance = instance_files.Instance.from_request(request, params, conf)
    osparams.check_packages(params, conf.extra_pkgs)
    refuse_early(request, conf, paths, params)
    return Plan(conf, params, common.tool, common.arch, instance)


def refuse_early(request: Request, conf: Settings, paths: Paths,
                 params: osparams.OSParams) -> None:
    """Refuse an unusable disk, unsafe hooks or cache before anything is touched.

    format_disk and hooks.run_all check again right before they act; checked
    here too, a wrong DISK_0_PATH, swap that leaves the root no room, a
    data disk too small or in use, or a hooks directory others can write
    fails at once, not after a cache image was built or after a disk was
    partitioned and installed. The cache directory is checked only here,
    just before find_source uses it.
    """
    blockdev.check_disk_usable(request.disk_path)
    if request.swap_device:
        blockdev.check_disk_usable(request.swap_device)
    size = blockdev.size_bytes(request.disk_path)
    blockdev.require_min_size(size, blockdev.MIN_DISK_MIB,
                              f"The instance disk {request.disk_path}")
    instance_disk.plan_layout(request.disk_path, conf, size, params.swap_bytes)
    instance_disk.check_data_disks(request, params)
    hooks.check_safe(conf.customize_dir)
    if conf.generate_cache:
        cache.check_trusted(paths.cache_dir)


def find_source(hold: contextlib.ExitStack, p: Plan, paths: Paths) -> cache.Source:
    """Look up (and lock) the cache for this plan (cache.open_source)."""
    return cache.open_source(hold, p.settings, p.tool, p.arch, p.params.filesystem,
                             paths.cache_dir)


def install_system(p: Plan, source: cache.Source, target_dir: str) -> None:
    """Fill the mounted, empty root filesystem from the cache or a bootstrap.

    A fresh bootstrap goes straight into the instance's filesystem and, with
    GENERATE_CACHE=yes, is archived from there (no second copy).
    """
    if source.entry is not None:
        logger.info("Unpacking the cache %s", source.entry.path)
        source.store.extract(source.entry, target_dir)
        return
    if p.settings.generate_cache:
        logger.info("No cache for %s", source.key.describe())
    bootstrap.run(p.settings, p.tool, target_dir)
    bootstrap.clean_tree(target_dir)
    if p.settings.generate_cache:
        cache.store_tree(source, target_dir, p.params.filesystem, p.settings.cache_image)


def run(request: Request, paths: Paths) -> None:
    """Create the instance's root (swap, API 5 swap) on disk 0, and its data disks."""
    p = plan(request, paths)
    conf = p.settings
    data: tuple[instance_files.DataMount, ...] = ()
    if instance_disk.data_disks(request, p.params):
        # Before disk 0, and before the cache's lock is taken: a data disk
        # mkfs refuses fails the create with disk 0 untouched.
        with log.phase("format data disks"):
            data = tuple(instance_files.DataMount(index, fs) for index, fs in
                         instance_disk.format_data_disks(request, p.params).items())
    with contextlib.ExitStack() as stack:
        with contextlib.ExitStack() as cache_hold:
            source = find_source(cache_hold, p, paths)
            disk = instance_disk.format_disk(stack, request, conf, p.params.filesystem,
                                             p.arch, image=source.image,
                                             swap_bytes=p.params.swap_bytes)
            # Without nosuid,nodev: the system is ours (bootstrapped now or
            # from the administrator's cache), and the bootstrap and hooks
            # run inside it (debootstrap makes its /dev nodes there; a hook
            # may drop to a user and need a setuid program). The 0700
            # parent of the mount point keeps the node's users out.
            target_dir = stack.enter_context(mounts.instance_root(
                disk.root_device, disk.root.fstype, request.disk_path))
            if disk.from_image:
                logger.info("The system comes from the cache image %s",
                            source.image.path if source.image else "")
                image_copy.grow_mounted(target_dir, disk.root.fstype)
            else:
                with log.phase("install system"):
                    install_system(p, source, target_dir)
            # Read while the cache's lock is held: a refresh may follow.
            came_from = origin.of_source(source, stored=conf.generate_cache)
        # The cache's lock is released: hooks may take long, and other
        # creates need not wait for them.
        target = Target(target_dir)
        swap_file = ""
        if disk.swap_file_bytes:
            with log.phase("swap file"):
                swap_file = instance_files.make_swap_file(target, disk.swap_file_bytes,
                                                          disk.root.fstype)
        with log.phase("configure instance"):
            instance_files.configure(target, p.instance, root=disk.root, swap=disk.swap,
                                     esp=disk.esp, swap_file=swap_file, data=data)
            origin.write(target, came_from)
        bootloader.install(target, request, conf, disk_device=disk.device,
                           root_uuid=disk.root.uuid, esp_device=disk.esp_device,
                           fstype=disk.root.fstype)
        hook_list = hooks.list_hooks(conf.customize_dir)
        if hook_list:
            with log.phase(f"hooks ({len(hook_list)})"):
                env = hooks.environment(request, conf, p.arch, target_dir,
                                        blockdev=disk.device, fsysdev=disk.root_device)
                interfaces = network.interfaces_snapshot(target)
                with mounts.api_filesystems(target_dir), hooks.daemons_prevented(target):
                    hooks.run_all(conf.customize_dir, env, timeout=conf.hook_timeout)
            network.yield_to_hooks(target, interfaces)
            bootloader.repair_config(target, request, conf, disk.root.uuid,
                                     disk.root.fstype)
        # What is left to do is the ExitStack's: unmount (writeback) and
        # release the mappings and loop devices. Closed here, inside a phase,
        # so that its time is logged like every other step's.
        with log.phase("unmount and release"):
            stack.close()
    logger.info("Instance %s created on %s, its system %s", request.instance_name,
                request.disk_path, came_from.describe())
