"""Cache entries as Cache.store leaves them, for unit tests (no root): a key,
archive-shaped bytes, a faked ``tar --create``, and entries stored and aged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ganeti_debootstrap import runner
from ganeti_debootstrap.cache_store import Cache, CacheKey, image_name
from tests.fakes import FakeRunner

KEY = CacheKey(suite="trixie", arch="amd64", mirror="", components=(),
               extra_pkgs=(), tool="mmdebstrap")
# The keys create computes for the default variant and one with vim on a
# (faked) amd64 node with mmdebstrap.
DEFAULT = KEY
BIG = CacheKey(suite="trixie", arch="amd64", mirror="", components=(),
               extra_pkgs=("vim",), tool="mmdebstrap")
DAY = 86400


def tar_bytes(members: int = 3) -> bytes:
    """Bytes shaped like an uncompressed tar: ustar headers, zero blocks at the end."""
    header = bytearray(512)
    header[:10] = b"./etc/foo\0"
    header[257:263] = b"ustar\0"
    return bytes(header) + b"data".ljust(512, b"\0") * members + bytes(1024)


def fake_tar_create(data: bytes):
    """A fake ``tar --create`` action writing ``data`` to the --file argument."""
    def action(argv):
        with open(argv[argv.index("--file") + 1], "wb") as f:
            f.write(data)
    return action


def stored(store, key=KEY, data=None):
    """Put a recorded archive for ``key`` in place, the way store() does."""
    fake = FakeRunner().expect("tar", "--create", action=fake_tar_create(data or tar_bytes()))
    with runner.replaced(fake), store.using(key, lambda: None):
        return store.store(key, "/tree")


def age(path, days, now):
    os.utime(path, (now - days * DAY, now - days * DAY))


def stored_archive(store: Cache, key: CacheKey, *, age_days: float = 0,
           images: tuple[str, ...] = (), kept: bool = False) -> str:
    """A recorded archive for ``key`` as Cache.store leaves it; returns its path."""
    fake = FakeRunner().expect("tar", "--create", action=fake_tar_create(tar_bytes(members=1)))
    with runner.replaced(fake), store.using(key, lambda: None):
        entry = store.store(key, "/tree")
    for fstype in images:
        image = os.path.join(store.directory, image_name(key.stem, fstype))
        Path(image).write_bytes(b"\0" * 8192)
        st = os.stat(entry.path)
        Path(image + ".json").write_text(json.dumps(
            {"format": 1, "archive_size": st.st_size, "archive_mtime_ns": st.st_mtime_ns,
             "size": 8192, "fstype": fstype}))
    if age_days:
        then = time.time() - age_days * DAY
        os.utime(entry.path, (then, then))
        for fstype in images:
            # The image records the archive's mtime it was made from.
            record = Path(store.directory, image_name(key.stem, fstype) + ".json")
            data = json.loads(record.read_text())
            data["archive_mtime_ns"] = os.stat(entry.path).st_mtime_ns
            record.write_text(json.dumps(data))
    if kept:
        os.chmod(entry.path, 0o400)
    return entry.path
