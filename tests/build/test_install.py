"""What ``make install`` lays out; the installed scripts work as Ganeti runs them."""

from __future__ import annotations

import os
import stat
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (GANETI_PATH, OS_DIR, ROOT, Build, build_env, run)

pytestmark = pytest.mark.autotools

SCRIPTS = ("create", "import", "export", "rename", "verify")
CONF_DIR = "etc/ganeti/instance-debootstrap"
DOC_HOOKS = "usr/share/doc/ganeti-instance-debootstrap/examples/hooks"
MAN_PAGES = {"usr/share/man/man7/ganeti-os-debootstrap.7":
             "ganeti-os-debootstrap - Ganeti OS definition",
             "usr/share/man/man5/ganeti-instance-debootstrap.5":
             "ganeti-instance-debootstrap - settings and variants",
             "usr/share/man/man8/ganeti-debootstrap-cache.8":
             "ganeti-debootstrap-cache - list, build, refresh, prune and push the bootstrap cache"}
# The administrator's command, in sbindir.
CACHE_COMMAND = "usr/sbin/ganeti-debootstrap-cache"


UNITS = ("ganeti-debootstrap-cache-refresh.service", "ganeti-debootstrap-cache-refresh.timer")


def unit_dir(build: Build) -> str:
    """The systemd unit directory configure chose (its summary), without the leading /."""
    for line in build.configure_output.splitlines():
        if line.strip().startswith("systemd units:"):
            return line.split(":", 1)[1].strip().lstrip("/")
    raise AssertionError("configure's summary names no systemd unit directory")


def tree(destdir: Path) -> dict[str, tuple[str, object]]:
    """Every path under ``destdir``: ("dir"|"file", mode) or ("symlink", target)."""
    found: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(destdir):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, destdir)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                found[rel] = ("file", stat.S_IMODE(st.st_mode))
    return found


def source_modules() -> list[str]:
    """The package's modules in the real source tree (not the test's copy)."""
    return sorted(p.name for p in (ROOT / "ganeti_debootstrap").glob("*.py"))


def example_hooks() -> list[str]:
    return sorted(p.name for p in (ROOT / "examples" / "hooks").iterdir()
                  if p.is_file())


def shebang_python(build: Build) -> str:
    first = (build.os_dir / "verify").read_text().splitlines()[0]
    return first[2:].split()[0]


def python_says(python: str, expression: str) -> str:
    """The value of ``expression`` (with sys imported) in ``python``."""
    return subprocess.run([python, "-c", f"import sys; print({expression})"],
                          capture_output=True, text=True, check=True).stdout.strip()


def cache_tag(python: str) -> str:
    return python_says(python, "sys.implementation.cache_tag")


def expected_tree(build: Build) -> dict[str, tuple[str, object]]:
    """The documented installation: files with modes, the symlink, directories."""
    tag = cache_tag(shebang_python(build))
    files: dict[str, tuple[str, object]] = {}
    for script in SCRIPTS:
        files[f"{OS_DIR}/{script}"] = ("file", 0o755)
    for name in ("common.py", "ganeti_api_version", "parameters.list",
                 f"__pycache__/common.{tag}.pyc"):
        files[f"{OS_DIR}/{name}"] = ("file", 0o644)
    files[f"{OS_DIR}/variants.list"] = (
        "symlink", "/etc/ganeti/instance-debootstrap/variants.list")
    for module in source_modules():
        files[f"{OS_DIR}/ganeti_debootstrap/{module}"] = ("file", 0o644)
        files[f"{OS_DIR}/ganeti_debootstrap/__pycache__/{module[:-3]}.{tag}.pyc"] = \
            ("file", 0o644)
    files["etc/default/ganeti-instance-debootstrap"] = ("file", 0o644)
    files[f"{CONF_DIR}/variants.list"] = ("file", 0o644)
    files[f"{CONF_DIR}/variants/default.conf"] = ("file", 0o644)
    for hook in example_hooks():
        files[f"{DOC_HOOKS}/{hook}"] = ("file", 0o755)
    files.update({page: ("file", 0o644) for page in MAN_PAGES})
    files[CACHE_COMMAND] = ("file", 0o755)
    files.update({f"{unit_dir(build)}/{unit}": ("file", 0o644) for unit in UNITS})
    dirs = {f"{CONF_DIR}/hooks"}
    for path in list(files) + list(dirs):
        parent = os.path.dirname(path)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    files.update({d: ("dir", 0o755) for d in dirs})
    return files


