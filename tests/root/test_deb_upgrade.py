"""The .deb upgrades Debian's shell edition in place, as a site would do it.

One scenario in a throwaway Debian 12 root made for this module with
mmdebstrap (nothing is installed on the test machine itself): Debian's own
ganeti-instance-debootstrap 0.16-8 is installed from the archive and
configured as a site would (settings file edited, a variant added), then
upgraded to the package built from this tree with apt non-interactively.
The installed ``create`` then runs from that root, chrooted, with Ganeti's
environment, on a sparse file, and must honour the site's settings. Last
the package is removed, then purged, and what it leaves is compared with
what Debian policy allows.

A step that needs an earlier one fails at once, naming it. The root needs
the network to Debian's archive (mmdebstrap, apt-get, and the cold
bootstrap of create's mmdebstrap inside it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.debpackage import PACKAGE, BuiltPackage
from tests.root.scripts import mounted_root

SHELL_EDITION = "0.16-8"
DEBIAN_SUITE = "bookworm"
CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
OS_DIR = "/usr/share/ganeti/os/debootstrap"
DEFAULTS = "/etc/default/ganeti-instance-debootstrap"
CONF_DIR = "/etc/ganeti/instance-debootstrap"
CACHE_DIR = "/var/cache/ganeti-instance-debootstrap"
DSH_STATE = "/var/lib/systemd/deb-systemd-helper-enabled"
# What the site adds to the settings file and the variant it publishes:
# each extra package shows in the instance that the setting was honoured.
SITE_SETTINGS = '\n# site settings\nSUITE="bookworm"\nEXTRA_PKGS="less"\n'
SITE_VARIANT = "site"
SITE_VARIANT_CONF = 'EXTRA_PKGS="$EXTRA_PKGS,psmisc"\n'
INSTANCE = "site1.example.org"
DISK_MIB = 1024
APT_OPTIONS = ("-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
               "-o", "Dpkg::Options::=--force-confold")


class Scenario:
    """Which steps passed."""

    def __init__(self) -> None:
        self.passed: set[str] = set()
        self.timings: list[tuple[str, float]] = []

    def require(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.passed]
        if missing:
            pytest.fail(f"needs the earlier step(s) {', '.join(missing)}, which "
                        f"did not pass (see above)", pytrace=False)


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.join(os.fspath(root), "")
    with open("/proc/mounts") as f:
        return [fields[1] for fields in (line.split() for line in f)
                if fields[1] == os.fspath(root) or fields[1].startswith(prefix)]


class DebianRoot:
    """A Debian root directory; commands run in it with chroot and a clean environment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, inner: str) -> Path:
        return self.path / inner.lstrip("/")

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None,
            cwd: str = "/", check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """argv inside the root (cwd there), stdin from /dev/null: a prompt cannot wait."""
        variables = env if env is not None else {
            "PATH": CHROOT_PATH, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
        inner = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *argv]
        proc = subprocess.run(["chroot", str(self.path), "env", "-i",
                               *(f"{k}={v}" for k, v in variables.items()), *inner],
                              env={"PATH": CHROOT_PATH}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {self.path} exited "
                                 f"{proc.returncode}:\n{proc.stdout[-3000:]}"
                                 f"\n{proc.stderr[-3000:]}")
        return proc

    def installed_version(self) -> str:
        proc = self.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}",
                         PACKAGE], check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    @contextlib.contextmanager
    def kernel_filesystems(self) -> Iterator[None]:
        """/proc, /sys and the node's /dev inside the root while the block ends."""
        with contextlib.ExitStack() as stack:
            for argv, target in ((["mount", "-t", "proc", "proc"], "proc"),
                                 (["mount", "-t", "sysfs", "sysfs"], "sys"),
                                 (["mount", "--bind", "/dev"], "dev")):
                point = str(self.path / target)
                subprocess.run([*argv, point], check=True)
                stack.callback(functools.partial(subprocess.run, ["umount", point], check=True))
            yield

    def ours(self) -> set[str]:
        """Every path in the root that belongs to this OS definition or its configuration.

        The shell edition's .deb in apt's archive cache and ours copied to
        /tmp for the installation are not counted.
        """
        found = set()
        for dirpath, dirnames, filenames in os.walk(self.path):
            rel = os.path.relpath(dirpath, self.path)
            rel_dir = "/" if rel == "." else "/" + rel
            if rel_dir in ("/proc", "/sys", "/dev", "/tmp", "/var/cache/apt"):
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                path = os.path.join(rel_dir, name)
                if "ganeti" in path:
                    found.add(path)
        return found


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebianRoot]:
    """A minimal Debian 12 with apt (and its package lists), deleted afterwards."""
    path = tmp_path_factory.mktemp("debian-root") / "root"
    start = time.monotonic()
    proc = subprocess.run(["mmdebstrap", "--quiet", "--variant=apt",
                           "--skip=cleanup/apt/lists", DEBIAN_SUITE, str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"mmdebstrap failed:\n{proc.stderr[-3000:]}"
    print(f"\nmmdebstrap --variant=apt {DEBIAN_SUITE}: {time.monotonic() - start:.1f} s")
    yield DebianRoot(path)
    # Never delete through a mount: /dev is bound in while create runs.
    left = mounts_under(path)
    assert not left, f"{path} still has mounts {left}: not deleted"
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    steps = Scenario()
    yield steps
    print("\nupgrade scenario timings:\n" + "\n".join(
        f"{seconds:8.1f} s  {what}" for what, seconds in steps.timings))


@contextlib.contextmanager
def timed(scenario: Scenario, what: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        scenario.timings.append((what, time.monotonic() - start))


def test_site_installs_and_configures_debians_shell_edition(
        debian_root: DebianRoot, scenario: Scenario) -> None:
    with timed(scenario, f"apt-get install {PACKAGE}={SHELL_EDITION}"):
        debian_root.run(["apt-get", "install", "-y", "-q",
                         f"{PACKAGE}={SHELL_EDITION}"])
    assert debian_root.installed_version() == f"installed {SHELL_EDITION}"
    assert debian_root.file(f"{OS_DIR}/common.sh").is_file()
    # The site's changes, as an administrator makes them.
    defaults = debian_root.file(DEFAULTS)
    defaults.write_text(defaults.read_text() + SITE_SETTINGS)
    with debian_root.file(f"{CONF_DIR}/variants.list").open("a") as f:
        f.write(f"{SITE_VARIANT}\n")
    debian_root.file(f"{CONF_DIR}/variants/{SITE_VARIANT}.conf").write_text(
        SITE_VARIANT_CONF)
    scenario.passed.add("shell edition")


def test_upgrade_keeps_the_sites_conffiles_without_asking(
        debian_root: DebianRoot, scenario: Scenario,
        built_package: BuiltPackage) -> None:
    scenario.require("shell edition")
    site_defaults = debian_root.file(DEFAULTS).read_text()
    shutil.copy2(built_package.deb, debian_root.file("/tmp"))
    deb = f"/tmp/{built_package.deb.name}"
    # stdin is /dev/null (DebianRoot.run): a conffile prompt would fail the
    # upgrade at once instead of hanging; the timeout bounds the rest.
    with timed(scenario, "apt-get install ./ganeti-instance-debootstrap_*.deb"):
        upgrade = debian_root.run(["apt-get", "install", *APT_OPTIONS, deb],
                                  timeout=900)
    version = built_package.deb.name.split("_")[1]
    assert debian_root.installed_version() == f"installed {version}", upgrade.stdout
    # Kept as the site edited them; ours beside the settings file only
    # (variants.list is shipped as the shell edition had it).
    assert debian_root.file(DEFAULTS).read_text() == site_defaults
    ours = debian_root.file(DEFAULTS + ".dpkg-dist").read_text()
    assert "BOOTSTRAP_TOOL" in ours
    assert debian_root.file(f"{CONF_DIR}/variants.list").read_text() == \
        f"default\n{SITE_VARIANT}\n"
    assert not debian_root.file(f"{CONF_DIR}/variants.list.dpkg-dist").exists()
    assert debian_root.file(f"{CONF_DIR}/variants/{SITE_VARIANT}.conf").read_text() == \
        SITE_VARIANT_CONF
    # The OS dir holds our scripts; the shell edition's are gone.
    os_dir = debian_root.file(OS_DIR)
    assert (os_dir / "create").read_text().startswith("#!/usr/bin/python3 -I\n")
    assert not (os_dir / "common.sh").exists()
    assert (os_dir / "ganeti_debootstrap" / "create.py").is_file()
    assert os.readlink(os_dir / "variants.list") == f"{CONF_DIR}/variants.list"
    # Documentation: ours replaced the shell edition's.
    doc = debian_root.file(f"/usr/share/doc/{PACKAGE}")
    assert (doc / "README.md.gz").is_file()
    assert (doc / "examples" / "hooks" / "ssh-authorized-keys").is_file()
    assert not (doc / "examples" / "grub").exists()
    assert debian_root.file("/usr/share/man/man7/ganeti-os-debootstrap.7.gz").is_file()
    # The administrator's cache command and its page.
    assert debian_root.file("/usr/sbin/ganeti-debootstrap-cache").is_file()
    assert debian_root.file("/usr/share/man/man8/ganeti-debootstrap-cache.8.gz").is_file()
    # dh_python3's postinst byte-compiled the package.
    assert list((os_dir / "ganeti_debootstrap" / "__pycache__").glob("create.*.pyc"))
    verify = debian_root.run(["./verify", "parameters"], cwd=OS_DIR, env={
        "PATH": GANETI_PATH, "OS_API_VERSION": "20", "OS_NAME": "debootstrap",
        "OS_VARIANT": SITE_VARIANT, "OSP_FILESYSTEM": "ext4"}, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    scenario.passed.add("upgrade")


def test_installed_create_honours_the_sites_settings_and_variant(
        debian_root: DebianRoot, scenario: Scenario) -> None:
    scenario.require("upgrade")
    disk = debian_root.file("/var/tmp/disk0.img")
    with disk.open("wb") as f:
        f.truncate(DISK_MIB * 2**20)
    env = {"PATH": GANETI_PATH, "OS_API_VERSION": "20", "OS_NAME": "debootstrap",
           "OS_VARIANT": SITE_VARIANT, "INSTANCE_NAME": INSTANCE, "HYPERVISOR": "kvm",
           "DEBUG_LEVEL": "0", "DISK_COUNT": "1", "DISK_0_PATH": "/var/tmp/disk0.img",
           "DISK_0_ACCESS": "rw", "NIC_COUNT": "0"}
    with timed(scenario, "create (cold: bootstraps the site's settings)"):
        with debian_root.kernel_filesystems():
            # umask 077 as Ganeti runs OS scripts.
            created = debian_root.run(["sh", "-c", "umask 077 && exec ./create"],
                                      cwd=OS_DIR, env=env, check=False, timeout=1800)
    assert created.returncode == 0, created.stderr[-4000:]
    assert f"Instance {INSTANCE} created" in created.stderr
    with mounted_root(str(disk)) as root:
        fs = Path(root)
        assert (fs / "etc/hostname").read_text().strip() == INSTANCE
        # SUITE="bookworm" from the settings file.
        assert (fs / "etc/debian_version").read_text().startswith("12.")
        # EXTRA_PKGS from the settings file, extended by the variant.
        assert (fs / "usr/bin/less").is_file()
        assert (fs / "usr/bin/killall").is_file()
    cached = sorted(p.name for p in debian_root.file(CACHE_DIR).iterdir())
    assert any(n.startswith(f"cache-{DEBIAN_SUITE}-") and n.endswith(".tar")
               for n in cached), cached
    disk.unlink()
    # The installed cache command finds the settings, the variants and the
    # entry create made: the site variant's (EXTRA_PKGS less and psmisc).
    listed = debian_root.run(["ganeti-debootstrap-cache", "list", "--json"],
                             env={"PATH": GANETI_PATH})
    entries = json.loads(listed.stdout)
    [site] = [e for e in entries if e["variants"] == [SITE_VARIANT]]
    assert (site["inputs"]["suite"], site["inputs"]["extra_pkgs"]) == \
        (DEBIAN_SUITE, ["less", "psmisc"])
    scenario.passed.add("create")


def test_remove_keeps_only_the_conffiles_the_sites_files_and_the_cache(
        debian_root: DebianRoot, scenario: Scenario) -> None:
    scenario.require("upgrade")
    debian_root.run(["dpkg", "--remove", PACKAGE])
    assert debian_root.installed_version().startswith("config-files ")
    cache = {f"{CACHE_DIR}/{p.name}" for p in debian_root.file(CACHE_DIR).iterdir()}
    expected = {
        "/etc/ganeti", CONF_DIR, f"{CONF_DIR}/variants",
        DEFAULTS, DEFAULTS + ".dpkg-dist",
        f"{CONF_DIR}/variants.list", f"{CONF_DIR}/variants/default.conf",
        f"{CONF_DIR}/variants/{SITE_VARIANT}.conf",
        CACHE_DIR, *cache,
        # dpkg keeps the postrm of a package in state config-files.
        f"/var/lib/dpkg/info/{PACKAGE}.list", f"/var/lib/dpkg/info/{PACKAGE}.postrm",
        # deb-systemd-helper's record of the (not enabled) refresh timer,
        # removed on purge.
        f"{DSH_STATE}/ganeti-debootstrap-cache-refresh.timer.dsh-also",
    }
    assert sorted(debian_root.ours() ^ expected) == []
    if "create" in scenario.passed:
        assert cache, "the cache create made is gone after remove"
    scenario.passed.add("remove")


def test_purge_leaves_only_the_files_the_site_added(
        debian_root: DebianRoot, scenario: Scenario) -> None:
    scenario.require("remove")
    debian_root.run(["dpkg", "--purge", PACKAGE])
    assert debian_root.installed_version().split(" ")[0] in ("", "not-installed")
    # The site's own variant file stays (and the directories holding it):
    # Debian policy leaves files the administrator created.
    assert sorted(debian_root.ours()) == sorted({
        "/etc/ganeti", CONF_DIR, f"{CONF_DIR}/variants",
        f"{CONF_DIR}/variants/{SITE_VARIANT}.conf"})
