"""ganeti-debootstrap-cache (cacheadmin.py): list, build, prune, arguments, JSON (no root)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from ganeti_debootstrap import cache_refresh, cacheadmin, progress, settings
from ganeti_debootstrap.cache_store import (INPUTS_SUFFIX, REFRESHED_FIELD, Cache, CacheKey,
                                            image_name)
from ganeti_debootstrap.errors import CacheError
from ganeti_debootstrap.paths import Paths
from tests.cacheentries import BIG, DAY, DEFAULT, fake_tar_create, tar_bytes
from tests.cacheentries import stored_archive as stored
from tests.scratch import make_paths

TOOL = "mmdebstrap"
# The keys create computes on this (faked amd64, mmdebstrap) node.
GRUB = CacheKey(suite="trixie", arch="amd64", mirror="", components=(),
                extra_pkgs=("grub-pc", "linux-image-amd64"), tool=TOOL)
ORPHAN = CacheKey(suite="bookworm", arch="amd64", mirror="", components=(),
                  extra_pkgs=(), tool=TOOL)
ESSENTIALS = ("etc/os-release", "etc/debian_version", "usr/bin/dpkg")






# main installs signal handlers and logging (tests/unit/conftest.py puts ours back).
pytestmark = pytest.mark.usefixtures("process_state")


@pytest.fixture
def node(fake_runner, monkeypatch):
    """Settings read by the real shell, dpkg answering amd64, mmdebstrap installed."""
    fake_runner.expect(*settings.SHELL_COMMAND, real=True)
    fake_runner.expect("dpkg", "--print-architecture", stdout="amd64\n")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    return fake_runner


@pytest.fixture
def install(tmp_path: Path) -> Paths:
    """Two published variants: default, and big (EXTRA_PKGS=vim)."""
    paths = make_paths(tmp_path / "install", variants_list="default\nbig\n")
    conf = Path(paths.default_variants_dir, "big.conf")
    conf.write_text("EXTRA_PKGS=vim\n")
    conf.chmod(0o644)
    return paths


@pytest.fixture
def cache(install: Paths) -> Cache:
    return Cache(install.cache_dir, clean_days=14)


def run(paths: Paths, *argv: str, euid: int = 0) -> tuple[int, str]:
    out = io.StringIO()
    status = cacheadmin.main(None, list(argv), paths=paths, euid=euid, out=out)
    return status, out.getvalue()


def run_json(paths: Paths, *argv: str) -> list[dict]:
    status, out = run(paths, *argv, "--json")
    assert status == 0
    return json.loads(out)


# -- list ------------------------------------------------------------------------

def test_list_maps_each_entry_to_the_variants_whose_creates_use_it(node, install, cache):
    stored(cache, DEFAULT, images=("ext4",))
    stored(cache, BIG)
    stored(cache, ORPHAN)
    listed = {e["name"]: e for e in run_json(install, "list")}
    assert [listed[k.stem]["variants"] for k in (DEFAULT, BIG, ORPHAN)] == \
        [["default"], ["big"], []]
    assert [listed[k.stem]["orphan"] for k in (DEFAULT, BIG, ORPHAN)] == \
        [False, False, True]
    assert listed[BIG.stem]["inputs"] == BIG.inputs()


def test_list_json_gives_inputs_age_refresh_size_images_and_kept(node, install, cache):
    path = stored(cache, DEFAULT, images=("ext4", "ext3"), age_days=2, kept=True)
    record = Path(cache.inputs_path(DEFAULT))
    data = json.loads(record.read_text())
    data[REFRESHED_FIELD] = "2026-12-01T03:00:00Z"
    record.write_text(json.dumps(data))
    [entry] = run_json(install, "list")
    assert entry["archive"] == path
    assert entry["inputs"] == DEFAULT.inputs()
    assert 2 * DAY - 60 < entry["age_seconds"] < 2 * DAY + 60
    assert entry["refreshed"] == "2026-12-01T03:00:00Z"
    assert [i["fstype"] for i in entry["images"]] == ["ext3", "ext4"]
    assert entry["archive_bytes"] == os.path.getsize(path)
    assert entry["size_bytes"] == os.path.getsize(path) + 2 * 8192
    assert (entry["kept"], entry["expired"], entry["created"] is not None) == (True, False, True)


def test_list_says_never_refreshed_and_flags_an_expired_entry(node, install, cache):
    stored(cache, DEFAULT, age_days=20)
    [entry] = run_json(install, "list")
    assert (entry["refreshed"], entry["expired"]) == (None, True)
    status, table = run(install, "list")
    assert status == 0
    row = table.splitlines()[1]
    assert DEFAULT.stem in row and "never" in row and "(expired)" in row


def test_list_table_shows_inputs_orphans_and_variants_without_a_cache(node, install,
                                                                       cache):
    stored(cache, DEFAULT, images=("ext4",))
    stored(cache, ORPHAN)
    status, table = run(install, "list")
    assert status == 0
    lines = table.splitlines()
    assert lines[0].split() == ["ENTRY", "VARIANTS", "AGE", "REFRESHED", "SIZE",
                                "IMAGES", "KEPT"]
    assert any(line.startswith(DEFAULT.stem) and " default" in line and "ext4" in line
               for line in lines)
    assert any(line.startswith(ORPHAN.stem) and "- (orphan)" in line for line in lines)
    assert DEFAULT.describe() in table
    assert "1 orphan(s)" in table
    assert "Variants without a cache: big " in table


def test_list_of_an_empty_cache(node, install):
    assert run(install, "list") == (0, "No cache entries.\nVariants without a cache: "
                                       "default, big (ganeti-debootstrap-cache build "
                                       "makes them).\n")
    assert run_json(install, "list") == []


def test_a_grub_variant_and_the_bootloader_parameter_map_their_own_keys(node, install,
                                                                        cache):
    Path(install.default_variants_dir, "big.conf").write_text("BOOTLOADER=grub\n")
    stored(cache, DEFAULT)
    stored(cache, GRUB)
    listed = {e["name"]: e["variants"] for e in run_json(install, "list")}
    # big's creates use the grub key; with bootloader=none, the default one.
    assert listed[GRUB.stem] == ["default (bootloader=grub)", "big"]
    assert listed[DEFAULT.stem] == ["default", "big (bootloader=none)"]


def test_the_shell_editions_archive_is_listed_as_an_orphan_without_inputs(node, install,
                                                                           cache):
    os.makedirs(cache.directory)
    Path(cache.directory, "cache-trixie-amd64.tar").write_bytes(tar_bytes())
    [entry] = run_json(install, "list")
    assert (entry["name"], entry["inputs"], entry["orphan"]) == \
        ("cache-trixie-amd64", None, True)
    assert "the shell edition's cache" in run(install, "list")[1]


def test_a_variant_without_the_cache_maps_no_entry(node, install, cache):
    Path(install.default_variants_dir, "big.conf").write_text(
        "EXTRA_PKGS=vim\nGENERATE_CACHE=no\n")
    stored(cache, BIG)
    [entry] = run_json(install, "list")
    assert entry["orphan"] is True


# -- prune -----------------------------------------------------------------------

def test_prune_removes_expired_and_orphaned_entries_but_kept_ones(node, install, cache):
    fresh = stored(cache, DEFAULT, images=("ext4",))
    old = stored(cache, BIG, age_days=15, images=("ext4",))
    orphan = stored(cache, ORPHAN, images=("ext4",))
    kept = stored(cache, CacheKey("sid", "amd64", "", (), (), TOOL), kept=True,
                  age_days=30)
    report = {i["name"]: i for i in run_json(install, "prune")}
    assert {n: (i["reason"], i["removed"]) for n, i in report.items()} == {
        BIG.stem: ("expired", True), ORPHAN.stem: ("orphan", True),
        os.path.basename(kept)[:-4]: ("orphan", False)}
    assert report[os.path.basename(kept)[:-4]]["kept"] is True
    names = sorted(os.listdir(cache.directory))
    assert not [n for n in names if n.startswith((BIG.stem, ORPHAN.stem))]
    assert os.path.exists(fresh) and os.path.exists(kept)
    assert os.path.exists(os.path.join(cache.directory, image_name(DEFAULT.stem, "ext4")))
    assert not os.path.exists(old) and not os.path.exists(orphan)


def test_prune_dry_run_says_what_it_would_remove_and_removes_nothing(node, install, cache):
    stored(cache, BIG, age_days=15)
    stored(cache, ORPHAN)
    before = sorted(os.listdir(cache.directory))
    status, out = run(install, "prune", "--dry-run")
    assert status == 0
    # In the order of the names, as list shows them.
    assert out.splitlines() == [f"would remove: {ORPHAN.stem} (orphan, 0 MiB)",
                                f"would remove: {BIG.stem} (expired, 0 MiB)"]
    assert sorted(os.listdir(cache.directory)) == before


def test_prune_leaves_an_orphan_in_use(node, install, cache):
    stored(cache, ORPHAN)
    other = Cache(cache.directory)
    with other.using(ORPHAN, lambda: None):
        [item] = run_json(install, "prune")
    assert (item["reason"], item["removed"]) == ("orphan", False)
    assert os.path.exists(cache.archive_path(ORPHAN))
    assert run(install, "prune")[1] == f"removed: {ORPHAN.stem} (orphan, 0 MiB)\n"


def test_prune_with_nothing_to_do(node, install, cache):
    stored(cache, DEFAULT)
    assert run(install, "prune") == (0, "Nothing to prune.\n")


def test_prune_refuses_when_a_variants_settings_cannot_be_read(node, install, cache,
                                                               capsys):
    stored(cache, BIG)
    Path(install.default_variants_dir, "big.conf").write_text("PARTITION_STYLE=zip\n")
    status, _ = run(install, "prune")
    assert status == 1
    assert "PARTITION_STYLE" in capsys.readouterr().err
    assert os.path.exists(cache.archive_path(BIG))


def test_prune_expires_by_the_shortest_clean_cache_of_the_variants(node, install, cache):
    Path(install.default_variants_dir, "big.conf").write_text(
        "EXTRA_PKGS=vim\nCLEAN_CACHE=3\n")
    stored(cache, DEFAULT, age_days=5)
    [item] = run_json(install, "prune", "--dry-run")
    assert (item["name"], item["reason"], item["would_remove"]) == \
        (DEFAULT.stem, "expired", True)


# -- build -----------------------------------------------------------------------

def bootstrap_tree(argv) -> None:
    """What mmdebstrap leaves: a tree with the base system's files."""
    dest = argv[-1]
    for name in ESSENTIALS:
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        Path(dest, name).write_text("x\n")


