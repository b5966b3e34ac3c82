"""The bootstrap cache as create uses it: where the system comes from.

create makes two calls: ``open_source`` before the disk is touched (expire
old archives and images, find this plan's archive and its filesystem image,
lock the key, make or repair what is missing) and, after a bootstrap,
``store_tree`` (archive the tree and make its image). The locking protocol
lives here and in cache_store, nowhere else.

The cache is three flat modules, not a subpackage, because the package is
installed flat (Makefile.am installs ganeti_debootstrap/*.py; the build
tests and uninstall check that list):

- ``cache`` (this module): the entry points create calls;
- ``cache_store``: the directory: every file name, keys, records, locking,
  expiry, the archives themselves;
- ``cache_images``: the filesystem image of an archive, per fs type.

Writing an image onto an instance's disk is the disk's (image_copy.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass

from . import cache_images, log, trust
from .cache_images import FsImage
from .cache_store import Cache, CacheEntry, CacheKey
from .errors import CacheError, DefinitionError
from .settings import Settings

logger = logging.getLogger(__name__)


def check_trusted(directory: str, *, trusted_uids: Collection[int] | None = None) -> None:
    """Refuse (CacheError) a cache directory that anyone but root can change.

    The directory and everything above it must belong to root and not be
    writable by group or others (trust.py); while it does not exist yet,
    the directory it will be made in is checked.
    """
    trust.check_existing_part(directory, trust.Purpose(
        action=f"use the bootstrap cache in {directory}",
        reason="What the cache holds is unpacked as root into every new instance",
        consequence="put their own programs, run as root, into every instance "
                    "made from it",
        error=CacheError,
        alternative=" (or set GENERATE_CACHE=no to bootstrap every instance "
                    "afresh)"), trusted_uids=trusted_uids)


@dataclass(frozen=True)
class Source:
    """Where the system comes from: the cache (archive, image) or a bootstrap."""

    store: Cache
    key: CacheKey
    entry: CacheEntry | None = None
    image: FsImage | None = None


def open_source(hold: contextlib.ExitStack, conf: Settings, tool: str, arch: str,
                fstype: str, directory: str) -> Source:
    """Look up (and lock) the cache for these inputs; make its image if needed.

    Archives older than CLEAN_CACHE and images whose archive is gone are
    removed first. The key's lock is registered on ``hold``. A complete
    cache (archive and, with CACHE_IMAGE=yes, its ``fstype`` image) is read
    under a shared lock, so that creates copying it run side by side; a
    missing or stale one is made or repaired under an exclusive lock, so
    that concurrent creates with the same inputs bootstrap once while the
    others wait, and nobody replaces the archive or image while another
    create copies from it. A Source without ``entry`` means: bootstrap,
    then ``store_tree`` (the exclusive lock is held until ``hold`` closes).
    With GENERATE_CACHE=no the cache is not used at all, as in the shell
    edition: every create bootstraps.
    """
    key = CacheKey.from_settings(conf, tool, arch)
    store = Cache(directory, clean_days=conf.clean_cache_days)
    if not conf.generate_cache:
        return Source(store, key)
    store.expire()
    want_image = conf.cache_image

    def complete() -> Source | None:
        entry = store.peek(key)
        if entry is None:
            return None
        if not want_image:
            return Source(store, key, entry)
        image = cache_images.lookup(entry, fstype)
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
                image = cache_images.ensure(store, entry, fstype)
        except DefinitionError as exc:
            # The archive still works: a failed image must not fail the create.
            logger.warning("Cannot use a filesystem image of the cache (%s); "
                           "unpacking the archive instead", exc)
    # Complete (or as complete as it gets): others may read it with us.
    use.share()
    return Source(store, key, entry, image)


def store_tree(source: Source, tree: str, fstype: str, make_image: bool) -> None:
    """Archive the freshly bootstrapped ``tree`` (and make its image) as the cache.

    ``source`` is what open_source gave without an entry (its exclusive
    lock still held). A failure is logged, not raised: the instance is
    complete, and a cache that cannot be written (a full /var) must not
    fail it and make Ganeti remove its disks.
    """
    try:
        entry = source.store.store(source.key, tree)
        if make_image:
            # Made now, from the tree at hand and under the lock, so that
            # creates waiting for this cache copy the image at once instead
            # of one of them unpacking and making it.
            with log.phase("filesystem image"):
                cache_images.build(source.store, entry, fstype, tree=tree)
    except DefinitionError as exc:
        logger.warning("Could not store the bootstrap cache (or its image), so "
                       "the next create makes it again; the instance is fine. "
                       "%s", exc)
