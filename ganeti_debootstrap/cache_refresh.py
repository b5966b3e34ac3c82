"""Refreshing a cache entry: its packages brought up to date without a bootstrap.

``refresh`` holds the key's lock exclusively, unpacks the entry into a
staging tree, runs ``apt-get update`` and ``apt-get dist-upgrade`` in it
(noninteractive, daemons kept from starting by policy-rc.d, /proc, /sys and
/dev mounted, the node's PROXY in the environment as for a bootstrap),
compares the installed versions before and after (dpkg-query), cleans the
tree as a bootstrap's is cleaned, checks it (``dpkg --audit`` says nothing)
and stores it in place of the old archive (Cache.store: a temporary renamed
over it), then remakes the entry's filesystem images. When nothing was
upgraded the archive is left as it is and only the refresh time is
recorded. A failure anywhere leaves the old entry as it was, and no staging
tree or mount behind.

The sources apt upgrades from are the instance's (apt_sources.py: the
release, its -updates suite and the security archive, from MIRROR or from
the mirror the bootstrap wrote into the tree); they are written into a
directory of their own in the staging tree and handed to apt by option,
so the tree's own sources stay as the bootstrap left them. ``sources``
replaces them with the administrator's (a site's staging mirror; the tests'
local archive).

Creates that start during a refresh wait for it (the key's lock), and then
use the refreshed entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import bootstrap, cache_images, log, mounts, runner
from .apt_sources import (deb822_text, keyring, one_line_text, read_os_release,
                          resolve_release, tree_mirror)
from .apt_sources import sources as release_sources
from .cache_store import Cache, CacheKey, image_name
from .errors import CacheError
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


def refresh(store: Cache, key: CacheKey, conf: Settings, *,
            sources: str | None = None) -> RefreshReport:
    """Bring ``key``'s cache entry up to date from its mirror; see the module docstring.

    ``sources``: one-line APT sources (sources.list(5)) to upgrade from
    instead of the instance's. Raises CacheError when there is no entry
    for ``key`` or the refreshed tree is not sound, CommandError when apt
    fails; the old entry is intact then.
    """
    start = time.monotonic()
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        if entry is None:
            raise CacheError(f"There is no cache for {key.describe()} in "
                             f"{store.directory} to refresh.")
        with store.staging_dir(key) as root:
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
            changes = version_changes(before, installed(root))
            if not changes:
                store.mark_refreshed(key)
                logger.info("The cache %s is up to date", entry.path)
                return RefreshReport(entry.path, (), time.monotonic() - start)
            bootstrap.clean_tree(root)
            fstypes = store.image_types(key)
            kept = not os.stat(entry.path).st_mode & stat.S_IWUSR
            with log.phase("refresh: store"):
                entry = store.store(key, root, refreshed=True)
            if kept:
                keep_forever(entry.path)
            for fstype in fstypes:
                with log.phase(f"refresh: {fstype} image"):
                    cache_images.build(store, entry, fstype, tree=root)
    report = RefreshReport(entry.path, changes, time.monotonic() - start,
                           tuple(os.path.join(store.directory, image_name(key.stem, f))
                                 for f in fstypes))
    logger.info("Refreshed %s", report.summary())
    return report