def test_build_of_a_complete_entry_reports_it_and_bootstraps_nothing(node, install, cache):
    path = stored(cache, BIG, images=("ext4",))
    before = os.stat(path).st_mtime_ns
    [result] = run_json(install, "build", "big")
    assert (result["variant"], result["entry"], result["status"], result["images"]) == \
        ("big", BIG.stem, "present", ["ext4"])
    assert os.stat(path).st_mtime_ns == before
    assert not [c for c in node.commands() if c.startswith(("mmdebstrap", "tar"))]


def test_build_bootstraps_a_missing_entry_as_create_would(node, install, cache):
    Path(install.defaults_file).write_text("CACHE_IMAGE=no\n")
    node.expect("mmdebstrap", action=bootstrap_tree)
    node.expect("tar", "--create", action=fake_tar_create(tar_bytes(members=1)))
    status, out = run(install, "build", "big")
    assert status == 0
    assert out == f"big: built {BIG.stem}\n"
    bootstrap = [c for c in node.calls if c[0] == "mmdebstrap"]
    assert len(bootstrap) == 1 and "--include=vim" in bootstrap[0]
    assert os.path.isfile(cache.archive_path(BIG))
    assert json.loads(Path(cache.inputs_path(BIG)).read_text())["key"] == BIG.inputs()
    # Nothing of the staging tree is left.
    assert sorted(os.listdir(cache.directory)) == sorted(
        [BIG.stem + ".lock", BIG.stem + INPUTS_SUFFIX, BIG.stem + ".tar"])


