"""A flat APT repository holding a newer version of one package, served on
loopback; and a private copy of the session's bootstrapped cache entry to
refresh from it (never the shared one). For the refresh tests
(test_cache_refresh.py) and the two-node cluster's (test_ganeti_two_nodes.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

from ganeti_debootstrap import cache_images
from ganeti_debootstrap.cache_store import Cache
from tests.root import bootstrap_fixture

PACKAGE = "nano"
BUMP = "+gidbtest1"
IMAGE_TYPE = "ext4"
# The longest a stalled download waits for the test to let it go.
STALL_LIMIT = 300


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def stalling(gate: threading.Event, asked: threading.Event) -> type[_Quiet]:
    """A handler that holds every .deb download until ``gate`` is set (``asked`` then)."""
    class Stalling(_Quiet):
        def do_GET(self) -> None:
            if self.path.endswith(".deb"):
                asked.set()
                gate.wait(STALL_LIMIT)
            super().do_GET()
    return Stalling


@contextlib.contextmanager
def served(directory: str, kind: type[_Quiet] = _Quiet) -> Iterator[str]:
    """``directory`` over HTTP on 127.0.0.1; yields its URL."""
    handler = functools.partial(kind, directory=directory)
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


def copy_entry(bootstrapped_localstatedir: str, localstatedir: str) -> Cache:
    """A cache under ``localstatedir`` holding a copy of the session's default entry
    and its image."""
    key = bootstrap_fixture.default_key()
    shared = Cache(bootstrap_fixture.cache_dir(bootstrapped_localstatedir))
    directory = bootstrap_fixture.cache_dir(localstatedir)
    os.makedirs(directory, mode=0o755)
    store = Cache(directory, clean_days=None)
    with shared.using(key, lambda: None):
        entry = shared.lookup(key)
        assert entry is not None
        shutil.copy2(entry.path, store.archive_path(key))
        shutil.copy2(entry.inputs_file, store.inputs_path(key))
        if cache_images.lookup(entry, IMAGE_TYPE) is not None:
            for path in (cache_images.image_path(entry, IMAGE_TYPE),
                         cache_images.record_path(entry, IMAGE_TYPE)):
                shutil.copy2(path, os.path.join(directory, os.path.basename(path)))
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        assert entry is not None
        cache_images.ensure(store, entry, IMAGE_TYPE)
    return store
