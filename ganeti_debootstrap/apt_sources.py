"""The instance's APT sources: its release, the mirror, -updates and security.

debootstrap leaves a one-line ``sources.list`` naming the bootstrap suite
only (no -updates, no security archive); mmdebstrap adds them only for its
own default mirror. The instance gets the sources its release expects:

* the mirror from MIRROR (empty: debootstrap's default for Debian, or the
  mirror the bootstrap itself wrote into the tree), COMPONENTS (or main);
* ``<codename>-updates`` and the security archive where the release has
  them: Debian's security archive is ``<codename>-security`` from bullseye
  on, ``<codename>/updates`` before; sid has neither; Ubuntu keeps both on
  the same mirror;
* deb822 (``sources.list.d/debian.sources``) for releases whose own
  installer writes it (Debian bookworm and later, Ubuntu noble and later),
  the one-line ``sources.list`` otherwise.

A suite given as an alias (``stable``) is written as the codename the tree's
/etc/os-release names, as Debian's installer does: an instance must not
jump to the next release when the alias moves.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .names import line_break_problem
from .settings import DEFAULT_SUITE, Settings
from .target import Target, UnsafeFileError

log = logging.getLogger(__name__)

APT_SOURCES_MODES = ("auto", "deb822", "one-line", "keep")

# What debootstrap writes itself when MIRROR is empty (its built-in default).
DEBIAN_DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://security.debian.org/debian-security"

# Oldest first: the order decides which release has what.
DEBIAN_RELEASES = ("hamm", "slink", "potato", "woody", "sarge", "etch", "lenny",
                   "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye",
                   "bookworm", "trixie", "forky", "duke")
UBUNTU_RELEASES = ("trusty", "xenial", "bionic", "focal", "jammy", "kinetic",
                   "lunar", "mantic", "noble", "oracular", "plucky", "questing")
DEBIAN_ROLLING = ("sid", "unstable")

SOURCES_LIST = "/etc/apt/sources.list"
SOURCES_DIR = "/etc/apt/sources.list.d"
APT_CONF = "/etc/apt/apt.conf"
APT_CONF_DIR = "/etc/apt/apt.conf.d"
OS_RELEASE = "/etc/os-release"
KEYRINGS = {"debian": ("/usr/share/keyrings/debian-archive-keyring.gpg",
                       "/usr/share/keyrings/debian-archive-keyring.pgp"),
            "ubuntu": ("/usr/share/keyrings/ubuntu-archive-keyring.gpg",)}
HEADER = "# Written by ganeti-instance-debootstrap when the instance was made.\n"


@dataclass(frozen=True)
class Release:
    """A release as its APT sources need it: distribution and codename."""

    distribution: str  # "debian" or "ubuntu"
    codename: str  # "trixie", "sid", "noble", ...

    def _rank(self, releases: tuple[str, ...], since: str) -> bool:
        # An unknown codename is taken as newer than every known one.
        if self.codename not in releases:
            return True
        return releases.index(self.codename) >= releases.index(since)

    @property
    def uses_deb822(self) -> bool:
        if self.distribution == "ubuntu":
            return self._rank(UBUNTU_RELEASES, "noble")
        return self.codename == "sid" or self._rank(DEBIAN_RELEASES, "bookworm")

    @property
    def updates_suite(self) -> str | None:
        if self.codename == "sid":
            return None
        if self.distribution == "debian" and not self._rank(DEBIAN_RELEASES, "squeeze"):
            return None
        return f"{self.codename}-updates"

    @property
    def security_suite(self) -> str | None:
        if self.codename == "sid":
            return None
        if self.distribution == "debian" and not self._rank(DEBIAN_RELEASES, "bullseye"):
            return f"{self.codename}/updates"
        return f"{self.codename}-security"


@dataclass(frozen=True)
class SourcesPlan:
    """What the sources are made from: settings and the apt_sources parameter."""

    mode: str = "auto"
    suite: str = DEFAULT_SUITE
    mirror: str = ""
    components: tuple[str, ...] = ()
    proxy: str = ""

    def __post_init__(self) -> None:
        if self.mode not in APT_SOURCES_MODES:
            raise ValueError(f"bad apt_sources mode {self.mode!r}")

    @classmethod
    def from_settings(cls, conf: Settings, mode: str = "auto") -> SourcesPlan:
        return cls(mode=mode, suite=conf.suite, mirror=conf.mirror,
                   components=conf.components, proxy=conf.proxy)


@dataclass(frozen=True)
class Source:
    """One group of suites from one archive (a deb822 stanza)."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""

    def __post_init__(self) -> None:
        # Each field is one word of a line of the sources: a space would add
        # a field, a line break a source. The settings are checked when read
        # (settings.validate); this keeps the writer safe whatever it is given.
        for value in (self.uri, *self.suites, *self.components, self.signed_by):
            if re.search(r"\s", value) or line_break_problem(value) is not None:
                raise ValueError(f"APT source field {value!r} is not one word")


