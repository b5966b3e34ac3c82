"""Refreshing a cache entry: its packages brought up to date without a bootstrap.

``refresh`` holds the key's refresh lock (one refresh of an entry at a
time) and, like a create, its shared lock: creates keep reading the old
entry meanwhile. It upgrades a copy: the entry's filesystem image copied
(reflinked where the filesystem can), grown and mounted, or, for an entry
without a current image, the archive unpacked into a staging tree. In it,
``apt-get update`` and ``apt-get dist-upgrade`` run (noninteractive,
daemons kept from starting by policy-rc.d, /proc, /sys and /dev mounted,
the node's PROXY in the environment as for a bootstrap); the installed
versions before and after are compared (dpkg-query). When nothing was
upgraded, only the refresh time is recorded and the copy dropped. Else the
tree is cleaned as a bootstrap's is, checked (``dpkg --audit`` says
nothing), archived and made into the entry's other images under temporary
names, the copied image shrunk again; then the lock is taken exclusively,
which waits for the creates still copying the old files, and the new
archive and images are renamed over the old ones (records first). A
create that starts during the refresh uses the old entry; one that starts
during the swap waits for it and uses the new one. A failure anywhere
leaves the old entry as it was, and no copy, staging tree or mount behind.

The sources apt upgrades from are the instance's (apt_sources.py: the
release, its -updates suite and the security archive, from MIRROR or from
the mirror the bootstrap wrote into the tree); they are written into a
directory of their own in the staging tree and handed to apt by option,
so the tree's own sources stay as the bootstrap left them. ``sources``
replaces them with the administrator's (a site's staging mirror; the tests'
local archive).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import blockdev, bootstrap, cache_images, filesystems, log, mounts, runner
from .apt_sources import (deb822_text, keyring, one_line_text, read_os_release,
                          resolve_release, tree_mirror)
from .apt_sources import sources as release_sources
from .cache_images import FsImage
from .cache_store import Cache, CacheEntry, CacheKey
from .errors import CacheError
from .fsutil import temporary_file
from .hooks import daemons_prevented
from .settings import Settings
from .target import Target

logger = logging.getLogger(__name__)

# Where the refresh's own APT sources live in the staging tree, removed
# before the tree is archived.
SOURCES_DIR = "/run/ganeti-debootstrap-refresh"
EMPTY_LIST = f"{SOURCES_DIR}/empty.list"
PARTS_DIR = f"{SOURCES_DIR}/sources.list.d"
RESOLV_CONF = "/etc/resolv.conf"
# An image's lost+found, left out of the archive made from the mounted image.
LOST_FOUND = "./lost+found"
# Room added to the copy of the image for apt's downloads and the upgrade;
# the file stays sparse, and the image is shrunk to its minimum again.
ROOM = 2 * 2**30

# dpkg-query's format: one installed package a line.
QUERY_FORMAT = "${binary:Package}\\t${Version}\\t${db:Status-Abbrev}\\n"

APT_ENVIRONMENT = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none"}
# Keep the configuration files the tree has (a bootstrap's are the
# packages' own anyway); no recommends a bootstrap would not have installed.
UPGRADE_OPTIONS = ("-o", "Dpkg::Options::=--force-confdef",
                   "-o", "Dpkg::Options::=--force-confold",
                   "--no-install-recommends")


@dataclass(frozen=True)
class PackageChange:
    """One package whose version the refresh changed ('' : not installed)."""

    name: str
    old: str
    new: str


@dataclass(frozen=True)
class RefreshReport:
    """What a refresh did to one entry."""

    entry: str  # the archive's path
    changes: tuple[PackageChange, ...]
    seconds: float
    images: tuple[str, ...] = ()  # images remade

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (``json.dumps`` takes it as it is)."""
        return {"entry": self.entry, "changed": self.changed,
                "seconds": round(self.seconds, 1),
                "upgraded": [{"package": c.name, "old": c.old, "new": c.new}
                             for c in self.changes],
                "images": list(self.images)}

    def summary(self) -> str:
        """One line for the administrator."""
        name = os.path.basename(self.entry)
        if not self.changed:
            return f"{name}: up to date ({self.seconds:.0f} s)"
        return (f"{name}: {len(self.changes)} package(s) upgraded in "
                f"{self.seconds:.0f} s: " + ", ".join(
                    f"{c.name} {c.old or '(new)'} -> {c.new or '(removed)'}"
                    for c in self.changes))


