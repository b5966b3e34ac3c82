"""The Debian package: builds from a clean tree, lintian-clean, the right contents.

The .deb is built once per session (tests/conftest.py ``built_package``,
the root tests install the same one). Lintian runs with --pedantic and
--display-info; errors and warnings fail, the rest is reported.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.debpackage import (PACKAGE, BuiltPackage, build_environment,
                              copy_clean_tree, deb_field, source_files)

from .conftest import ROOT

pytestmark = pytest.mark.autotools

OS_DIR = "usr/share/ganeti/os/debootstrap"
DOC_DIR = f"usr/share/doc/{PACKAGE}"
REFRESH_UNITS = ("ganeti-debootstrap-cache-refresh.service",
                 "ganeti-debootstrap-cache-refresh.timer")
SHELL_EDITION = "0.16-8"
CONFFILES = ["/etc/default/ganeti-instance-debootstrap",
             "/etc/ganeti/instance-debootstrap/variants.list",
             "/etc/ganeti/instance-debootstrap/variants/default.conf"]


def lintian(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lintian", "--pedantic", "--display-info", "--show-overrides",
                           "--tag-display-limit", "0", *args],
                          capture_output=True, text=True, env=build_environment())


def tags(proc: subprocess.CompletedProcess[str]) -> list[str]:
    # Lintian prints a note on stderr when run as root; tags go to stdout.
    return [line for line in proc.stdout.splitlines() if line.strip()]


def deb_listing(deb: Path) -> dict[str, str]:
    """Path (without ./) -> "d", "f" or "l -> target", as dpkg -c shows it."""
    out = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                         text=True, check=True).stdout
    entries = {}
    for line in out.splitlines():
        fields = line.split(None, 5)
        mode, name = fields[0], fields[5]
        target = ""
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        name = name.removeprefix("./").rstrip("/")
        if name:
            kind = {"d": "d", "-": "f", "l": "l"}[mode[0]]
            entries[name] = f"l -> {target}" if kind == "l" else f"{kind} {mode}"
    return entries


def test_binary_package_is_lintian_clean(built_package: BuiltPackage,
                                         report: Callable[[str], None]) -> None:
    report(f"dpkg-buildpackage -us -uc -b (make check included): "
           f"{built_package.seconds:.1f} s")
    proc = lintian(str(built_package.changes))
    found = tags(proc)
    report(f"lintian --pedantic --display-info on {built_package.changes.name}: "
           f"{len(found)} tag(s)" + "".join(f"\n  {t}" for t in found))
    bad = [t for t in found if t[:2] in ("E:", "W:")]
    assert (proc.returncode, bad) == (0, []), proc.stdout + proc.stderr


def test_source_package_builds_from_a_clean_tree_and_is_lintian_clean(
        tmp_path: Path, report: Callable[[str], None]) -> None:
    src = tmp_path / PACKAGE
    copy_clean_tree(ROOT, src)
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-S", "-d"], cwd=src,
                          env=build_environment(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dsc, = tmp_path.glob(f"{PACKAGE}_*.dsc")
    checked = lintian(str(dsc))
    found = tags(checked)
    report(f"lintian on {dsc.name}: {len(found)} tag(s)" + "".join(f"\n  {t}" for t in found))
    assert [t for t in found if t[:2] in ("E:", "W:")] == []
    # A native source package: the whole tree in one tarball, no .orig.
    assert [p.name for p in tmp_path.glob("*.orig.tar.*")] == []


def test_version_upgrades_debians_shell_edition(built_package: BuiltPackage) -> None:
    version = deb_field(built_package.deb, "Version")
    assert subprocess.run(["dpkg", "--compare-versions", version, "gt",
                           SHELL_EDITION]).returncode == 0, version
    changelog = subprocess.run(["dpkg-parsechangelog", "-l", str(ROOT / "debian/changelog"),
                                "-S", "Version"], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert changelog == version


def test_relationships_are_the_runtime_needs(built_package: BuiltPackage) -> None:
    depends = {d.split()[0] for d in deb_field(built_package.deb, "Depends").split(", ")}
    assert depends == {"python3:any", "python3-debian", "debootstrap", "dump",
                       "e2fsprogs", "fdisk", "mount"}
    assert deb_field(built_package.deb, "Recommends") == (
        "mmdebstrap, kpartx, xfsprogs, btrfs-progs, grub-pc-bin, grub-efi-amd64-bin, "
        "dosfstools, mtools, openssh-client, python3-yaml")
    assert deb_field(built_package.deb, "Enhances") == "ganeti"
    assert deb_field(built_package.deb, "Architecture") == "all"


def test_conffiles_are_the_three_of_the_shell_edition(built_package: BuiltPackage,
                                                      tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "--control", str(built_package.deb), str(tmp_path / "c")],
                   check=True)
    assert (tmp_path / "c" / "conffiles").read_text().split() == CONFFILES


def test_package_holds_the_installed_layout_without_byte_code(
        built_package: BuiltPackage) -> None:
    listing = deb_listing(built_package.deb)
    files = {p for p, kind in listing.items() if not kind.startswith("d")}
    modules = {f"{OS_DIR}/ganeti_debootstrap/{p.name}"
               for p in (ROOT / "ganeti_debootstrap").glob("*.py")}
    hooks = {f"{DOC_DIR}/examples/hooks/{p.name}"
             for p in (ROOT / "examples" / "hooks").iterdir() if p.is_file()}
    expected = {
        *(f"{OS_DIR}/{s}" for s in ("create", "import", "export", "rename", "verify",
                                    "common.py", "ganeti_api_version", "parameters.list",
                                    "variants.list")),
        *modules, *hooks, *(c.lstrip("/") for c in CONFFILES),
        f"{DOC_DIR}/README.md.gz", f"{DOC_DIR}/changelog.gz", f"{DOC_DIR}/copyright",
        "usr/share/man/man7/ganeti-os-debootstrap.7.gz",
        "usr/share/man/man5/ganeti-instance-debootstrap.5.gz",
        "usr/share/man/man8/ganeti-debootstrap-cache.8.gz",
        "usr/sbin/ganeti-debootstrap-cache",
        f"usr/share/python3/runtime.d/{PACKAGE}.rtupdate",
        *(f"lib/systemd/system/{unit}" for unit in REFRESH_UNITS),
    }
    assert sorted(files ^ expected) == []
    assert listing[f"{OS_DIR}/variants.list"] == \
        "l -> /etc/ganeti/instance-debootstrap/variants.list"
    # Owned by the package, empty as shipped.
    assert listing["var/cache/ganeti-instance-debootstrap"].startswith("d")
    assert listing["etc/ganeti/instance-debootstrap/hooks"].startswith("d")
    assert listing[f"{OS_DIR}/create"] == "f -rwxr-xr-x"
    assert listing["usr/sbin/ganeti-debootstrap-cache"] == "f -rwxr-xr-x"


def test_debian_clean_leaves_the_tree_as_it_was(built_package: BuiltPackage) -> None:
    src = built_package.deb.parent / PACKAGE
    proc = subprocess.run(["debian/rules", "clean"], cwd=src, env=build_environment(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    left = sorted(str(p.relative_to(src)) for p in src.rglob("*") if not p.is_dir())
    assert left == source_files(ROOT)


def test_refresh_timer_is_shipped_but_neither_enabled_nor_started(
        built_package: BuiltPackage, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "--control", str(built_package.deb), str(tmp_path / "c")],
                   check=True)
    scripts = "".join(p.read_text() for p in (tmp_path / "c").iterdir()
                      if p.name in ("postinst", "prerm", "postrm"))
    # --no-enable: the timer is enabled again on upgrade only where the
    # administrator had enabled it (was-enabled), never on installation.
    assert scripts.count("deb-systemd-helper enable") == \
        scripts.count("deb-systemd-helper --quiet was-enabled")
    assert "deb-systemd-invoke start" not in scripts
    assert "deb-systemd-invoke restart" not in scripts