# --- what the tree says -------------------------------------------------------------

def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5) assignments, shell-unquoted."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        out[key] = " ".join(words)
    return out


def read_os_release(t: Target) -> dict[str, str]:
    for inner in (OS_RELEASE, "/usr/lib/os-release"):
        try:
            return parse_os_release(t.read_text(inner))
        except (FileNotFoundError, UnsafeFileError):
            continue
    return {}


def resolve_release(suite: str, os_release: Mapping[str, str]) -> Release | None:
    """The release the tree holds, or None if it is neither Debian nor Ubuntu.

    A codename is taken as given; an alias (stable, testing) is resolved
    through the tree's VERSION_CODENAME. sid's os-release names the next
    release, so unstable and sid are recognised by name.
    """
    distro = os_release.get("ID", "")
    if suite in DEBIAN_ROLLING:
        return Release("debian", "sid")
    if suite in DEBIAN_RELEASES:
        return Release("debian", suite)
    if suite in UBUNTU_RELEASES:
        return Release("ubuntu", suite)
    if distro not in ("debian", "ubuntu"):
        return None
    codename = os_release.get("VERSION_CODENAME", "")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", codename):
        codename = ""
    return Release(distro, codename or suite)


def bootstrap_mirror(sources_list: str) -> str:
    """The archive URI of the first one-line ``deb`` entry, or ""."""
    for line in sources_list.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields[:1] != ["deb"]:
            continue
        fields = fields[1:]
        if fields and fields[0].startswith("["):
            while fields and not fields[0].endswith("]"):
                fields.pop(0)
            fields = fields[1:]
        if fields:
            return fields[0]
    return ""


def keyring(t: Target, release: Release) -> str:
    """The archive keyring in the tree for Signed-By, or "" if none is there."""
    for path in KEYRINGS.get(release.distribution, ()):
        if os.path.isfile(t.path(path)):
            return path
    return ""


# --- the sources ----------------------------------------------------------------------

def sources(release: Release, mirror: str, components: Sequence[str],
            signed_by: str = "") -> tuple[Source, ...]:
    """The archives and suites ``release`` gets from ``mirror``."""
    comps = tuple(components) or ("main",)
    main = [release.codename]
    if release.updates_suite:
        main.append(release.updates_suite)
    security = release.security_suite
    if release.distribution == "ubuntu":
        if security:
            main.append(security)
        return (Source(mirror, tuple(main), comps, signed_by),)
    out = [Source(mirror, tuple(main), comps, signed_by)]
    if security:
        out.append(Source(DEBIAN_SECURITY_MIRROR, (security,), comps, signed_by))
    return tuple(out)


def deb822_text(entries: Sequence[Source]) -> str:
    """The entries as a deb822 .sources file (sources.list(5))."""
    # Imported here, not at the top: python3-debian takes about 60 ms to
    # import, and verify (which imports this module through osparams) must
    # answer Ganeti quickly.
    from debian.deb822 import Deb822

    stanzas = []
    for e in entries:
        fields = {"Types": "deb", "URIs": e.uri, "Suites": " ".join(e.suites),
                  "Components": " ".join(e.components)}
        if e.signed_by:
            fields["Signed-By"] = e.signed_by
        stanzas.append(Deb822(fields).dump())
    return HEADER + "\n" + "\n".join(stanzas)


def one_line_text(entries: Sequence[Source]) -> str:
    """The entries as one-line ``deb`` entries for /etc/apt/sources.list."""
    lines = [f"deb {e.uri} {suite} {' '.join(e.components)}"
             for e in entries for suite in e.suites]
    return HEADER + "\n".join(lines) + "\n"


