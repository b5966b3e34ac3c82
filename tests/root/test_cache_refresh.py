"""Refreshing a cache entry for real, from a local archive served on loopback.

A copy of the session's bootstrapped entry (never the shared one) is
refreshed against a flat APT repository on 127.0.0.1 holding a newer
version of one installed package (nano, a leaf nothing in the tree needs):
through cache_refresh, and through the installed command with --sources,
once with the repository stalling the package's download so that creates
run while the refresh is held half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
import time

import pytest

from ganeti_debootstrap import cache_images, cache_refresh, cache_store
from ganeti_debootstrap.cache_store import Cache
from ganeti_debootstrap.errors import DefinitionError
from ganeti_debootstrap.settings import Settings
from tests.cachelocks import lock_held
from tests.root import bootstrap_fixture, scripts
from tests.root.aptrepo import (BUMP, IMAGE_TYPE, PACKAGE, archive_status, copy_entry,
                               make_repository, served, sources, stalling, version_in)
from tests.root.scripts import create_env, ganeti_env, mounted_root, run_script, start_script

COMMAND = "ganeti-debootstrap-cache"


def fingerprint(store: Cache, key: cache_store.CacheKey) -> dict[str, str]:
    """Every file of the key in the cache directory with its content hash."""
    out = {}
    for name in sorted(os.listdir(store.directory)):
        if name.startswith(key.stem) and not name.endswith(cache_store.LOCK_SUFFIX):
            with open(os.path.join(store.directory, name), "rb") as f:
                out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def leftovers(store: Cache) -> list[str]:
    return [n for n in os.listdir(store.directory)
            if cache_store.STAGING_TAG in n or cache_store.TMP_TAG in n]


@pytest.fixture(scope="module")
def copied(bootstrapped_localstatedir, tmp_path_factory):
    """A cache directory holding a copy of the session's default entry and its image."""
    localstatedir = str(tmp_path_factory.mktemp("refresh"))
    return copy_entry(bootstrapped_localstatedir, localstatedir), bootstrap_fixture.default_key()


@pytest.fixture
def own_copy(bootstrapped_localstatedir, tmp_path):
    """An OS installation whose cache holds its own copy of the default entry."""
    localstatedir = str(tmp_path / "var")
    store = copy_entry(bootstrapped_localstatedir, localstatedir)
    return scripts.make_os_tree(str(tmp_path / "os"), localstatedir), store


@pytest.fixture(scope="module")
def repository(copied, tmp_path_factory):
    store, key = copied
    old = version_in(archive_status(store.archive_path(key)), PACKAGE)
    work = str(tmp_path_factory.mktemp("repo"))
    make_repository(work, PACKAGE, old + BUMP)
    with served(os.path.join(work, "repo")) as url:
        yield url, old


@pytest.fixture(scope="module")
def first_refresh(copied, repository):
    store, key = copied
    url, old = repository
    report = cache_refresh.refresh(store, key, Settings(), sources=sources(url))
    return report, old


def test_refresh_upgrades_the_package_the_mirror_has_newer(first_refresh, copied):
    store, key = copied
    report, old = first_refresh
    assert report.changed
    assert [(c.name, c.old, c.new) for c in report.changes] == [(PACKAGE, old, old + BUMP)]
    assert report.to_json()["upgraded"] == [{"package": PACKAGE, "old": old,
                                             "new": old + BUMP}]
    print(f"\nrefresh with one package to upgrade: {report.seconds:.1f} s")
    assert not leftovers(store)


def test_refreshed_archive_and_image_hold_the_new_version(first_refresh, copied):
    store, key = copied
    report, old = first_refresh
    assert version_in(archive_status(store.archive_path(key)), PACKAGE) == old + BUMP
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        assert entry is not None
        image = cache_images.lookup(entry, IMAGE_TYPE)
        assert image is not None, "the image was not remade for the new archive"
    status = subprocess.run(["debugfs", "-R", "cat /var/lib/dpkg/status", image.path],
                            check=True, capture_output=True, text=True).stdout
    assert version_in(status, PACKAGE) == old + BUMP
    assert report.images == (image.path,)
    header = subprocess.run(["dumpe2fs", "-h", image.path], check=True,
                            capture_output=True, text=True).stdout
    assert store.directory not in header  # where the refresh mounted it
    subprocess.run(["e2fsck", "-fn", image.path], check=True, capture_output=True)