def test_build_all_goes_on_after_a_failure_and_names_it_last(node, install, cache, capsys):
    Path(install.defaults_file).write_text("CACHE_IMAGE=no\n")
    stored(cache, DEFAULT)
    node.expect("mmdebstrap", returncode=1, stderr="E: cannot reach the mirror")
    status, out = run(install, "build", "--all", "--json")
    assert status == 1
    assert [(r["variant"], r["status"]) for r in json.loads(out)] == \
        [("default", "present"), ("big", "failed")]
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("ERROR: ganeti-debootstrap-cache build failed: Building "
                              "failed for big: Command mmdebstrap")


def test_build_with_os_parameters_uses_the_entry_of_those_parameters(node, install,
                                                                     cache):
    Path(install.defaults_file).write_text("CACHE_IMAGE=no\n")
    stored(cache, GRUB)
    [result] = run_json(install, "build", "-O", "bootloader=grub,filesystem=ext4", "default")
    assert (result["entry"], result["status"]) == (GRUB.stem, "present")


def test_build_refuses_a_variant_without_the_cache(node, install, capsys):
    Path(install.default_variants_dir, "big.conf").write_text("GENERATE_CACHE=no\n")
    status, _ = run(install, "build", "big")
    assert status == 1
    assert "GENERATE_CACHE=no" in capsys.readouterr().err.splitlines()[-1]