def deb822_name(release: Release) -> str:
    return f"{SOURCES_DIR}/{release.distribution}.sources"


def pointer_text(path: str) -> str:
    """The one-line sources.list left where the sources are in deb822 form."""
    return (f"# The APT sources of this system are in {path}\n"
            "# (deb822 format, see sources.list(5)).\n")


# --- the node's proxy -------------------------------------------------------------------

_PROXY_LINE = re.compile(r'^\s*Acquire::(https?|ftp)::Proxy\s+"([^"]*)"\s*;\s*$', re.I)


def remove_proxy(t: Target, proxy: str) -> list[str]:
    """Drop settings that point APT in the tree at the node's ``proxy``; return files.

    The bootstrap passes PROXY through the environment, so none should be
    there; a tree bootstrapped by other means (or an older edition) may
    have kept one in apt.conf.d, where it would stall every apt run in an
    instance that cannot reach the node's proxy.
    """
    if not proxy:
        return []
    candidates = [APT_CONF]
    directory = t.path(APT_CONF_DIR)
    if os.path.isdir(directory):
        candidates += [f"{APT_CONF_DIR}/{n}" for n in sorted(os.listdir(directory))]
    changed = []
    for inner in candidates:
        path = t.path_nofollow(inner)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        try:
            text = t.read_text(inner)
        except UnsafeFileError:
            continue
        kept = [ln for ln in text.splitlines(keepends=True)
                if not ((m := _PROXY_LINE.match(ln)) and m.group(2).rstrip("/")
                        == proxy.rstrip("/"))]
        if len(kept) == len(text.splitlines()):
            continue
        if all(not ln.strip() or ln.lstrip().startswith(("//", "#")) for ln in kept):
            t.remove(inner)
        else:
            t.write_text(inner, "".join(kept))
        changed.append(inner)
    return changed


# --- putting it together --------------------------------------------------------------


def tree_mirror(t: Target, mirror: str, release: Release) -> str:
    """The mirror a tree's APT sources name: MIRROR, else the one the bootstrap
    wrote into its sources.list, else Debian's default; "" when none is known."""
    try:
        existing = t.read_text(SOURCES_LIST)
    except (FileNotFoundError, UnsafeFileError):
        existing = ""
    found = mirror or bootstrap_mirror(existing)
    if not found and release.distribution == "debian":
        found = DEBIAN_DEFAULT_MIRROR
    return found

def configure(t: Target, plan: SourcesPlan) -> list[str]:
    """Write the instance's APT sources as ``plan`` asks; return the files touched."""
    changed = remove_proxy(t, plan.proxy)
    if plan.mode == "keep":
        return changed
    os_release = read_os_release(t)
    release = resolve_release(plan.suite, os_release)
    if release is None:
        log.warning("The instance's release (SUITE %s, os-release ID %r) is "
                    "neither Debian nor Ubuntu; its APT sources are left as the "
                    "bootstrap wrote them.", plan.suite, os_release.get("ID", ""))
        return changed
    mirror = tree_mirror(t, plan.mirror, release)
    if not mirror:
        log.warning("No mirror is known for the instance's APT sources (MIRROR "
                    "is empty and the bootstrap left none); they are left as "
                    "they are.")
        return changed
    if mirror.startswith("file:"):
        log.warning("The instance's APT sources name the mirror %s, a path on "
                    "the node; apt in the instance reaches it only if that "
                    "path exists there too.", mirror)
    deb822 = plan.mode == "deb822" or (plan.mode == "auto" and release.uses_deb822)
    entries = sources(release, mirror, plan.components,
                      keyring(t, release) if deb822 else "")
    path = deb822_name(release)
    if deb822:
        t.write_text(path, deb822_text(entries))
        t.write_text(SOURCES_LIST, pointer_text(path))
    else:
        t.write_text(SOURCES_LIST, one_line_text(entries))
        # A deb822 file of the same archives would list every entry twice.
        if t.remove(path):
            changed.append(path)
    log.debug("APT sources for %s %s from %s", release.distribution,
              release.codename, mirror)
    written = [path, SOURCES_LIST] if deb822 else [SOURCES_LIST]
    return changed + written
