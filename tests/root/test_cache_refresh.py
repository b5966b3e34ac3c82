"""Refreshing a cache entry for real, from a local archive served on loopback.

A copy of the session's bootstrapped entry (never the shared one) is
refreshed against a flat APT repository on 127.0.0.1 holding a newer
version of one installed package (nano, a leaf nothing in the tree needs).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from ganeti_debootstrap import cache_images, cache_refresh, cache_store
from ganeti_debootstrap.cache_store import Cache
from ganeti_debootstrap.errors import DefinitionError
from ganeti_debootstrap.settings import Settings
from tests.root import bootstrap_fixture, scripts
from tests.root.scripts import create_env, mounted_root, run_script

PACKAGE = "nano"
BUMP = "+gidbtest1"
IMAGE_TYPE = "ext4"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def served(directory: str) -> Iterator[str]:
    """``directory`` over HTTP on 127.0.0.1; yields its URL."""
    handler = functools.partial(_Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def archive_status(archive: str) -> str:
    return subprocess.run(["tar", "-xOf", archive, "./var/lib/dpkg/status"],
                          check=True, capture_output=True, text=True).stdout


def version_in(status: str, package: str) -> str:
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Package") == package and fields.get("Status", "").endswith(" installed"):
            return fields["Version"]
    raise AssertionError(f"{package} is not installed")


def make_repository(directory: str, package: str, version: str) -> None:
    """A flat APT repository holding a harmless ``package`` at ``version``."""
    build = os.path.join(directory, "build")
    os.makedirs(os.path.join(build, "DEBIAN"))
    doc = os.path.join(build, "usr", "share", "doc", package)
    os.makedirs(doc)
    with open(os.path.join(doc, "gidb-test"), "w") as f:
        f.write("refreshed by the ganeti-instance-debootstrap tests\n")
    with open(os.path.join(build, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
                f"Maintainer: tests <tests@example.invalid>\nPriority: optional\n"
                f"Section: editors\nDescription: test stand-in for {package}\n")
    repo = os.path.join(directory, "repo")
    os.makedirs(repo)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", build,
                    os.path.join(repo, f"{package}_{version}_all.deb")],
                   check=True, capture_output=True)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo,
                              check=True, capture_output=True).stdout
    with open(os.path.join(repo, "Packages"), "wb") as f:
        f.write(packages)
    digest = hashlib.sha256(packages).hexdigest()
    with open(os.path.join(repo, "Release"), "w") as f:
        f.write("Origin: gidb-tests\nLabel: gidb-tests\nSuite: gidb\nCodename: gidb\n"
                "Date: Thu, 01 Jan 2026 00:00:00 UTC\n"
                f"SHA256:\n {digest} {len(packages)} Packages\n")


def sources(url: str) -> str:
    return f"deb [trusted=yes] {url} ./\n"


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
    key = bootstrap_fixture.default_key()
    shared = Cache(bootstrap_fixture.cache_dir(bootstrapped_localstatedir))
    localstatedir = str(tmp_path_factory.mktemp("refresh"))
    directory = bootstrap_fixture.cache_dir(localstatedir)
    os.makedirs(directory, mode=0o755)
    store = Cache(directory, clean_days=None)
    with shared.using(key, lambda: None):
        entry = shared.lookup(key)
        assert entry is not None
        shutil.copy2(entry.path, store.archive_path(key))
        shutil.copy2(entry.inputs_file, store.inputs_path(key))
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        assert entry is not None
        cache_images.ensure(store, entry, IMAGE_TYPE)
    return store, key


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
