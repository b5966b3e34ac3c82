"""cache.open_source: create's one call into the cache (no root: fake commands)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from ganeti_debootstrap import cache, cache_images
from ganeti_debootstrap.cache_store import FORMAT_VERSION, Cache, CacheEntry, CacheKey
from ganeti_debootstrap.settings import Settings
from tests.cachelocks import lock_held

CONF = Settings(arch="amd64")
TOOL = "mmdebstrap"
KEY = CacheKey.from_settings(CONF, TOOL)
DAY = 86400


def tar_bytes() -> bytes:
    header = bytearray(512)
    header[257:263] = b"ustar\0"
    return bytes(header) + b"data".ljust(512, b"\0") + bytes(1024)


def stored(directory: str, fake_runner) -> CacheEntry:
    """A recorded archive for KEY, put in place by Cache.store."""
    def write(argv):
        with open(argv[argv.index("--file") + 1], "wb") as f:
            f.write(tar_bytes())
    fake_runner.expect("tar", "--create", action=write, times=1)
    store = Cache(directory)
    with store.using(KEY, lambda: None):
        entry = store.store(KEY, "/tree")
    fake_runner.calls.clear()
    return entry


def imaged(entry: CacheEntry, fstype: str = "ext4") -> str:
    """An image of ``entry`` with the record cache_images.build writes."""
    path = cache_images.image_path(entry, fstype)
    with open(path, "wb") as f:
        f.write(bytes(8192))
    st = os.stat(entry.path)
    with open(cache_images.record_path(entry, fstype), "w") as f:
        json.dump({"format": FORMAT_VERSION, "archive_size": st.st_size,
                   "archive_mtime_ns": st.st_mtime_ns, "size": 8192, "fstype": fstype}, f)
    return path


def lock_taken(directory: str, exclusive: bool) -> bool:
    """Whether another open file can NOT take KEY's lock that way now."""
    return lock_held(os.path.join(directory, KEY.stem + ".lock"), exclusive)


def test_without_generate_cache_the_cache_is_not_touched(fake_runner, tmp_path):
    directory = str(tmp_path / "cache")
    with contextlib.ExitStack() as hold:
        source = cache.open_source(hold, Settings(arch="amd64", generate_cache=False),
                                   TOOL, "amd64", "ext4", directory)
    assert source.entry is None and source.image is None and source.key == KEY
    assert not os.path.exists(directory) and fake_runner.calls == []


def test_a_complete_cache_is_read_under_a_shared_lock(fake_runner, tmp_path):
    directory = str(tmp_path)
    entry = stored(directory, fake_runner)
    image = imaged(entry)
    with contextlib.ExitStack() as hold:
        source = cache.open_source(hold, CONF, TOOL, "amd64", "ext4", directory)
        assert source.entry == entry and source.image is not None
        assert source.image.path == image
        assert not lock_taken(directory, exclusive=False)
        assert lock_taken(directory, exclusive=True)
    assert not lock_taken(directory, exclusive=True)
    assert fake_runner.calls == []


def test_a_missing_cache_is_held_exclusively_for_the_bootstrap(fake_runner, tmp_path):
    directory = str(tmp_path)
    with contextlib.ExitStack() as hold:
        source = cache.open_source(hold, CONF, TOOL, "amd64", "ext4", directory)
        assert source.entry is None
        assert lock_taken(directory, exclusive=False)
    assert os.listdir(directory) == []


def test_old_archives_and_images_without_an_archive_go_first(fake_runner, tmp_path):
    directory = str(tmp_path)
    entry = stored(directory, fake_runner)
    imaged(entry)
    old = time.time() - 15 * DAY
    os.utime(entry.path, (old, old))
    with contextlib.ExitStack() as hold:
        source = cache.open_source(hold, CONF, TOOL, "amd64", "ext4", directory)
        assert source.entry is None
    assert os.listdir(directory) == []


def test_a_failed_image_falls_back_to_the_archive(fake_runner, tmp_path, caplog):
    directory = str(tmp_path)
    entry = stored(directory, fake_runner)
    fake_runner.expect("tar", "--extract")
    fake_runner.expect("mke2fs", returncode=1, stderr="mke2fs: No space left on device")
    with contextlib.ExitStack() as hold, caplog.at_level(logging.WARNING):
        source = cache.open_source(hold, CONF, TOOL, "amd64", "ext4", directory)
        assert source.entry == entry and source.image is None
        # Shared again: others may unpack the archive alongside.
        assert not lock_taken(directory, exclusive=False)
    assert "unpacking the archive instead" in caplog.text
    assert [c[0] for c in fake_runner.calls] == ["tar", "mke2fs"]
    assert sorted(os.listdir(directory)) == sorted(
        [KEY.stem + ".tar", KEY.stem + ".inputs.json", KEY.stem + ".lock"])