def test_refreshed_tree_is_clean_and_keeps_its_own_sources(first_refresh, copied):
    store, key = copied
    names = subprocess.run(["tar", "-tf", store.archive_path(key)], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    assert not [n for n in names if n.startswith(("./var/lib/apt/lists/", "./run/ganeti"))
                and not n.endswith(("/", "lock"))]
    assert not [n for n in names if n.startswith("./var/cache/apt/") and n.endswith(".bin")]
    assert "./etc/resolv.conf" not in names
    assert "./usr/sbin/policy-rc.d" not in names


def test_next_create_has_the_new_version_and_records_the_refresh(first_refresh, copied,
                                                                 tmp_path):
    store, key = copied
    report, old = first_refresh
    localstatedir = os.path.dirname(os.path.dirname(store.directory))
    tree = scripts.make_os_tree(str(tmp_path / "os"), localstatedir)
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    log = run_script(tree, "create", create_env("fresh1", disk)).stderr.decode()
    with open(store.inputs_path(key)) as f:
        record = json.load(f)
    assert (f"its system from the cache image {key.stem} (made {record['created']}, "
            f"last refreshed {record['refreshed']})") in log
    with mounted_root(disk) as root:
        status = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "--show",
                                 "--showformat=${Version}", PACKAGE], check=True,
                                capture_output=True, text=True).stdout
        origin_file = os.path.join(root, "etc/ganeti-instance-debootstrap/origin")
        mode = os.stat(origin_file).st_mode & 0o7777
        with open(origin_file) as f:
            origin = json.load(f)
    assert status == old + BUMP
    assert mode == 0o644
    assert origin == {**origin, "source": "cache image", "entry": key.stem,
                      "suite": key.suite, "arch": key.arch, "tool": key.tool,
                      "created": record["created"], "refreshed": record["refreshed"]}


def test_refresh_is_recorded_and_creation_time_kept(first_refresh, copied):
    store, key = copied
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        assert entry is not None
        record = store.record(entry)
    assert record is not None
    created = cache_store.record_time(record, "created")
    refreshed = cache_store.record_time(record, "refreshed")
    assert created is not None and refreshed is not None and refreshed >= created


def test_second_refresh_finds_nothing_and_leaves_the_archive(first_refresh, copied,
                                                             repository):
    store, key = copied
    url, _ = repository
    before = fingerprint(store, key)
    report = cache_refresh.refresh(store, key, Settings(), sources=sources(url))
    print(f"\nrefresh with nothing to upgrade: {report.seconds:.1f} s")
    assert not report.changed and report.changes == ()
    after = fingerprint(store, key)
    inputs = os.path.basename(store.inputs_path(key))
    assert {n: h for n, h in after.items() if n != inputs} == \
           {n: h for n, h in before.items() if n != inputs}
    assert not leftovers(store)


@pytest.mark.parametrize("path", ["missing/", "broken/"])
def test_failed_refresh_keeps_the_old_entry(first_refresh, copied, tmp_path, path):
    store, key = copied
    repo = tmp_path / "served"
    (repo / "broken").mkdir(parents=True)
    # A Packages file that does not match its Release: apt refuses it.
    (repo / "broken" / "Packages").write_text("Package: nano\nVersion: 99\n")
    (repo / "broken" / "Release").write_text(
        "Date: Thu, 01 Jan 2026 00:00:00 UTC\nSHA256:\n " + "0" * 64 + " 1 Packages\n")
    before = fingerprint(store, key)
    with served(str(repo)) as url, pytest.raises(DefinitionError):
        cache_refresh.refresh(store, key, Settings(), sources=sources(url + path))
    assert fingerprint(store, key) == before
    assert not leftovers(store)
    with open("/proc/self/mountinfo") as f:
        assert store.directory not in f.read()


def instance_version(disk: str, package: str = PACKAGE) -> str:
    with mounted_root(disk) as root:
        return subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "--show",
                               "--showformat=${Version}", package], check=True,
                              capture_output=True, text=True).stdout


def newer_repository(store: Cache, directory: str) -> tuple[str, str]:
    """A repository with nano newer than ``store``'s: (its directory, the old version)."""
    old = version_in(archive_status(store.archive_path(bootstrap_fixture.default_key())),
                     PACKAGE)
    make_repository(directory, PACKAGE, old + BUMP)
    return os.path.join(directory, "repo"), old