def ganeti_run(os_dir: Path, argv: list[str],
               env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run an installed script as Ganeti does: clean environment, cwd = OS dir."""
    return subprocess.run(
        ["env", "-i", f"PATH={GANETI_PATH}", *(f"{k}={v}" for k, v in env.items()),
         *argv], cwd=os_dir, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, umask=0o077)


def test_install_lays_out_exactly_the_documented_files(build: Build) -> None:
    actual = tree(build.destdir)
    expected = expected_tree(build)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(f"{p}: {actual[p]} instead of {expected[p]}"
                   for p in set(actual) & set(expected) if actual[p] != expected[p])
    assert (missing, extra, wrong) == ([], [], [])


def test_every_module_of_the_source_package_is_installed(build: Build) -> None:
    package = build.os_dir / "ganeti_debootstrap"
    installed = sorted(p.name for p in package.glob("*.py"))
    assert installed == source_modules()


def test_install_under_umask_077_gives_world_readable_modes(build: Build) -> None:
    # The session build installed with umask 077; nothing may be 0700/0600.
    private = sorted(path for path, (kind, mode) in tree(build.destdir).items()
                     if kind != "symlink" and isinstance(mode, int)
                     and not mode & 0o004)
    assert private == []


def test_ganeti_api_version_lists_20_15_10_5(build: Build) -> None:
    assert (build.os_dir / "ganeti_api_version").read_text() == "20\n15\n10\n5\n"


def test_os_dir_variants_list_links_to_the_copy_administrators_edit(
        build: Build) -> None:
    link = build.os_dir / "variants.list"
    assert os.readlink(link) == "/etc/ganeti/instance-debootstrap/variants.list"
    edited = build.destdir / CONF_DIR / "variants.list"
    assert edited.read_text() == (ROOT / "variants.list").read_text()


def test_common_py_holds_only_the_configured_paths_and_version(build: Build) -> None:
    namespace: dict[str, object] = {}
    exec((build.os_dir / "common.py").read_text(), namespace)
    values = {k: v for k, v in namespace.items() if not k.startswith("__")}
    version = run(["./configure", "--version"], cwd=build.srcdir).stdout.split()[2]
    assert values == {"SYSCONFDIR": "/etc", "LOCALSTATEDIR": "/var",
                      "OS_DIR": "/usr/share/ganeti/os/debootstrap",
                      "VERSION": version}


def test_scripts_use_the_python_with_python3_debian_in_isolated_mode(
        build: Build) -> None:
    # A python3 without python3-debian came first in PATH at configure time.
    expected = "/usr/bin/python3"
    for script in SCRIPTS:
        first = (build.os_dir / script).read_text().splitlines()[0]
        assert first == f"#!{expected} -I", script
    check = subprocess.run([expected, "-c", "import debian.deb822"])
    assert check.returncode == 0


def test_installed_verify_accepts_ext4_as_ganeti_runs_it(build: Build) -> None:
    proc = ganeti_run(build.os_dir, ["./verify", "parameters"],
                      {"OS_API_VERSION": "20", "OSP_FILESYSTEM": "ext4"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_verify_rejects_zfs_naming_the_choices_last(build: Build) -> None:
    proc = ganeti_run(build.os_dir, ["./verify", "parameters"],
                      {"OS_API_VERSION": "20", "OSP_FILESYSTEM": "zfs"})
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).rstrip().splitlines()[-1]
    assert "zfs" in last and "ext4" in last and "btrfs" in last, last


def test_installed_cache_command_finds_the_os_dir_configure_recorded(
        build: Build, tmp_path: Path) -> None:
    text = (build.destdir / CACHE_COMMAND).read_text()
    assert text.splitlines()[0] == "#!/usr/bin/python3 -I"
    line = 'sys.path.insert(0, "/usr/share/ganeti/os/debootstrap")'
    assert line in text.splitlines()
    # Run as installed, with that directory being the DESTDIR's copy.
    moved = tmp_path / "ganeti-debootstrap-cache"
    moved.write_text(text.replace(line, f'sys.path.insert(0, "{build.os_dir}")'))
    moved.chmod(0o755)
    for argv in (["--help"], ["list", "--help"], ["build", "--help"], ["prune", "--help"]):
        proc = subprocess.run(["env", "-i", f"PATH={GANETI_PATH}", str(moved), *argv],
                              cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(
            "usage: ganeti-debootstrap-cache" + (f" {argv[0]}" if len(argv) > 1 else "")), \
            proc.stdout
        assert "--json" in proc.stdout or argv == ["--help"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_installed_script_answers_help_with_its_own_usage(
        build: Build, script: str) -> None:
    proc = ganeti_run(build.os_dir, [f"./{script}", "--help"], {"OS_API_VERSION": "20"})
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"Usage:\n  {script} "), proc.stderr


def test_installed_scripts_ignore_pythonpath_user_site_and_working_directory(
        build: Build, tmp_path: Path) -> None:
    # Decoys of the package and of common.py that break the script if
    # imported: in the working directory, in PYTHONPATH, in the user site.
    python = shebang_python(build)
    version = python_says(python, "'%d.%d' % sys.version_info[:2]")
    home = tmp_path / "home"
    user_site = home / ".local" / "lib" / f"python{version}" / "site-packages"
    for place in (tmp_path / "cwd", tmp_path / "pythonpath", user_site):
        (place / "ganeti_debootstrap").mkdir(parents=True)
        init = place / "ganeti_debootstrap" / "__init__.py"
        init.write_text("raise SystemExit(99)\n")
        (place / "common.py").write_text("raise SystemExit(98)\n")
    proc = subprocess.run(
        [str(build.os_dir / "verify"), "parameters"], cwd=tmp_path / "cwd",
        env={"PATH": GANETI_PATH, "PYTHONPATH": str(tmp_path / "pythonpath"),
             "HOME": str(home), "OS_API_VERSION": "20", "OSP_FILESYSTEM": "ext3"},
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_scripts_work_from_a_symlinked_os_dir(build: Build,
                                                        tmp_path: Path) -> None:
    # Ganeti runs the script from the OS directory as found in its search
    # path, which may be a symlink to the real installation.
    search = tmp_path / "srv-ganeti-os"
    search.mkdir()
    (search / "debootstrap").symlink_to(build.os_dir)
    proc = ganeti_run(search / "debootstrap", ["./verify", "parameters"],
                      {"OS_API_VERSION": "20", "OSP_FILESYSTEM": "ext2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_verify_start_up_time_is_measured(
        build: Build, report: Callable[[str], None]) -> None:
    times = []
    for _ in range(7):
        start = time.monotonic()
        proc = ganeti_run(build.os_dir, ["./verify", "parameters"],
                          {"OS_API_VERSION": "20", "OSP_FILESYSTEM": "ext4"})
        times.append(time.monotonic() - start)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    median_ms = statistics.median(times) * 1000
    report(f"installed verify, exec to result: median {median_ms:.0f} ms, "
           f"min {min(times) * 1000:.0f} ms over {len(times)} runs")
    report(f"make install (DESTDIR): {build.install_seconds:.2f} s")


def test_uninstall_removes_every_installed_file(build: Build, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    build.make("install", f"DESTDIR={dest}")
    # Ganeti running the scripts as root writes byte code next to them.
    ganeti_run(dest / OS_DIR, ["./verify", "parameters"], {"OS_API_VERSION": "20"})
    build.make("uninstall", f"DESTDIR={dest}")
    # Directories may remain (the automake convention); files may not.
    left = sorted(p for p, (kind, _) in tree(dest).items() if kind != "dir")
    assert left == []


def test_uninstall_keeps_an_edited_settings_file(build: Build, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    build.make("install", f"DESTDIR={dest}")
    settings = dest / "etc/default/ganeti-instance-debootstrap"
    settings.write_text(settings.read_text() + 'SUITE="bookworm"\n')
    build.make("uninstall", f"DESTDIR={dest}")
    assert settings.read_text().endswith('SUITE="bookworm"\n')
    assert not (dest / CONF_DIR / "variants/default.conf").exists()


def test_reinstall_keeps_an_edited_variants_list(build: Build, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    build.make("install", f"DESTDIR={dest}")
    variants = dest / CONF_DIR / "variants.list"
    variants.write_text("default\nminimal\n")
    proc = build.make("install", f"DESTDIR={dest}")
    assert variants.read_text() == "default\nminimal\n"
    assert "keeping" in proc.stdout


def test_with_os_dir_installs_into_the_given_search_directory(
        build: Build, tmp_path: Path) -> None:
    builddir = tmp_path / "build"
    builddir.mkdir()
    run([str(build.srcdir / "configure"), "--prefix=/usr/local",
         "--with-os-dir=/srv/ganeti/os"], cwd=builddir, env=build_env())
    run(["make", "install", f"DESTDIR={tmp_path / 'dest'}"], cwd=builddir)
    os_dir = tmp_path / "dest/srv/ganeti/os/debootstrap"
    assert all((os_dir / s).is_file() for s in SCRIPTS)
    namespace: dict[str, object] = {}
    exec((os_dir / "common.py").read_text(), namespace)
    assert namespace["OS_DIR"] == "/srv/ganeti/os/debootstrap"
    assert namespace["SYSCONFDIR"] == "/usr/local/etc"
    assert os.readlink(os_dir / "variants.list") == \
        "/usr/local/etc/ganeti/instance-debootstrap/variants.list"


@pytest.mark.parametrize("page", sorted(MAN_PAGES))
def test_installed_man_page_renders_without_warnings(build: Build, page: str) -> None:
    # What "man ganeti-os-debootstrap" shows; groff's warnings are errors
    # here (lintian reports them for the package too).
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l",
                           str(build.destdir / page)],
                          env={**build_env(), "MANROFFSEQ": "", "MANWIDTH": "80",
                               "MANPAGER": "cat"},
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert MAN_PAGES[page] in " ".join(proc.stdout.split())


def test_refresh_units_run_the_cache_command_daily(build: Build) -> None:
    units = build.destdir / unit_dir(build)
    service = (units / UNITS[0]).read_text()
    assert "\nExecStart=/usr/sbin/ganeti-debootstrap-cache refresh --all\n" in service
    assert "\nType=oneshot\n" in service and "@" not in service.replace("man:", "")
    timer = (units / UNITS[1]).read_text()
    for line in ("OnCalendar=daily", "RandomizedDelaySec=4h", "Persistent=true",
                 "WantedBy=timers.target"):
        assert f"\n{line}\n" in timer
