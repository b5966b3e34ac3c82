"""The bootstrap cache's directory: names, keys, records, locking, expiry, archives.

An archive is ``cache-<suite>-<arch>-<digest>.tar`` (the shell edition's
``cache-<suite>-<arch>.tar`` plus a digest of every input that changes the
tree), with ``<stem>.inputs.json`` beside it recording those inputs and the
archive's size and mtime. Its filesystem images (cache_images.py) are
``<stem>.<fstype>.img`` with ``<stem>.<fstype>.img.json``. A per-key lock
file coordinates concurrent creates on a node: one builds (exclusive), the
others wait, then read the finished cache side by side (shared). A refresh
(cache_refresh.py) reads the entry under the shared lock like a create,
holds the key's second lock (``<stem>.refresh.lock``) against another
refresh, and takes the key exclusively only to swap its new files in.

Every name in the cache directory, temporaries included, is defined here
once: the images' module imports them, and expiry, leftover removal and
pruning of images whose archive is gone all match the same patterns. (How
the cache's three modules divide the work: see cache.py.)

Archives are written under a temporary name and renamed into place, so the
real name only ever holds a complete archive; leftovers of a killed run are
removed by the next run that holds the key's lock. GNU tar keeps owners,
modes, hard links, device nodes, ACLs, extended attributes and file
capabilities; Python's tarfile loses the last three, so it is not used.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from . import mounts, runner
from .bootstrap import packages, resolved_arch
from .fsutil import atomic_write, fsync_path, temporary_file
from .errors import CacheError, CommandError
from .settings import Settings

log = logging.getLogger(__name__)

# Raised whenever what goes into an archive or an image, or how, changes
# incompatibly: files made by an older format are then simply not found
# again (images record it; for archives it is part of the key).
FORMAT_VERSION = 1

DIGEST_LENGTH = 12
ARCHIVE_SUFFIX = ".tar"
INPUTS_SUFFIX = ".inputs.json"
LOCK_SUFFIX = ".lock"
# The second lock of a key: held by a refresh from start to end, so that
# two refreshes of an entry never run at once (cache_refresh.py).
REFRESH_LOCK_SUFFIX = ".refresh" + LOCK_SUFFIX
IMAGE_SUFFIX = ".img"  # after the filesystem type: <stem>.ext4.img
IMAGE_RECORD_SUFFIX = IMAGE_SUFFIX + ".json"
TMP_TAG = ".tmp-"
STAGING_TAG = ".staging-"
# Files of an entry on their way between nodes (cache_push.py): hidden, not
# "cache-*", so that nothing here takes them for an entry or a temporary of
# one; ``.push-<token>-<the entry file's name>``.
PUSH_TAG = ".push-"

# Names of our own files. Expiry looks at every ``cache-*.tar`` (the shell
# edition's names too) and at our temporaries, never at anything else.
_STEM = r"cache-.+-[0-9a-f]{%d}" % DIGEST_LENGTH
# What follows the stem in the name of an image or of its record: the
# filesystem type (filesystems.ROOT_TYPES), .img, then .json for the record.
_IMAGE_TYPES = r"(?:ext[234]|xfs|btrfs)"
_IMAGE = r"\.%s%s(?:%s)?" % (_IMAGE_TYPES, re.escape(IMAGE_SUFFIX),
                              re.escape(IMAGE_RECORD_SUFFIX[len(IMAGE_SUFFIX):]))
# The temporaries of images (``<stem>.ext4.img.tmp-*``) count too: a run
# killed while making an image must not leave hundreds of MiB behind until
# some later run makes an image of that type again.
_TEMPORARY = re.compile(
    r"^(?P<stem>%s)(?:%s|%s|%s|%s)[A-Za-z0-9_]+$" % (
        _STEM, re.escape(ARCHIVE_SUFFIX + TMP_TAG), re.escape(INPUTS_SUFFIX + TMP_TAG),
        re.escape(STAGING_TAG), _IMAGE + re.escape(TMP_TAG)))
_INPUTS = re.compile(r"^(?P<stem>%s)%s$" % (_STEM, re.escape(INPUTS_SUFFIX)))
_OURS = re.compile(r"^%s%s$" % (_STEM, re.escape(ARCHIVE_SUFFIX)))
# Images and their records, by any cache- name: pruned once their archive is gone.
_IMAGE_FILE = re.compile(r"^(?P<stem>cache-.+)%s$" % _IMAGE)
# An image itself (not its record), with its filesystem type.
_IMAGE_ONLY = re.compile(r"^(?P<stem>cache-.+)\.(?P<fstype>%s)%s$"
                         % (_IMAGE_TYPES, re.escape(IMAGE_SUFFIX)))

# A push name older than this was left by a push that was killed.
STALE_PUSH_SECONDS = 86400
# The list of what one push sends (cache_push.py), sent last.
MANIFEST_SUFFIX = ".manifest.json"
# A file of an entry: its archive, record, images and their records.
_ENTRY_FILE = re.compile(r"^(?P<stem>%s)(?:%s|%s|%s)$" % (
    _STEM, re.escape(ARCHIVE_SUFFIX), re.escape(INPUTS_SUFFIX), _IMAGE))
_PUSHED = re.compile(r"^%s(?P<token>[0-9a-f]+)-(?P<name>(?P<stem>%s)(?:%s|%s|%s|%s))$" % (
    re.escape(PUSH_TAG), _STEM, re.escape(ARCHIVE_SUFFIX), re.escape(INPUTS_SUFFIX),
    _IMAGE, re.escape(MANIFEST_SUFFIX)))

# The record's field holding when the archive's packages were last brought
# up to date without a new bootstrap (a refresh); absent: never.
REFRESHED_FIELD = "refreshed"

# Paths every usable Debian tree has; an archive without them is damaged.
ESSENTIALS = ("etc/os-release", "etc/debian_version", "usr/bin/dpkg")

# GNU tar options keeping everything a root filesystem needs. Creating:
# --xattrs stores every attribute: file capabilities (security.capability)
# and POSIX ACLs (system.posix_acl_*, which hold numeric ids); --numeric-owner
# stores uid/gid without the node's names (the tree's own passwd is what
# counts); --sparse keeps holes; --one-file-system keeps a mount left inside
# the tree out of the archive.
# --acls is deliberately not used: tar 1.34 writes ACLs as text with the
# node's user and group names and, on extraction, maps them back through the
# node's names, over the numeric attribute (tried: a group renumbered on the
# node changed the instance's ACL). The raw attributes keep the instance's ids.
TAR_CREATE_OPTIONS = ("--format=posix", "--numeric-owner", "--xattrs",
                      "--xattrs-include=*", "--sparse", "--one-file-system")
# Extracting: tar restores only user.* attributes unless told to include all
# of them; owners and modes as archived, by number.
TAR_EXTRACT_OPTIONS = ("--preserve-permissions", "--same-owner",
                       "--numeric-owner", "--xattrs", "--xattrs-include=*")

TAR_BLOCK = 512
SECONDS_PER_DAY = 86400
# Times in records ("created", "refreshed"): UTC, to the second.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Failed attempts to convert a shared lock to an exclusive one without
# waiting before a create waits for the conversion instead.
_UPGRADE_TRIES = 3

_Found = TypeVar("_Found")


@dataclass(frozen=True)
class CacheKey:
    """Every input that changes the bootstrapped tree."""

    suite: str
    arch: str
    mirror: str
    components: tuple[str, ...]
    extra_pkgs: tuple[str, ...]
    tool: str
    format: int = FORMAT_VERSION

    @classmethod
    def from_settings(cls, settings: Settings, tool: str,
                      arch: str | None = None) -> CacheKey:
        """The key for ``settings`` bootstrapped with ``tool``.

        An empty ARCH is resolved to the node's (or to ``arch`` when the
        caller already resolved it), so the key is explicit; EXTRA_PKGS are
        sorted (the tools ignore their order), COMPONENTS are kept in order
        (it shows in the tree's sources.list).
        """
        return cls(suite=settings.suite,
                   arch=settings.arch or arch or resolved_arch(settings),
                   mirror=settings.mirror, components=tuple(settings.components),
                   extra_pkgs=packages(settings), tool=tool)

    @classmethod
    def from_inputs(cls, data: object) -> CacheKey | None:
        """The key an inputs file records (``inputs()``), or None if it is not one."""
        if not isinstance(data, dict):
            return None
        values: dict[str, Any] = dict(data)
        try:
            values["components"] = tuple(values.get("components", ()))
            values["extra_pkgs"] = tuple(values.get("extra_pkgs", ()))
            key = cls(**values)
        except TypeError:
            return None
        return key if key.inputs() == data else None

    def describe(self) -> str:
        """The inputs in one line, for log messages."""
        return (f"{self.suite}/{self.arch} with {self.tool} (mirror: "
                f"{self.mirror or 'default'}, components: "
                f"{','.join(self.components) or 'default'}, extra packages: "
                f"{','.join(self.extra_pkgs) or 'none'})")

    def inputs(self) -> dict[str, Any]:
        """The key as plain data, as recorded in the inputs file."""
        data = asdict(self)
        data["components"] = list(self.components)
        data["extra_pkgs"] = list(self.extra_pkgs)
        return data

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.inputs(), sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]

    @property
    def stem(self) -> str:
        """The file name without suffix, recognisable to administrators."""
        return f"cache-{self.suite}-{self.arch}-{self.digest}"


@dataclass(frozen=True)
class CacheEntry:
    """A validated archive for ``key``."""

    key: CacheKey
    path: str  # the archive
    inputs_file: str


@dataclass(frozen=True)
class StoredImage:
    """A filesystem image file of an archive, as found in the directory."""

    fstype: str
    path: str
    size: int


@dataclass(frozen=True)
class StoredArchive:
    """An archive in the cache directory as it is, for the administrator's view.

    ``key`` is what its inputs file records (None: the shell edition's
    name, or no readable record); ``kept``: its owner-write bit is removed,
    so expiry never drops it.
    """

    path: str
    stem: str
    key: CacheKey | None
    record: dict[str, Any] | None
    size: int
    mtime: float
    kept: bool
    images: tuple[StoredImage, ...]
    legacy: bool = False  # the shell edition's cache-SUITE-ARCH.tar, never used

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def refreshed(self) -> str | None:
        """When its packages were last refreshed (the record says), or None."""
        value = (self.record or {}).get(REFRESHED_FIELD)
        return value if isinstance(value, str) else None

    @property
    def total_size(self) -> int:
        """Bytes of the archive and its images."""
        return self.size + sum(i.size for i in self.images)


def image_name(stem: str, fstype: str) -> str:
    """The file name of the ``fstype`` image of the archive ``<stem>.tar``."""
    return f"{stem}.{fstype}{IMAGE_SUFFIX}"


def push_name(name: str, token: str) -> str:
    """The name an entry's file ``name`` has while push sends it to other nodes."""
    return f"{PUSH_TAG}{token}-{name}"


def pushed_name(name: str) -> tuple[str, str, str] | None:
    """(token, stem, file name) of a push's ``name``; None if it is not one of ours."""
    match = _PUSHED.match(name)
    if match is None:
        return None
    return match.group("token"), match.group("stem"), match.group("name")


def entry_file_stem(name: str) -> str | None:
    """The stem of the entry ``name`` (archive, record, image) belongs to, or None."""
    match = _ENTRY_FILE.match(name)
    return match.group("stem") if match else None


def image_record_name(stem: str, fstype: str) -> str:
    """The file name of the record describing that image."""
    return f"{stem}.{fstype}{IMAGE_RECORD_SUFFIX}"


def extract_archive(archive: str, dest: str) -> None:
    """Unpack a cache archive (ours, root's) into ``dest`` with owners, modes,
    ACLs, xattrs; the caller holds its key's lock."""
    runner.run(["tar", "--extract", "--file", archive,
                "--directory", dest, *TAR_EXTRACT_OPTIONS],
               hint=f"Unpacking the cache failed. If the instance disk is "
                    f"not full, the cache may be damaged: remove "
                    f"{archive} and retry.")



class Cache:
    """The cache directory; see the module docstring for its layout."""

    def __init__(self, directory: str, clean_days: int | None = None) -> None:
        self.directory = directory
        self.clean_days = clean_days
        # The keys whose lock we hold: True if exclusively.
        self._held: dict[str, bool] = {}
        # The keys whose refresh lock we hold.
        self._refreshing: set[str] = set()

    def exists(self) -> bool:
        """Whether the cache directory exists (nothing was ever cached if not)."""
        return os.path.isdir(self.directory)

    def archive_path(self, key: CacheKey) -> str:
        return os.path.join(self.directory, key.stem + ARCHIVE_SUFFIX)

    def inputs_path(self, key: CacheKey) -> str:
        return os.path.join(self.directory, key.stem + INPUTS_SUFFIX)

    def lock_path(self, key: CacheKey) -> str:
        return self._lock_file(key.stem)

    def _lock_file(self, stem: str) -> str:
        return os.path.join(self.directory, stem + LOCK_SUFFIX)

    def refresh_lock_path(self, key: CacheKey) -> str:
        return self._refresh_lock_file(key.stem)

    def _refresh_lock_file(self, stem: str) -> str:
        return os.path.join(self.directory, stem + REFRESH_LOCK_SUFFIX)

    # -- locking ---------------------------------------------------------
    #
    # Each key has one lock file, flocked two ways. Exclusive: to build,
    # repair, replace or expire the key's archive and images (and remove
    # leftovers of killed runs). Shared: to read a cache found complete,
    # so that creates copying the same image run side by side. A create
    # starts shared; when what it needs is missing it tries to become the
    # builder, and if another create already is, it waits (shared) until
    # that one is done and then reads alongside the others.

    @contextlib.contextmanager
    def using(self, key: CacheKey,
              probe: Callable[[], _Found | None]) -> Iterator[KeyUse[_Found]]:
        """Hold ``key``'s lock: shared if ``probe`` finds what is needed, else exclusive.

        ``probe`` runs under the shared lock and must not change anything;
        what it returns is the yielded ``found``. When it returns None, the
        lock is taken exclusively (``found`` is None): the caller builds
        or repairs, then may call ``share()`` so that others waiting read
        alongside it. A create that cannot take it exclusively because
        another is building waits for that one and probes again, so four
        creates on a cold node bootstrap once and then copy in parallel.
        A probe that always returns None takes the lock exclusively.

        The lock is an flock on ``<stem>.lock``: it dies with its process,
        so a killed run never blocks the next. Once held exclusively,
        temporaries a killed run left for this key are removed. Not
        reentrant: flock locks belong to open files, so locking a held key
        again deadlocks.
        """
        self._make_directory()
        lock = _KeyLock(self._lock_file(key.stem))
        stem = key.stem
        try:
            for attempt in itertools.count():
                if not lock.acquire(exclusive=False, wait=False):
                    self._say_waiting(stem)
                    lock.acquire(exclusive=False, wait=True)
                self._held[stem] = False
                found = probe()
                if found is not None:
                    use = KeyUse(self, stem, lock, found)
                    yield use
                    return
                del self._held[stem]
                # Converting our shared lock: without waiting, so that a
                # create that lost the race waits (shared, above) for the
                # builder rather than queueing behind it and every reader
                # after it. Two readers converting at once may both fail;
                # after a few tries, waiting settles it.
                if lock.acquire(exclusive=True, wait=attempt >= _UPGRADE_TRIES):
                    break
                time.sleep(random.uniform(0.01, 0.05))
            with self._holding(stem, lock):
                yield KeyUse(self, stem, lock, None)
        finally:
            self._held.pop(stem, None)
            lock.release()

    @contextlib.contextmanager
    def refreshing(self, key: CacheKey) -> Iterator[None]:
        """Hold ``key``'s refresh lock: one refresh of an entry at a time.

        Taken before the key's own lock (``using``) and independent of it:
        creates never look at it. A second refresh of the entry waits for
        the first. While it is held, nobody removes the key's temporaries
        (they may be the refresh's own staging tree and files).
        """
        self._make_directory()
        lock = _KeyLock(self._refresh_lock_file(key.stem))
        try:
            if not lock.acquire(exclusive=True, wait=False):
                log.info("Waiting for another refresh of the cache %s (lock %s)",
                         key.stem, lock.path)
                lock.acquire(exclusive=True, wait=True)
            self._refreshing.add(key.stem)
            yield
        finally:
            self._refreshing.discard(key.stem)
            lock.release()

    def _refresh_running(self, stem: str) -> bool:
        """Whether a refresh of ``stem`` runs (ours, or another process's)."""
        if stem in self._refreshing:
            return True
        try:
            fd = os.open(self._refresh_lock_file(stem), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _make_directory(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
        except OSError as err:
            raise CacheError(
                f"Cannot create the cache directory {self.directory}: "
                f"{err.strerror}. Make it writable by root, or set "
                f"GENERATE_CACHE=no to bootstrap every instance afresh.") from err

    def _say_waiting(self, stem: str) -> None:
        log.info("Waiting for another run using the cache %s (lock %s)",
                 stem, self._lock_file(stem))

    @contextlib.contextmanager
    def _holding(self, stem: str, lock: _KeyLock) -> Iterator[None]:
        """Mark ``stem`` held exclusively; tidy the key's files at both ends."""
        self._held[stem] = True
        try:
            try:
                self._remove_leftovers(stem)
            except (OSError, CacheError) as err:
                # A leftover (say, a tree with a mount left in it) does
                # not stop this run: its own files get other names.
                log.warning("Could not remove a leftover of an "
                            "interrupted run: %s", err)
            yield
        finally:
            if lock.exclusive:
                # A key that left no archive (a miss without GENERATE_CACHE,
                # a failed build) leaves no lock file behind either.
                with contextlib.suppress(OSError):
                    self._forget_lock(stem)
            self._held.pop(stem, None)

    @contextlib.contextmanager
    def _flock(self, stem: str, wait: bool) -> Iterator[bool]:
        """Lock ``stem`` exclusively; yields False (not waiting) if another holds it."""
        lock = _KeyLock(self._lock_file(stem))
        try:
            yield lock.acquire(exclusive=True, wait=wait)
        finally:
            lock.release()

    def _mark_shared(self, stem: str) -> None:
        self._held[stem] = False

    def _require_lock(self, key: CacheKey, exclusive: bool = True) -> None:
        held = self._held.get(key.stem)
        if held is None:
            raise RuntimeError(f"cache key {key.stem} used without its lock")
        if exclusive and not held:
            raise RuntimeError(f"cache key {key.stem} changed under a shared lock")

    def _require_refresh(self, key: CacheKey) -> None:
        """The key's lock (shared is enough) and its refresh lock must be held.

        A refresh writes its staging tree and the record's refresh time
        under the shared lock: creates only read, and no other writer runs
        (an exclusive one waits for our shared lock, another refresh for
        the refresh lock).
        """
        self._require_lock(key, exclusive=False)
        if key.stem not in self._refreshing:
            raise RuntimeError(f"cache key {key.stem} refreshed without its refresh lock")

    def _may_change(self, key: CacheKey) -> None:
        """The key's exclusive lock, or a refresh's locks, must be held."""
        if not self._held.get(key.stem):
            self._require_refresh(key)

    def _remove_leftovers(self, stem: str) -> None:
        """Remove temporaries of ``stem`` (we hold its lock: none is in use).

        Unless a refresh runs: its staging tree and files are temporaries
        too, and a refresh turns its shared lock into an exclusive one
        (not atomic with flock) to swap them in.
        """
        if self._refresh_running(stem):
            return
        for name in sorted(os.listdir(self.directory)):
            match = _TEMPORARY.match(name)
            if match and match.group("stem") == stem:
                log.info("Removing %s, left by an interrupted run",
                         os.path.join(self.directory, name))
                _remove_path(os.path.join(self.directory, name))

    # -- lookup ----------------------------------------------------------

    def peek(self, key: CacheKey) -> CacheEntry | None:
        """The archive for ``key`` if its record vouches for it as it is; else None.

        Changes nothing, so a shared lock is enough: an archive that is
        missing, changed since it was recorded or recorded for other inputs
        is for ``lookup`` (exclusive lock) to check, repair or remove.
        """
        self._require_lock(key, exclusive=False)
        archive, inputs_file = self.archive_path(key), self.inputs_path(key)
        try:
            st = os.stat(archive)
        except OSError:
            return None
        record = _read_record(inputs_file, quiet=True)
        if (not stat.S_ISREG(st.st_mode) or record is None
                or record["key"] != key.inputs() or not _vouches(record, st)):
            return None
        log.info("Using the cache %s", archive)
        return CacheEntry(key, archive, inputs_file)

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        """The valid archive for ``key``, or None.

        A damaged archive (or one recorded for other inputs) is removed. An
        archive whose size or mtime changed since it was recorded is checked
        in full; a valid one is an administrator's repack and is kept.
        """
        self._require_lock(key)
        archive, inputs_file = self.archive_path(key), self.inputs_path(key)
        if not os.path.isfile(archive):
            if os.path.lexists(inputs_file):
                _remove_path(inputs_file)
            self._mention_legacy(key)
            return None
        entry = CacheEntry(key, archive, inputs_file)
        record = _read_record(inputs_file)
        if record is not None and record.get("key") != key.inputs():
            log.warning("The cache %s was recorded for other inputs (%s); "
                        "removing it", archive, inputs_file)
            self._discard(entry)
            return None
        st = os.stat(archive)
        if record is not None and _vouches(record, st):
            log.info("Using the cache %s", archive)
            return entry
        problem = check_archive(archive)
        if problem:
            log.warning("The cache %s is damaged (%s); removing it",
                        archive, problem)
            self._discard(entry)
            return None
        if record is None:
            log.warning("The cache %s has no valid record of its inputs; "
                        "its name matches them, recording them again", archive)
        else:
            log.info("The cache %s changed since it was recorded (size or "
                     "modification time; repacked by an administrator?); it "
                     "is a valid tree, using it", archive)
        self._record(key, archive, inputs_file, record)
        return entry

    def _mention_legacy(self, key: CacheKey) -> None:
        legacy = os.path.join(self.directory,
                              f"cache-{key.suite}-{key.arch}{ARCHIVE_SUFFIX}")
        if os.path.exists(legacy):
            log.info("Not using %s: the shell edition's cache records no "
                     "inputs. Site changes made in it must be made again in "
                     "the new cache (or in a hook).", legacy)

    def _discard(self, entry: CacheEntry) -> None:
        for path in (entry.path, entry.inputs_file):
            if os.path.lexists(path):
                os.unlink(path)

    # -- storing ---------------------------------------------------------

    @contextlib.contextmanager
    def staging_dir(self, key: CacheKey) -> Iterator[str]:
        """An empty root directory on the cache's filesystem, removed on exit.

        It sits in a private (0700) directory, so that nobody reaches the
        tree's setuid programs while it is built; the root itself is 0755,
        as the instance's / must be. Under the key's exclusive lock, or a
        refresh's (``refreshing``, the key shared).
        """
        self._may_change(key)
        root = mounts.make_private_root(key.stem + STAGING_TAG, self.directory)
        parent = os.path.dirname(root)
        try:
            yield root
        except BaseException:
            # The original error matters more than a failed cleanup; the
            # next run holding this key's lock retries the removal.
            try:
                _remove_path(parent)
            except (OSError, CacheError) as err:
                log.warning("Could not remove %s: %s", parent, err)
            raise
        _remove_path(parent)

    def store(self, key: CacheKey, tree: str, *, refreshed: bool = False) -> CacheEntry:
        """Archive ``tree`` as ``key``'s cache; never half-written.

        The archive (0600: it holds the image's /etc/shadow) is written under
        a temporary name, synced and renamed into place after its inputs file.
        Readers that opened the old archive keep reading it. ``refreshed``:
        the tree is the old entry upgraded (cache_refresh.py): its record
        keeps the creation time and records the refresh.
        """
        self._require_lock(key)
        with temporary_file(self.directory, self.archive_tmp_prefix(key)) as tmp:
            self.write_archive(tree, tmp)
            return self._install(key, tmp, refreshed)

    def archive_tmp_prefix(self, key: CacheKey) -> str:
        """The name prefix of ``key``'s archive being written."""
        return key.stem + ARCHIVE_SUFFIX + TMP_TAG

    def write_archive(self, tree: str, path: str, exclude: tuple[str, ...] = ()) -> None:
        """Archive ``tree`` into the (temporary) file ``path``, synced, 0600.

        ``exclude``: members (``./name``, anchored) left out, such as the
        lost+found of a tree that is a mounted filesystem image.
        """
        excluded = ["--anchored", *(f"--exclude={e}" for e in exclude)] if exclude else []
        runner.run(["tar", "--create", "--file", path, "--directory", tree,
                    *TAR_CREATE_OPTIONS, *excluded, "."],
                   hint=f"Writing the cache in {self.directory} failed: "
                        f"check that its filesystem has room.")
        os.chmod(path, 0o600)
        fsync_path(path)

    def replace(self, key: CacheKey, archive: str, expected: os.stat_result) -> CacheEntry:
        """Put the written ``archive`` in place of ``key``'s as refreshed (exclusive lock).

        ``expected`` is the old archive's status when the refresh read it:
        an archive replaced or removed meanwhile (the refresh held no lock
        for a moment while turning its shared lock into an exclusive one)
        is not overwritten; CacheError says to run the refresh again.
        """
        self._require_lock(key)
        now = _lstat(self.archive_path(key))
        if now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != (
                expected.st_ino, expected.st_size, expected.st_mtime_ns):
            raise CacheError(f"The cache {self.archive_path(key)} was replaced or "
                             f"removed while it was being refreshed; the refreshed "
                             f"copy is dropped. Run the refresh again.")
        return self._install(key, archive, refreshed=True)

    def _install(self, key: CacheKey, tmp: str, refreshed: bool) -> CacheEntry:
        """Rename the written archive ``tmp`` into place after its record."""
        archive, inputs_file = self.archive_path(key), self.inputs_path(key)
        previous = _read_record(inputs_file) if refreshed else None
        # The inputs go first: a crash between the renames leaves inputs
        # without an archive, which lookup ignores.
        self._record(key, tmp, inputs_file, previous, refreshed)
        os.replace(tmp, archive)
        fsync_path(self.directory)
        size = os.path.getsize(archive)
        log.info("Stored the cache %s (%.0f MiB)", archive, size / 2**20)
        return CacheEntry(key, archive, inputs_file)

    def mark_refreshed(self, key: CacheKey) -> None:
        """Record that ``key``'s archive was found up to date now (a refresh).

        The archive is left as it is; expiry counts its age from now on.
        """
        self._may_change(key)
        archive, inputs_file = self.archive_path(key), self.inputs_path(key)
        self._record(key, archive, inputs_file, _read_record(inputs_file),
                     refreshed=True)

    def record(self, entry: CacheEntry) -> dict[str, Any] | None:
        """The parsed inputs file of ``entry`` (created, refreshed, ...), or None."""
        return _read_record(entry.inputs_file, quiet=True)

    def _record(self, key: CacheKey, archive: str, inputs_file: str,
                previous: dict[str, Any] | None, refreshed: bool = False) -> None:
        """Write the inputs file describing ``archive`` atomically.

        ``previous`` is the record being replaced (its creation and refresh
        times are kept); None when the archive is new or its record was
        lost. ``refreshed``: record now as the time of the last refresh.
        """
        st = os.stat(archive)
        now = time.strftime(TIME_FORMAT, time.gmtime())
        record: dict[str, Any] = {
            "comment": "Inputs of the bootstrap cache beside this file, "
                       "written by ganeti-instance-debootstrap.",
            "archive": os.path.basename(self.archive_path(key)),
            "key": key.inputs(),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "created": now if previous is None else previous.get("created", now),
        }
        if refreshed:
            record[REFRESHED_FIELD] = now
        elif previous is not None and REFRESHED_FIELD in previous:
            record[REFRESHED_FIELD] = previous[REFRESHED_FIELD]
        if archive == self.archive_path(key) and not refreshed:
            # Recorded for an archive already in place: changed or re-found.
            record["recorded_again"] = now
        atomic_write(inputs_file, json.dumps(record, indent=2) + "\n",
                     tmp_prefix=key.stem + INPUTS_SUFFIX + TMP_TAG)

    # -- using -----------------------------------------------------------

    def extract(self, entry: CacheEntry, dest: str) -> None:
        """Unpack ``entry`` into ``dest`` with owners, modes, ACLs, xattrs."""
        self._require_lock(entry.key, exclusive=False)
        extract_archive(entry.path, dest)

    # -- expiry ----------------------------------------------------------

    def expire(self, now: float | None = None) -> list[str]:
        """Remove archives older than CLEAN_CACHE days; returns their paths.

        Ages count from the archives' mtimes, or from the last refresh
        their record names when that is later (a refresh that found
        nothing to upgrade leaves the archive as it was). An archive whose owner-write bit was
        removed is kept forever; one in use (its lock held) is left for a
        later run. Leftovers of killed runs whose lock is free are removed,
        and so are images whose archive is gone, and push names a killed
        push left (remove_stale_pushes).
        """
        if not os.path.isdir(self.directory):
            return []
        now = time.time() if now is None else now
        removed: list[str] = []
        self.remove_stale_pushes(now)
        names = sorted(os.listdir(self.directory))
        for name in names:
            path = os.path.join(self.directory, name)
            if _TEMPORARY.match(name):
                self._remove_stale(name)
            elif name.startswith("cache-") and name.endswith(ARCHIVE_SUFFIX):
                if self._expire_archive(name, now):
                    removed.append(path)
        for name in names:
            match = _INPUTS.match(name)
            if match and not os.path.lexists(
                    os.path.join(self.directory, match.group("stem") + ARCHIVE_SUFFIX)):
                with self._flock(match.group("stem"), wait=False) as held:
                    if held:
                        _remove_if_exists(os.path.join(self.directory, name))
                        self._forget_lock(match.group("stem"))
        self._prune_images()
        return removed

    def archives(self) -> list[StoredArchive]:
        """Every archive in the directory (ours and the shell edition's), by name.

        Reads without locking: what it reports may change under it (an
        archive expired or stored meanwhile is simply missing or new).
        """
        if not os.path.isdir(self.directory):
            return []
        names = sorted(os.listdir(self.directory))
        images: dict[str, list[StoredImage]] = {}
        for name in names:
            match = _IMAGE_ONLY.match(name)
            if match:
                with contextlib.suppress(FileNotFoundError):
                    path = os.path.join(self.directory, name)
                    images.setdefault(match.group("stem"), []).append(
                        StoredImage(match.group("fstype"), path, os.lstat(path).st_size))
        found = []
        for name in names:
            if not (name.startswith("cache-") and name.endswith(ARCHIVE_SUFFIX)):
                continue
            path = os.path.join(self.directory, name)
            st = _lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue  # removed meanwhile, or not a file
            stem = name[:-len(ARCHIVE_SUFFIX)]
            record = (_read_record(os.path.join(self.directory, stem + INPUTS_SUFFIX),
                                   quiet=True) if _OURS.match(name) else None)
            key = CacheKey.from_inputs(record["key"]) if record else None
            if key is not None and key.stem != stem:
                key = None  # recorded for other inputs: lookup removes it
            found.append(StoredArchive(path, stem, key, record, st.st_size, st.st_mtime,
                                       _kept(st), tuple(images.get(stem, ())),
                                       legacy=not _OURS.match(name)))
        return found

    def remove_stale_pushes(self, now: float) -> None:
        """Remove push names (cache_push.py) a killed push left more than a day ago.

        By ctime: scp -p gives a received file the master's mtime.
        """
        for name in os.listdir(self.directory):
            if pushed_name(name) is None:
                continue
            path = os.path.join(self.directory, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.lstat(path).st_ctime > STALE_PUSH_SECONDS:
                    log.info("Removing %s, left by an interrupted push", path)
                    os.unlink(path)

    def image_types(self, key: CacheKey) -> list[str]:
        """The filesystem types ``key``'s entry has images of, sorted."""
        return sorted({i.fstype for a in self.archives() if a.stem == key.stem
                       for i in a.images})

    def expired(self, now: float | None = None) -> list[str]:
        """The archives ``expire`` would drop now (in use or not); changes nothing."""
        now = time.time() if now is None else now
        found = []
        for archive in self.archives():
            st = _lstat(archive.path)  # None: removed meanwhile
            if st and self._too_old(os.path.basename(archive.path), st, now) and not _kept(st):
                found.append(archive.path)
        return found

    def remove(self, path: str, why: str) -> bool:
        """Remove the archive at ``path`` with its record and images, unless kept or in use.

        Under the key's exclusive lock, not waiting: an archive in use is
        left (False), like expiry does; so is a kept one. ``why`` is logged.
        """
        name = os.path.basename(path)
        st = _lstat(path)
        if st is None:
            return False
        if _kept(st):
            log.info("Keeping %s: its owner-write bit is removed", path)
            return False
        removed = self._remove_archive(name, why)
        if removed:
            self._prune_images()
        return removed

    def _too_old(self, name: str, st: os.stat_result, now: float) -> bool:
        """Whether the archive ``name`` is past CLEAN_CACHE: made (its mtime)
        and last refreshed (its record) longer ago than that."""
        if not stat.S_ISREG(st.st_mode) or self.clean_days is None:
            return False
        limit = self.clean_days * SECONDS_PER_DAY
        if now - st.st_mtime <= limit:
            return False
        refreshed = self._refreshed_at(name)
        return refreshed is None or now - refreshed > limit

    def _prune_images(self) -> None:
        """Remove images whose archive is gone (expired or removed)."""
        names = set(os.listdir(self.directory))
        for name in sorted(names):
            match = _IMAGE_FILE.match(name)
            if match and match.group("stem") + ARCHIVE_SUFFIX not in names:
                _remove_if_exists(os.path.join(self.directory, name))

    def _expire_archive(self, name: str, now: float) -> bool:
        path = os.path.join(self.directory, name)
        st = _lstat(path)
        if st is None or not self._too_old(name, st, now):
            return False
        if _kept(st):
            log.debug("Keeping %s: its owner-write bit is removed", path)
            return False
        return self._remove_archive(name, f"older than {self.clean_days} days "
                                          f"(CLEAN_CACHE)")

    def _remove_archive(self, name: str, why: str) -> bool:
        """Remove the archive ``name`` and its record under its lock; False if in use."""
        path = os.path.join(self.directory, name)
        if not _OURS.match(name):
            # The shell edition's name: no lock or inputs file of ours.
            log.info("Removing the cache %s: %s", path, why)
            os.unlink(path)
            return True
        stem = name[:-len(ARCHIVE_SUFFIX)]
        with self._flock(stem, wait=False) as held:
            if not held:
                log.info("Not removing the old cache %s now: another run is "
                         "using it", path)
                return False
            log.info("Removing the cache %s: %s", path, why)
            os.unlink(path)
            _remove_if_exists(os.path.join(self.directory, stem + INPUTS_SUFFIX))
            self._forget_lock(stem)
        return True

    def _refreshed_at(self, archive_name: str) -> float | None:
        """When the archive ``archive_name`` was last refreshed (its record), or None."""
        if not _OURS.match(archive_name):
            return None
        record = _read_record(os.path.join(
            self.directory, archive_name[:-len(ARCHIVE_SUFFIX)] + INPUTS_SUFFIX), quiet=True)
        return record_time(record, REFRESHED_FIELD) if record else None

    def _remove_stale(self, name: str) -> None:
        match = _TEMPORARY.match(name)
        assert match is not None
        with self._flock(match.group("stem"), wait=False) as held:
            if held and not self._refresh_running(match.group("stem")):
                log.info("Removing %s, left by an interrupted run",
                         os.path.join(self.directory, name))
                try:
                    _remove_path(os.path.join(self.directory, name))
                except (OSError, CacheError) as err:
                    log.warning("Could not remove %s: %s", name, err)
                    return
                self._forget_lock(match.group("stem"))

    def _forget_lock(self, stem: str) -> None:
        """Remove ``stem``'s lock file (held by us) if nothing else needs it.

        Safe while we hold it: a waiter that locked the removed file notices
        and retries on a new one (see _flock).
        """
        if os.path.lexists(os.path.join(self.directory, stem + ARCHIVE_SUFFIX)):
            return
        if any(_TEMPORARY.match(n) and n.startswith(stem + ".")
               for n in os.listdir(self.directory)):
            return
        refresh_lock = _KeyLock(self._refresh_lock_file(stem))
        try:
            if os.path.lexists(refresh_lock.path) and refresh_lock.acquire(
                    exclusive=True, wait=False):
                _remove_if_exists(refresh_lock.path)
        finally:
            refresh_lock.release()
        _remove_if_exists(self._lock_file(stem))


class KeyUse(Generic[_Found]):
    """A held key lock, as ``Cache.using`` gives it."""

    def __init__(self, store: Cache, stem: str, lock: _KeyLock,
                 found: _Found | None) -> None:
        self._store, self._stem, self._lock = store, stem, lock
        self.found = found

    @property
    def exclusive(self) -> bool:
        return self._lock.exclusive

    def share(self) -> None:
        """Turn the exclusive lock into a shared one: the cache is complete now.

        Linux converts an exclusive flock to a shared one in one step (no
        other run can take it exclusively in between), and waiting readers
        start at once.
        """
        if self._lock.exclusive:
            self._lock.acquire(exclusive=False, wait=True)
            self._store._mark_shared(self._stem)

    def take_exclusive(self) -> None:
        """Turn a shared lock into an exclusive one, waiting for the readers.

        Not atomic (flock drops the shared lock first): another run may
        take the key in between, so what was read under the shared lock
        must be checked again (``Cache.replace`` does).
        """
        if not self._lock.exclusive:
            self._store._held.pop(self._stem, None)
            self._lock.acquire(exclusive=True, wait=True)
            self._store._held[self._stem] = True


class _KeyLock:
    """One open lock file, locked shared or exclusive (or not at all)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.exclusive = False

    def acquire(self, exclusive: bool, wait: bool) -> bool:
        """Lock (or convert our lock to) the wanted mode; False if busy and not waiting.

        A conversion that fails has dropped the lock held before (flock
        removes it first): the file is closed, nothing is held then.
        Expiry removes lock files while holding them: a file we locked
        after its removal is no longer the lock, so the path is opened
        again and locked anew.
        """
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(self.fd, op if wait else op | fcntl.LOCK_NB)
            except BlockingIOError:
                self.release()
                return False
            except BaseException:
                self.release()
                raise
            if _same_file(self.fd, self.path):
                self.exclusive = exclusive
                return True
            self.release()

    def release(self) -> None:
        """Close the file, which releases its flock."""
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.exclusive = False


def check_archive(path: str) -> str:
    """Why the archive at ``path`` is not a usable tree, or '' if it is.

    tar must list it completely (a truncated or garbage file fails), an
    uncompressed archive must end with tar's end-of-archive blocks (a file
    cut at a member boundary lists without error), and the basic files of
    a Debian system must be in it.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(TAR_BLOCK)
        if head[257:262] == b"ustar":
            f.seek(max(0, size - 2 * TAR_BLOCK))
            if size % TAR_BLOCK or f.read(2 * TAR_BLOCK).strip(b"\0"):
                return "it lacks tar's end-of-archive marker (truncated)"
    try:
        listing = runner.output(["tar", "--list", "--file", path])
    except CommandError as err:
        tail = err.stderr_tail.strip().splitlines()
        return "tar cannot read it" + (f": {tail[-1]}" if tail else "")
    names = {_member_name(line) for line in listing.splitlines()}
    missing = [p for p in ESSENTIALS if p not in names]
    if missing:
        return f"it lacks {', '.join(missing)}"
    return ""


def _member_name(line: str) -> str:
    """A listed member without the ``./`` prefix or a directory's slash."""
    name = line.strip()
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _read_record(path: str, quiet: bool = False) -> dict[str, Any] | None:
    """The parsed inputs file, or None when missing or unreadable.

    ``quiet``: say nothing of an unusable record (a shared-lock peek: the
    exclusive lookup that follows reports it).
    """
    warn = log.debug if quiet else log.warning
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        warn("Ignoring the unreadable cache record %s: %s", path, err)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict):
        warn("Ignoring the cache record %s: it records no key", path)
        return None
    return data


def record_time(record: dict[str, Any], field: str) -> float | None:
    """The time ``field`` ("created", "refreshed") of a record, in seconds since the epoch.

    None when the record has no such field or it is not a time of ours.
    """
    value = record.get(field)
    if not isinstance(value, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(value, TIME_FORMAT)))
    except ValueError:
        return None


def _vouches(record: dict[str, Any], st: os.stat_result) -> bool:
    """Whether ``record`` describes the archive with status ``st`` as it is now."""
    return record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns


def _lstat(path: str) -> os.stat_result | None:
    """``path``'s own status, or None when it is gone (another process removed it)."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _kept(st: os.stat_result) -> bool:
    """Whether an archive is kept forever: its owner-write bit was removed."""
    return not st.st_mode & stat.S_IWUSR


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove_if_exists(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_path(path: str) -> None:
    """Remove a file or a tree, never crossing into another filesystem.

    A bootstrap tool killed mid-run can leave /proc or /dev mounted inside
    its tree; deleting through such a mount would delete the node's files.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    _remove_tree(path, path, st.st_dev)


def _remove_tree(top: str, path: str, device: int) -> None:
    with os.scandir(path) as entries:
        children = list(entries)
    for child in children:
        st = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != device or os.path.ismount(child.path):
                raise CacheError(
                    f"{child.path} is a mount point inside the temporary "
                    f"bootstrap tree {top}: unmount it (umount -R "
                    f"{child.path}), then remove {top}.")
            _remove_tree(top, child.path, device)
        else:
            os.unlink(child.path)
    try:
        os.rmdir(path)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise
