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
from dataclasses import dataclass

from . import (access, blockdev, bootloader, bootstrap, cache, cloudinit, hooks,
               image_cache, instance_disk, instance_files, log, mounts, network,
               osparams, settings)
from .errors import DefinitionError
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
    # What the instance's own files are made from; NIC variables checked.
    instance: instance_files.Instance


def plan(request: Request, paths: Paths) -> Plan:
    """Read and check settings and parameters; nothing is touched yet."""
    conf = settings.load(paths, request.os_variant, request.api_version)
    params = osparams.validate(request.os_params)
    tool = bootstrap.choose_tool(conf.bootstrap_tool)
    arch = conf.arch or bootstrap.node_architecture()
    # With GRUB, its packages join EXTRA_PKGS, so the cache key too.
    conf = bootloader.resolve(conf, params.bootloader, arch)
    instance = instance_files.Instance.from_request(request, params, conf)
    access.refuse_without_sudo(params.admin_user, conf.extra_pkgs)
    cloudinit.refuse_without_cloud_init(params.cloud_init, conf.extra_pkgs)
    refuse_early(request, conf, paths)
    return Plan(conf, params, tool, arch, instance)


def refuse_early(request: Request, conf: Settings, paths: Paths) -> None:
    """Refuse an unusable disk, unsafe hooks or cache before anything is touched.

    format_disk and hooks.run_all check again right before they act; checked
    here too, a wrong DISK_0_PATH or a hooks directory others can write
    fails at once, not after a cache image was built or after the disk was
    partitioned and installed. The cache directory is checked only here,
    just before find_source uses it.
    """
    blockdev.check_disk_usable(request.disk_path)
    if request.swap_device:
        blockdev.check_disk_usable(request.swap_device)
    blockdev.require_min_size(blockdev.size_bytes(request.disk_path), blockdev.MIN_DISK_MIB,
                              f"The instance disk {request.disk_path}")
    hooks.check_safe(conf.customize_dir)
    if conf.generate_cache:
        cache.check_trusted(paths.cache_dir)


@dataclass(frozen=True)
class Source:
    """Where the system comes from: the cache (archive, image) or a bootstrap."""

    store: cache.Cache
    key: cache.CacheKey
    entry: cache.CacheEntry | None = None
    image: image_cache.FsImage | None = None


def find_source(hold: contextlib.ExitStack, p: Plan, paths: Paths) -> Source:
    """Look up (and lock) the cache for this plan; make its image if needed.

    The key's lock is registered on ``hold``. A complete cache (archive
    and, with CACHE_IMAGE=yes, its image) is read under a shared lock, so
    that creates copying it run side by side; a missing or stale one is
    made or repaired under an exclusive lock, so that concurrent creates
    with the same inputs bootstrap once while the others wait, and nobody
    replaces the archive or image while another create copies from it.
    With GENERATE_CACHE=no the cache is not used at all, as in the shell
    edition: every create bootstraps.
    """
    key = cache.CacheKey.from_settings(p.settings, p.tool, p.arch)
    store = cache.Cache(paths.cache_dir, clean_days=p.settings.clean_cache_days)
    if not p.settings.generate_cache:
        return Source(store, key)
    store.expire()
    image_cache.prune(store.directory)
    fstype, want_image = p.params.filesystem, p.settings.cache_image

    def complete() -> Source | None:
        entry = store.peek(key)
        if entry is None:
            return None
        if not want_image:
            return Source(store, key, entry)
        image = image_cache.lookup(entry, fstype)
        return Source(store, key, entry, image) if image else None

    use = hold.enter_context(store.using(key, complete))
    if use.found is not None:
        return use.found
    entry = store.lookup(key)
    if entry is None:
        # This create bootstraps, holding the lock until the cache is stored.
        return Source(store, key)
    image = None
    if want_image:
        try:
            with log.phase("filesystem image"):
                image = image_cache.ensure(store, entry, fstype)
        except DefinitionError as exc:
            # The archive still works: a failed image must not fail the create.
            logger.warning("Cannot use a filesystem image of the cache (%s); "
                           "unpacking the archive instead", exc)
    # Complete (or as complete as it gets): others may read it with us.
    use.share()
    return Source(store, key, entry, image)


def install_system(p: Plan, source: Source, target_dir: str) -> None:
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
        store_cache(p, source, target_dir)


def store_cache(p: Plan, source: Source, target_dir: str) -> None:
    """Archive the freshly bootstrapped tree (and make its image) as the cache."""
    try:
        entry = source.store.store(source.key, target_dir)
        if p.settings.cache_image:
            # Made now, from the tree at hand and under the lock, so that
            # creates waiting for this cache copy the image at once instead
            # of one of them unpacking and making it.
            with log.phase("filesystem image"):
                image_cache.build(source.store, entry, p.params.filesystem,
                                  tree=target_dir)
    except DefinitionError as exc:
        # The instance is complete: a cache that cannot be written (a full
        # /var) must not fail it, and make Ganeti remove its disks.
        logger.warning("Could not store the bootstrap cache (or its image), so "
                       "the next create makes it again; the instance is fine. "
                       "%s", exc)


def run(request: Request, paths: Paths) -> None:
    """Create the instance's root (and API 5 swap) on its disk."""
    p = plan(request, paths)
    conf = p.settings
    with contextlib.ExitStack() as stack:
        with contextlib.ExitStack() as cache_hold:
            source = find_source(cache_hold, p, paths)
            disk = instance_disk.format_disk(stack, request, conf, p.params.filesystem,
                                             p.arch, image=source.image)
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
            else:
                with log.phase("install system"):
                    install_system(p, source, target_dir)
        # The cache's lock is released: hooks may take long, and other
        # creates need not wait for them.
        target = Target(target_dir)
        with log.phase("configure instance"):
            instance_files.configure(target, p.instance, root=disk.root, swap=disk.swap,
                                     esp=disk.esp)
        bootloader.install(target, request, conf, disk_device=disk.device,
                           root_uuid=disk.root.uuid, esp_device=disk.esp_device)
        hook_list = hooks.list_hooks(conf.customize_dir)
        if hook_list:
            with log.phase(f"hooks ({len(hook_list)})"):
                env = hooks.environment(request, conf, p.arch, target_dir,
                                        blockdev=disk.device, fsysdev=disk.root_device)
                interfaces = network.interfaces_snapshot(target)
                with mounts.api_filesystems(target_dir), hooks.daemons_prevented(target):
                    hooks.run_all(conf.customize_dir, env, timeout=conf.hook_timeout)
            network.yield_to_hooks(target, interfaces)
            bootloader.repair_config(target, request, conf, disk.root.uuid)
        # What is left to do is the ExitStack's: unmount (writeback) and
        # release the mappings and loop devices. Closed here, inside a phase,
        # so that its time is logged like every other step's.
        with log.phase("unmount and release"):
            stack.close()
    logger.info("Instance %s created on %s", request.instance_name, request.disk_path)