def parse_installed(text: str) -> dict[str, str]:
    """Installed packages and versions from dpkg-query output in QUERY_FORMAT.

    Only packages whose status is installed ("ii", possibly with an error
    flag) count; removed ones with configuration left ("rc") do not.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or not fields[2].startswith("ii"):
            continue
        out[fields[0]] = fields[1]
    return out


def version_changes(before: dict[str, str], after: dict[str, str]) -> tuple[PackageChange, ...]:
    """Packages upgraded (or installed, removed) between two listings, by name."""
    return tuple(PackageChange(name, before.get(name, ""), after.get(name, ""))
                 for name in sorted(before.keys() | after.keys())
                 if before.get(name) != after.get(name))


def installed(root: str) -> dict[str, str]:
    """The packages installed in the tree ``root`` and their versions."""
    return parse_installed(runner.output(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "--show",
         f"--showformat={QUERY_FORMAT}"]))


def instance_sources(t: Target, key: CacheKey) -> tuple[str, str]:
    """The APT sources instances of this entry get: (file name, text).

    As apt_sources.configure writes them (deb822 where the release's own
    installer uses it), from the key's MIRROR or the bootstrap's mirror.
    """
    release = resolve_release(key.suite, read_os_release(t))
    if release is None:
        raise CacheError(f"The cache for {key.describe()} holds neither Debian nor "
                         f"Ubuntu: refresh knows no APT sources for it.")
    mirror = tree_mirror(t, key.mirror, release)
    if not mirror:
        raise CacheError(f"No mirror is known for the cache of {key.describe()} "
                         f"(MIRROR is empty and the bootstrap left none).")
    if release.uses_deb822:
        entries = release_sources(release, mirror, key.components,
                                  keyring(t, release))
        return "refresh.sources", deb822_text(entries)
    return "refresh.list", one_line_text(release_sources(
        release, mirror, key.components))


def apt_options() -> list[str]:
    """Options pointing apt at the refresh's sources instead of the tree's."""
    return ["-o", f"Dir::Etc::SourceList={EMPTY_LIST}",
            "-o", f"Dir::Etc::SourceParts={PARTS_DIR}"]


@contextlib.contextmanager
def refresh_sources(t: Target, name: str, text: str) -> Iterator[None]:
    """The refresh's sources (and the node's resolver) in the tree while apt runs."""
    wrote_resolv = False
    try:
        t.write_text(EMPTY_LIST, "")
        t.write_text(f"{PARTS_DIR}/{name}", text)
        if not os.path.lexists(t.path_nofollow(RESOLV_CONF)) \
                and os.path.isfile("/etc/resolv.conf"):
            # clean_tree removed the node's copy; apt needs it to reach
            # the mirror by name. Removed again by clean_tree.
            with open("/etc/resolv.conf", encoding="utf-8") as f:
                t.write_text(RESOLV_CONF, f.read())
            wrote_resolv = True
        yield
    finally:
        _remove_tree_in(t, SOURCES_DIR)
        if wrote_resolv:
            t.remove(RESOLV_CONF)


def _remove_tree_in(t: Target, inner: str) -> None:
    top = t.path_nofollow(inner)
    if not os.path.isdir(top) or os.path.islink(top):
        return
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(top)


def upgrade(root: str, conf: Settings) -> None:
    """apt-get update and dist-upgrade in the tree ``root`` (sources in place)."""
    env = {**APT_ENVIRONMENT, **bootstrap.proxy_environment(conf)}
    chroot_apt = ["chroot", root, "apt-get", *apt_options()]
    via = f" through the proxy {conf.proxy}" if conf.proxy else ""
    with log.phase("refresh: apt-get update"):
        runner.run([*chroot_apt, "--error-on=any", "update"], env=env,
                   hint=f"Updating the package lists failed: check that this "
                        f"node reaches the mirror{via} (MIRROR, PROXY).")
    with log.phase("refresh: apt-get dist-upgrade"):
        runner.run([*chroot_apt, "-y", *UPGRADE_OPTIONS, "dist-upgrade"], env=env,
                   hint="Upgrading the cache's packages failed; the cache is "
                        "left as it was.")
    runner.run(["chroot", root, "apt-get", "clean"], env=env)


def check_tree(root: str) -> None:
    """Refuse a tree dpkg reports problems in (half-configured packages...)."""
    audit = runner.run(["chroot", root, "dpkg", "--audit"], capture=True, check=False)
    said = audit.stdout.decode("utf-8", "replace").strip()
    if audit.returncode != 0 or said:
        raise CacheError("After the upgrade, dpkg --audit reports problems in the "
                         "refreshed tree; the cache is left as it was: " + said[-500:])


def keep_forever(archive: str) -> None:
    """Remove the owner-write bit again: the administrator kept the old archive.

    An archive without it never expires (cache_store); a refresh keeps it so.
    Its mtime, which the record vouches for, does not change.
    """
    os.chmod(archive, stat.S_IMODE(os.stat(archive).st_mode) & ~0o222)


@contextlib.contextmanager
def scratch_file(directory: str, prefix: str) -> Iterator[str]:
    """A temporary file in ``directory``, removed at the end unless renamed away."""
    with temporary_file(directory, prefix) as path:
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def base_image(entry: CacheEntry, fstypes: list[str]) -> FsImage | None:
    """The entry's image the upgrade starts from: ext4's if current, else
    another ext one (resize2fs grows and shrinks the copy)."""
    for fstype in sorted((f for f in fstypes if f in filesystems.EXT_TYPES),
                         key=lambda f: f != "ext4"):
        image = cache_images.lookup(entry, fstype)
        if image is not None:
            return image
    return None


@dataclass
class Upgraded:
    """What the staging work left for the swap: new files by name, or nothing."""

    changes: tuple[PackageChange, ...] = ()
    archive: str = ""  # the new archive (a temporary of the cache directory)
    images: dict[str, str] = field(default_factory=dict)  # fstype -> new image


def upgrade_copy(store: Cache, entry: CacheEntry, conf: Settings, sources: str | None,
                 fstypes: list[str], scratch: contextlib.ExitStack) -> Upgraded:
    """Upgrade a copy of ``entry``; write its new archive and images if anything changed.

    The copy is the entry's filesystem image when it has a current one
    (copied, grown for apt's downloads and mounted: no archive to
    unpack; shrunk again afterwards and kept as the new image), else the
    archive unpacked into a staging tree. Its mounts are made in a mount
    namespace of this process's own (mounts.own_mount_namespace). Every file made is registered
    on ``scratch`` for removal (the swap renames the ones it keeps).
    """
    key = entry.key
    base = base_image(entry, fstypes)
    mounts.own_mount_namespace()
    root = scratch.enter_context(store.staging_dir(key))
    copy = ""
    result = Upgraded()
    with contextlib.ExitStack() as tree:
        if base is not None:
            copy = scratch.enter_context(scratch_file(
                store.directory, cache_images.tmp_prefix(entry, base.fstype)))
            with log.phase("refresh: copy the image"):
                cache_images.working_copy(base, copy, ROOM)
                device = tree.enter_context(blockdev.loop_device(copy))
                # The inode tables mke2fs left to be zeroed stay so: the
                # kernel's zeroing would make them data create copies.
                tree.enter_context(mounts.mounted(
                    device, root, base.fstype,
                    ("noinit_itable",) if base.fstype == "ext4" else ()))
        else:
            with log.phase("refresh: unpack"):
                store.extract(entry, root)
        t = Target(root)
        name, text = (("refresh.list", sources) if sources is not None
                      else instance_sources(t, key))
        before = installed(root)
        with refresh_sources(t, name, text):
            with mounts.api_filesystems(root), daemons_prevented(t):
                upgrade(root, conf)
                check_tree(root)
        result.changes = version_changes(before, installed(root))
        if not result.changes:
            return result
        bootstrap.clean_tree(root)
        result.archive = scratch.enter_context(scratch_file(
            store.directory, store.archive_tmp_prefix(key)))
        with log.phase("refresh: archive"):
            # A filesystem image's lost+found is no part of the tree.
            store.write_archive(root, result.archive,
                                exclude=(LOST_FOUND,) if base is not None else ())
        for fstype in fstypes:
            if base is not None and fstype == base.fstype:
                continue
            made = scratch.enter_context(scratch_file(
                store.directory, cache_images.tmp_prefix(entry, fstype)))
            with log.phase(f"refresh: {fstype} image"):
                cache_images.make(root, made, fstype, result.archive)
            result.images[fstype] = made
    if base is not None:
        if blockdev.loops_backed_by(copy):
            raise CacheError(f"The copy {copy} of the cache image is still attached to "
                             f"a loop device after it was unmounted (see 'losetup -a'); "
                             f"it is not used. Run the refresh again.")
        with log.phase(f"refresh: {base.fstype} image"):
            # The kernel recorded where it was mounted (the cache's staging
            # directory): no instance needs to see the node's paths.
            runner.run(["tune2fs", "-M", "", copy])
            cache_images.finish(copy, entry.path)
        result.images[base.fstype] = copy
    return result


def refresh(store: Cache, key: CacheKey, conf: Settings, *,
            sources: str | None = None) -> RefreshReport:
    """Bring ``key``'s cache entry up to date from its mirror; see the module docstring.

    ``sources``: one-line APT sources (sources.list(5)) to upgrade from
    instead of the instance's. Raises CacheError when there is no entry
    for ``key`` or the refreshed tree is not sound, CommandError when apt
    fails; the old entry is intact then.
    """
    start = time.monotonic()
    with store.refreshing(key), store.using(key, lambda: store.peek(key)) as use:
        entry = use.found if use.found is not None else store.lookup(key)
        if entry is None:
            raise CacheError(f"There is no cache for {key.describe()} in "
                             f"{store.directory} to refresh.")
        # Creates read the old entry alongside the refresh.
        use.share()
        old = os.stat(entry.path)
        fstypes = store.image_types(key)
        with contextlib.ExitStack() as scratch:
            done = upgrade_copy(store, entry, conf, sources, fstypes, scratch)
            if not done.changes:
                store.mark_refreshed(key)
                logger.info("The cache %s is up to date", entry.path)
                return RefreshReport(entry.path, (), time.monotonic() - start)
            with log.phase("refresh: swap"):
                # Waits for the creates still copying the old entry; the
                # ones starting now wait for the swap, then copy the new one.
                use.take_exclusive()
                entry = store.replace(key, done.archive, old)
                if _kept(old):
                    keep_forever(entry.path)
                images = tuple(cache_images.install(entry, fstype, path).path
                               for fstype, path in sorted(done.images.items()))
    report = RefreshReport(entry.path, done.changes, time.monotonic() - start, images)
    logger.info("Refreshed %s", report.summary())
    return report


def _kept(st: os.stat_result) -> bool:
    return not st.st_mode & stat.S_IWUSR