# -- refusals and arguments ------------------------------------------------------

def test_build_refuses_an_unknown_variant_naming_the_variants(node, install, capsys):
    assert run(install, "build", "default", "tiny")[0] == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("ERROR: ganeti-debootstrap-cache build failed: Unknown variant(s) tiny")
    assert last.endswith("are default, big.")


@pytest.mark.parametrize("argv", [["build"], ["build", "--all", "default"]])
def test_build_needs_variants_or_all_but_not_both(install, capsys, argv):
    assert run(install, *argv)[0] == 2
    assert "Name the variants to build or give --all" in capsys.readouterr().err


def test_bad_os_parameters_are_a_usage_error(node, install, capsys):
    assert run(install, "build", "-O", "bootloader", "default")[0] == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_refuses_to_run_as_another_user_than_root(install, capsys):
    assert run(install, "list", euid=1000) == (2, "")
    assert "must run as root" in capsys.readouterr().err


def test_refuses_a_cache_directory_others_can_change(install, capsys):
    os.chmod(install.localstatedir, 0o777)
    assert run(install, "list")[0] == 1
    err = capsys.readouterr().err
    assert "Refusing to use the bootstrap cache" in err and "chmod go-w" in err


@pytest.mark.parametrize("command", [c.name for c in cacheadmin.COMMANDS])
def test_each_subcommand_has_its_help_and_json(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cacheadmin.parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ganeti-debootstrap-cache {command}")
    assert "--json" in text


def test_an_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cacheadmin.main(None, ["refreshh"], paths=Paths("/", "/", "/"), euid=0)
    assert stop.value.code == 2


def test_a_subcommand_is_one_entry_of_the_table():
    parser = cacheadmin.parser()
    args = parser.parse_args(["prune", "-n", "--json"])
    assert (args.handler, args.dry_run, args.json) == (cacheadmin.run_prune, True, True)


# -- the status line -------------------------------------------------------------

class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_is_cleared_before_any_other_output():
    stream = FakeTty()
    term = progress.Terminal(stream)
    term.show("[1/1] default: building the cache (0:03)")
    term.write("Stored the cache\n")
    assert stream.getvalue() == ("[1/1] default: building the cache (0:03)"
                                 "\r\033[KStored the cache\n")


def test_status_shows_nothing_when_stderr_is_not_a_terminal(capsys):
    with progress.terminal_stderr() as term:
        assert term is None
        with progress.status(term, "label"):
            pass
    assert capsys.readouterr().err == ""


def test_elapsed_time_reads_as_minutes_and_hours():
    assert [progress.elapsed(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]


def test_on_a_terminal_the_log_and_forwarded_output_clear_the_status_line(monkeypatch):
    tty = FakeTty()
    monkeypatch.setattr("sys.stderr", tty)
    handler = logging.StreamHandler(tty)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ganeti_debootstrap")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    with progress.terminal_stderr() as term:
        assert term is not None and handler.stream is term
        assert sys.stderr is term
        term.show("[1/1] default: building the cache (0:01)")
        logger.info("Stored the cache")
    assert handler.stream is tty
    assert tty.getvalue() == ("[1/1] default: building the cache (0:01)"
                              "\r\033[KStored the cache\n")


# -- refresh ---------------------------------------------------------------------
# The refresh itself (apt in a staging copy, the swap, the images) is
# cache_refresh's, tested as root against a loopback archive
# (tests/root/test_cache_refresh.py); here, what the command asks of it.

class RecordedRefresh:
    """Stands in for cache_refresh.refresh: records each call, answers a report."""

    def __init__(self, fail: dict[CacheKey, str] | None = None) -> None:
        self.calls: list[tuple[str, CacheKey, str]] = []
        self.sources: list[str | None] = []
        self.fail = fail or {}

    def __call__(self, store, key, conf, *, sources=None):
        self.calls.append((store.directory, key, conf.suite))
        self.sources.append(sources)
        if key in self.fail:
            raise CacheError(self.fail[key])
        change = cache_refresh.PackageChange("nano", "8.4-1", "8.4-1+deb13u1")
        return cache_refresh.RefreshReport(store.archive_path(key), (change,), 3.0)


@pytest.fixture
def refreshed(monkeypatch) -> RecordedRefresh:
    recorded = RecordedRefresh()
    monkeypatch.setattr(cache_refresh, "refresh", recorded)
    return recorded


def test_refresh_all_refreshes_each_entry_once_and_skips_variants_without_one(
        node, install, cache, refreshed):
    stored(cache, DEFAULT)
    stored(cache, GRUB)
    results = run_json(install, "refresh", "--all")
    assert [(r["variant"], r["name"], r["status"]) for r in results] == [
        ("default", DEFAULT.stem, "upgraded"),
        ("default (bootloader=grub)", GRUB.stem, "upgraded"),
        ("big", BIG.stem, "no entry")]
    assert [(d, k) for d, k, _ in refreshed.calls] == [
        (install.cache_dir, DEFAULT), (install.cache_dir, GRUB)]
    assert results[0]["upgraded"] == [
        {"package": "nano", "old": "8.4-1", "new": "8.4-1+deb13u1"}]


def test_refresh_prints_one_line_per_entry(node, install, cache, refreshed):
    stored(cache, BIG)
    status, out = run(install, "refresh", "big")
    assert status == 0
    assert out == (f"big: {BIG.stem}.tar: 1 package(s) upgraded in 3 s: "
                   f"nano 8.4-1 -> 8.4-1+deb13u1\n")


def test_refresh_of_a_named_variant_without_an_entry_says_how_to_make_it(
        node, install, cache, refreshed, capsys):
    status, _ = run(install, "refresh", "big")
    assert status == 1
    assert refreshed.calls == []
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("ERROR: ganeti-debootstrap-cache refresh failed: Refreshing "
                           "failed for big: there is no cache entry for big")
    assert "ganeti-debootstrap-cache build big" in last


def test_a_failed_refresh_is_named_last_after_the_others_ran(node, install, cache,
                                                            monkeypatch, capsys):
    stored(cache, DEFAULT)
    path = stored(cache, BIG)
    before = Path(path).read_bytes()
    recorded = RecordedRefresh(fail={DEFAULT: "apt-get update failed"})
    monkeypatch.setattr(cache_refresh, "refresh", recorded)
    status, out = run(install, "refresh", "--all", "--json")
    assert status == 1
    assert [(r["variant"], r["status"]) for r in json.loads(out)][:2] == [
        ("default", "failed"), ("big", "upgraded")]
    assert Path(path).read_bytes() == before
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "ERROR: ganeti-debootstrap-cache refresh failed: Refreshing failed for "
        "default: apt-get update failed")


def test_refresh_needs_variants_or_all(node, install, refreshed, capsys):
    status, _ = run(install, "refresh")
    assert status == 2
    assert "Name the variants to refresh or give --all" in capsys.readouterr().err


def test_refresh_sources_file_is_handed_to_each_refresh(node, install, cache, refreshed,
                                                        tmp_path):
    stored(cache, DEFAULT)
    stored(cache, BIG)
    listing = tmp_path / "staging.list"
    listing.write_text("# the site's staging mirror\ndeb http://127.0.0.1:8080/ ./\n")
    run_json(install, "refresh", "--all", "--sources", str(listing))
    assert refreshed.sources == [listing.read_text()] * 2


@pytest.mark.parametrize("content, said", [
    (None, "cannot read it"),
    ("# nothing\n", "has no 'deb' line"),
    ("deb http://127.0.0.1/ ./\n" * 5000, "larger than 65536 bytes"),
])
def test_refresh_refuses_a_sources_file_it_cannot_use(node, install, cache, refreshed,
                                                      tmp_path, capsys, content, said):
    stored(cache, DEFAULT)
    listing = tmp_path / "staging.list"
    if content is not None:
        listing.write_text(content)
    status, _ = run(install, "refresh", "default", "--sources", str(listing))
    assert status == 2
    assert refreshed.calls == []
    assert said in capsys.readouterr().err.splitlines()[-1]