def test_refresh_command_reports_the_upgrade_and_the_next_create_has_it(own_copy,
                                                                       tmp_path):
    tree, store = own_copy
    key = bootstrap_fixture.default_key()
    repo, old = newer_repository(store, str(tmp_path / "work"))
    listing = tmp_path / "staging.list"
    with served(repo) as url:
        listing.write_text(sources(url))
        start = time.monotonic()
        proc = run_script(tree, COMMAND, ganeti_env(),
                          args=("refresh", "default", "--sources", str(listing), "--json"))
        took = time.monotonic() - start
        [result] = json.loads(proc.stdout)
        again = run_script(tree, COMMAND, ganeti_env(),
                           args=("refresh", "default", "--sources", str(listing)))
    print(f"\nrefresh command with one package to upgrade: {took:.1f} s")
    assert (result["variant"], result["name"], result["status"], result["changed"]) == (
        "default", key.stem, "upgraded", True)
    assert result["upgraded"] == [{"package": PACKAGE, "old": old, "new": old + BUMP}]
    assert result["images"] == [os.path.join(store.directory,
                                             cache_store.image_name(key.stem, IMAGE_TYPE))]
    assert re.fullmatch(rf"default: {key.stem}\.tar: up to date \(\d+ s\)\n",
                        again.stdout.decode())
    [listed] = json.loads(run_script(tree, COMMAND, ganeti_env(),
                                     args=("list", "--json")).stdout)
    assert listed["refreshed"] is not None
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    run_script(tree, "create", create_env("after", disk))
    assert instance_version(disk) == old + BUMP
    assert not leftovers(store)


def wait_for_text(path: str, text: str, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return True
        time.sleep(0.1)
    return False


def test_creates_during_a_refresh_use_the_old_entry_and_a_second_refresh_waits(
        own_copy, tmp_path):
    tree, store = own_copy
    key = bootstrap_fixture.default_key()
    repo, old = newer_repository(store, str(tmp_path / "work"))
    listing = tmp_path / "staging.list"
    gate, asked = threading.Event(), threading.Event()
    outs = [str(tmp_path / f"refresh{i}.{s}") for i in (1, 2) for s in ("out", "err")]
    args = ("refresh", "default", "--sources", str(listing), "--json")
    procs: list[subprocess.Popen[bytes]] = []
    during = scripts.sparse_disk(str(tmp_path), 1024, "during.img")
    with served(repo, stalling(gate, asked)) as url, contextlib.ExitStack() as files:
        listing.write_text(sources(url))
        out1, err1, out2, err2 = (files.enter_context(open(p, "wb")) for p in outs)
        try:
            procs.append(start_script(tree, COMMAND, ganeti_env(), args, out1, err1))
            # The refresh is held half-way: apt downloads the new package.
            assert asked.wait(120), "the refresh never asked for the package"
            assert lock_held(store.refresh_lock_path(key), exclusive=True)
            procs.append(start_script(tree, COMMAND, ganeti_env(), args, out2, err2))
            assert wait_for_text(outs[3], "Waiting for another refresh", 60)
            start = time.monotonic()
            create = run_script(tree, "create", create_env("during", during))
            took = time.monotonic() - start
            assert [p.poll() for p in procs] == [None, None], \
                "a refresh ended before the stalled download was let go"
        finally:
            gate.set()
            for proc in procs:
                try:
                    proc.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"\ncreate during a refresh: {took:.1f} s")
    assert b"Waiting for another run" not in create.stderr
    assert took < 60
    assert [p.returncode for p in procs] == [0, 0]
    with open(outs[0]) as f:
        [first] = json.load(f)
    with open(outs[2]) as f:
        [second] = json.load(f)
    assert first["status"] == "upgraded" and first["upgraded"] == [
        {"package": PACKAGE, "old": old, "new": old + BUMP}]
    assert second["status"] == "up to date"
    assert instance_version(during) == old
    after = scripts.sparse_disk(str(tmp_path), 1024, "after.img")
    run_script(tree, "create", create_env("after", after))
    assert instance_version(after) == old + BUMP
    assert not leftovers(store)
