"""The cache's key, lock, store protocol, validation and expiry (no root)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import threading
import time

import pytest

from ganeti_debootstrap import cache_store
from ganeti_debootstrap.cache_store import Cache, CacheKey
from ganeti_debootstrap.errors import CommandError
from ganeti_debootstrap.settings import Settings
from tests.cacheentries import KEY, age, fake_tar_create, stored, tar_bytes
from tests.cachelocks import lock_held

OTHER = CacheKey(suite="trixie", arch="amd64", mirror="", components=(),
                 extra_pkgs=("vim",), tool="mmdebstrap")
LISTING = "./\n./etc/\n./etc/os-release\n./etc/debian_version\n./usr/bin/dpkg\n"


# -- the key ------------------------------------------------------------------

def test_key_resolves_an_empty_arch_to_the_nodes(fake_runner):
    fake_runner.expect("dpkg", "--print-architecture", stdout="arm64\n")
    key = CacheKey.from_settings(Settings(), "debootstrap")
    assert key.arch == "arm64"
    assert fake_runner.commands() == ["dpkg --print-architecture"]


def test_key_takes_an_explicit_arch_without_asking_dpkg(fake_runner):
    key = CacheKey.from_settings(Settings(arch="i386"), "debootstrap")
    assert key.arch == "i386" and fake_runner.calls == []


def test_key_uses_an_arch_the_caller_already_resolved(fake_runner):
    key = CacheKey.from_settings(Settings(), "debootstrap", "riscv64")
    assert key.arch == "riscv64" and fake_runner.calls == []
    assert key.describe() == ("trixie/riscv64 with debootstrap (mirror: default, "
                              "components: default, extra packages: none)")


@pytest.mark.parametrize("change", [
    {"suite": "bookworm"}, {"arch": "i386"}, {"mirror": "http://m.invalid/debian"},
    {"components": ("main", "contrib")}, {"extra_pkgs": ("vim",)},
    {"tool": "debootstrap"}, {"format": cache_store.FORMAT_VERSION + 1}])
def test_every_input_changes_the_key(change):
    changed = CacheKey(**{**_fields(KEY), **change})
    assert changed.digest != KEY.digest
    assert changed.stem != KEY.stem


def _fields(key):
    return {"suite": key.suite, "arch": key.arch, "mirror": key.mirror,
            "components": key.components, "extra_pkgs": key.extra_pkgs,
            "tool": key.tool, "format": key.format}


def test_order_and_repetition_of_extra_packages_do_not_change_the_key():
    a = CacheKey.from_settings(Settings(arch="amd64", extra_pkgs=("vim", "curl")), "mmdebstrap")
    b = CacheKey.from_settings(Settings(arch="amd64", extra_pkgs=("curl", "vim", "curl")),
                               "mmdebstrap")
    assert a == b and a.digest == b.digest


def test_component_order_changes_the_key():
    a = CacheKey.from_settings(Settings(arch="amd64", components=("main", "contrib")), "x")
    b = CacheKey.from_settings(Settings(arch="amd64", components=("contrib", "main")), "x")
    assert a.digest != b.digest


def test_file_names_keep_the_shell_editions_prefix(store):
    assert re.fullmatch(r"cache-trixie-amd64-[0-9a-f]{12}", KEY.stem)
    assert store.archive_path(KEY) == os.path.join(store.directory, KEY.stem + ".tar")
    assert store.inputs_path(KEY).endswith(KEY.stem + ".inputs.json")


# -- storing ------------------------------------------------------------------

def test_store_writes_a_private_archive_and_records_its_inputs(fake_runner, store):
    fake_runner.expect("tar", "--create", action=fake_tar_create(tar_bytes()))
    with store.using(KEY, lambda: None):
        entry = store.store(KEY, "/tree")
    tmp = fake_runner.calls[0][3]
    assert fake_runner.calls == [(
        "tar", "--create", "--file", tmp, "--directory", "/tree",
        "--format=posix", "--numeric-owner", "--xattrs", "--xattrs-include=*",
        "--sparse", "--one-file-system", ".")]
    assert os.path.dirname(tmp) == store.directory and tmp != entry.path
    assert stat.S_IMODE(os.stat(entry.path).st_mode) == 0o600
    record = json.load(open(entry.inputs_file))
    assert record["key"] == KEY.inputs()
    assert record["archive"] == os.path.basename(entry.path)
    assert record["size"] == os.path.getsize(entry.path)
    assert sorted(os.listdir(store.directory)) == sorted(
        [KEY.stem + ".tar", KEY.stem + ".inputs.json", KEY.stem + ".lock"])


def test_failed_tar_leaves_nothing_under_the_real_name(fake_runner, store):
    fake_runner.expect("tar", "--create", returncode=2, stderr="tar: write error",
                       action=fake_tar_create(b"half an archive"))
    with store.using(KEY, lambda: None):
        with pytest.raises(CommandError, match="write error"):
            store.store(KEY, "/tree")
        assert os.listdir(store.directory) == [KEY.stem + ".lock"]
    assert os.listdir(store.directory) == []


def test_interrupt_while_recording_removes_the_temporary_archive(fake_runner, store, monkeypatch):
    fake_runner.expect("tar", "--create", action=fake_tar_create(tar_bytes()))

    def fail(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache_store.Cache, "_record", fail)
    with store.using(KEY, lambda: None):
        with pytest.raises(OSError, match="No space"):
            store.store(KEY, "/tree")
        assert os.listdir(store.directory) == [KEY.stem + ".lock"]
    assert os.listdir(store.directory) == []


def test_store_without_the_lock_is_a_programming_error(store):
    os.makedirs(store.directory)
    with pytest.raises(RuntimeError, match="without its lock"):
        store.store(KEY, "/tree")


def test_staging_dir_is_private_and_removed_after_use(store):
    with store.using(KEY, lambda: None):
        with store.staging_dir(KEY) as root:
            parent = os.path.dirname(root)
            assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
            os.makedirs(os.path.join(root, "etc"))
            open(os.path.join(root, "etc/os-release"), "w").close()
        assert not os.path.exists(parent)


def test_staging_dir_is_removed_when_the_bootstrap_fails(store):
    with store.using(KEY, lambda: None):
        with pytest.raises(CommandError):
            with store.staging_dir(KEY) as root:
                os.makedirs(os.path.join(root, "usr/bin"))
                raise CommandError(["debootstrap"], 1, "E: failed")
        assert os.listdir(store.directory) == [KEY.stem + ".lock"]


def test_extract_keeps_owners_modes_acls_and_attributes(fake_runner, store):
    entry = stored(store)
    fake_runner.expect("tar", "--extract")
    with store.using(KEY, lambda: None):
        store.extract(entry, "/target")
    assert fake_runner.calls == [(
        "tar", "--extract", "--file", entry.path, "--directory", "/target",
        "--preserve-permissions", "--same-owner", "--numeric-owner", "--xattrs",
        "--xattrs-include=*")]


# -- lookup -------------------------------------------------------------------

def test_lookup_without_an_archive_finds_nothing(fake_runner, store):
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert fake_runner.calls == []


def test_unchanged_archive_is_trusted_without_reading_it(fake_runner, store):
    entry = stored(store)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry
    assert fake_runner.calls == []  # no tar run: size and mtime matched


def test_other_keys_do_not_find_an_archive(fake_runner, store):
    stored(store)
    with store.using(OTHER, lambda: None):
        assert store.lookup(OTHER) is None


def test_garbage_archive_is_removed(fake_runner, store):
    entry = stored(store)
    with open(entry.path, "wb") as f:
        f.write(b"this is not a tar archive at all" * 100)
    fake_runner.expect("tar", "--list", returncode=2,
                       stderr="tar: This does not look like a tar archive")
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert fake_runner.commands() == [f"tar --list --file {entry.path}"]
    assert not os.path.exists(entry.path)
    assert not os.path.exists(entry.inputs_file)


def test_truncated_archive_is_removed_without_listing_it(fake_runner, store):
    entry = stored(store)
    with open(entry.path, "r+b") as f:
        f.truncate(1024)  # header and first data block: no end-of-archive marker
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert fake_runner.calls == []
    assert not os.path.exists(entry.path)


def test_empty_archive_is_removed(fake_runner, store):
    entry = stored(store)
    open(entry.path, "w").close()
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert not os.path.exists(entry.path)


def test_archive_without_a_debian_tree_is_removed(fake_runner, store, caplog):
    entry = stored(store)
    os.utime(entry.path, (1, 1))
    fake_runner.expect("tar", "--list", stdout="./\n./etc/\n./etc/os-release\n")
    with store.using(KEY, lambda: None), caplog.at_level(logging.WARNING):
        assert store.lookup(KEY) is None
    assert "etc/debian_version, usr/bin/dpkg" in caplog.text
    assert not os.path.exists(entry.path)


def test_repacked_valid_archive_is_accepted_and_recorded_again(fake_runner, store, caplog):
    entry = stored(store)
    with open(entry.path, "wb") as f:
        f.write(tar_bytes(members=9))
    fake_runner.expect("tar", "--list", stdout=LISTING)
    with store.using(KEY, lambda: None), caplog.at_level(logging.INFO):
        assert store.lookup(KEY) == entry
    assert "changed since it was recorded" in caplog.text
    record = json.load(open(entry.inputs_file))
    assert record["size"] == os.path.getsize(entry.path)
    assert "recorded_again" in record
    # Recorded again: the next lookup is cheap.
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry
    assert len(fake_runner.calls) == 1


def test_compressed_repack_is_listed_by_tar(fake_runner, store):
    entry = stored(store)
    with open(entry.path, "wb") as f:
        f.write(b"\x1f\x8b\x08" + bytes(100))  # gzip: no ustar header to check
    fake_runner.expect("tar", "--list", stdout=LISTING.replace("./", ""))
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry


def test_archive_whose_record_was_lost_is_checked_and_recorded(fake_runner, store):
    entry = stored(store)
    os.unlink(entry.inputs_file)
    fake_runner.expect("tar", "--list", stdout=LISTING)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry
    assert json.load(open(entry.inputs_file))["key"] == KEY.inputs()


def test_record_without_a_key_counts_as_lost(fake_runner, store):
    entry = stored(store)
    with open(entry.inputs_file, "w") as f:
        f.write('{"size": 1}')
    fake_runner.expect("tar", "--list", stdout=LISTING)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry
    assert json.load(open(entry.inputs_file))["key"] == KEY.inputs()


def test_extract_without_the_lock_is_a_programming_error(fake_runner, store):
    entry = stored(store)
    with pytest.raises(RuntimeError, match="without its lock"):
        store.extract(entry, "/target")
    assert fake_runner.calls == []


def test_archive_recorded_for_other_inputs_is_removed(fake_runner, store):
    entry = stored(store)
    record = json.load(open(entry.inputs_file))
    record["key"]["extra_pkgs"] = ["openssh-server"]
    with open(entry.inputs_file, "w") as f:
        json.dump(record, f)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert not os.path.exists(entry.path)


def test_record_without_archive_is_dropped(fake_runner, store):
    entry = stored(store)
    os.unlink(entry.path)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert not os.path.exists(entry.inputs_file)


def test_shell_edition_cache_is_mentioned_not_used(fake_runner, store, caplog):
    os.makedirs(store.directory)
    legacy = os.path.join(store.directory, "cache-trixie-amd64.tar")
    with open(legacy, "wb") as f:
        f.write(tar_bytes())
    with store.using(KEY, lambda: None), caplog.at_level(logging.INFO):
        assert store.lookup(KEY) is None
    assert "Not using" in caplog.text and os.path.exists(legacy)


# -- leftovers of killed runs ---------------------------------------------------

def leftovers(store, stem):
    os.makedirs(store.directory, exist_ok=True)
    tmp = os.path.join(store.directory, stem + ".tar.tmp-k1ll3d")
    with open(tmp, "wb") as f:
        f.write(b"half")
    staging = os.path.join(store.directory, stem + ".staging-abc_12", "root", "etc")
    os.makedirs(staging)
    return tmp, os.path.dirname(os.path.dirname(staging))


def test_taking_the_lock_removes_the_keys_leftovers(store):
    tmp, staging = leftovers(store, KEY.stem)
    other_tmp, _ = leftovers(store, OTHER.stem)
    with store.using(KEY, lambda: None):
        assert not os.path.exists(tmp) and not os.path.exists(staging)
    assert os.path.exists(other_tmp)


def test_expiry_removes_leftovers_whose_lock_is_free(store):
    tmp, staging = leftovers(store, KEY.stem)
    store.expire()
    assert os.listdir(store.directory) == []


def test_expiry_keeps_leftovers_of_a_running_build(store):
    tmp, staging = leftovers(store, KEY.stem)
    with store.using(KEY, lambda: None):
        # Taking the lock removed them; recreate as the running build's files.
        tmp, staging = leftovers(store, KEY.stem)
        other = Cache(store.directory, clean_days=14)
        other.expire()
        assert os.path.exists(tmp) and os.path.exists(staging)


def test_lock_of_a_dead_holder_does_not_block(store):
    os.makedirs(store.directory)
    # A lock file left behind (its flock died with its process) is reused.
    open(store.lock_path(KEY), "w").close()
    start = time.monotonic()
    with store.using(KEY, lambda: None):
        pass
    assert time.monotonic() - start < 1


def test_waiter_on_a_removed_lock_file_takes_the_new_one(store, monkeypatch):
    os.makedirs(store.directory)
    path = store.lock_path(KEY)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    real_flock = fcntl.flock
    removed: list[str] = []

    def flock(lock_fd, op):
        # Any blocking lock: the store waits shared, then converts.
        if lock_fd != fd and op in (fcntl.LOCK_EX, fcntl.LOCK_SH) and not removed:
            # While we "wait", expiry removes the lock file and releases it.
            os.unlink(path)
            os.close(fd)
            removed.append(path)
        return real_flock(lock_fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with store.using(KEY, lambda: None):
        held = os.stat(path)
    assert removed and held.st_nlink == 1


# -- shared use ---------------------------------------------------------------

def other_holds(store, key=KEY, exclusive=True):
    """Whether another open file can NOT take ``key``'s lock (without waiting)."""
    return lock_held(store.lock_path(key), exclusive)


def test_a_complete_cache_is_read_under_a_shared_lock(store):
    with store.using(KEY, lambda: "complete") as use:
        assert use.found == "complete" and not use.exclusive
        # Another reader gets in at once; a builder cannot.
        assert not other_holds(store, exclusive=False)
        assert other_holds(store, exclusive=True)
        with Cache(store.directory).using(KEY, lambda: "complete") as second:
            assert second.found == "complete"


def test_a_missing_cache_is_made_under_an_exclusive_lock_then_shared(store):
    with store.using(KEY, lambda: None) as use:
        assert use.found is None and use.exclusive
        assert other_holds(store, exclusive=False)
        use.share()
        assert not use.exclusive
        assert not other_holds(store, exclusive=False)
        assert other_holds(store, exclusive=True)
    assert not other_holds(store, exclusive=True)


def test_nothing_may_be_changed_under_a_shared_lock(fake_runner, store):
    stored(store)
    with store.using(KEY, lambda: store.peek(KEY)) as use:
        assert use.found is not None
        with pytest.raises(RuntimeError, match="shared lock"):
            store.store(KEY, "/tree")
        with pytest.raises(RuntimeError, match="shared lock"):
            store.lookup(KEY)
        # Reading is allowed.
        fake_runner.expect("tar", "--extract")
        store.extract(use.found, "/dest")


def test_peek_trusts_only_an_archive_as_recorded_and_changes_nothing(fake_runner, store):
    entry = stored(store)
    with store.using(KEY, lambda: "x"):
        assert store.peek(KEY) == entry
    with open(entry.path, "ab") as f:
        f.write(bytes(512))
    before = sorted(os.listdir(store.directory))
    with store.using(KEY, lambda: "x"):
        assert store.peek(KEY) is None
    assert sorted(os.listdir(store.directory)) == before
    assert fake_runner.calls == []


def test_a_shared_reader_keeps_its_archive_from_expiry(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 15, now)
    with store.using(KEY, lambda: "complete"):
        assert Cache(store.directory, clean_days=14).expire(now) == []
        assert os.path.exists(entry.path)
    assert store.expire(now) == [entry.path]


def test_creates_started_together_build_once_then_read_side_by_side(store):
    """Four users of an empty key, as create uses it: all find it incomplete
    at the same moment; one builds, the others wait for it, then all four
    read at the same time (none queues behind another's shared lock)."""
    os.makedirs(store.directory)
    built = threading.Event()
    builders: list[int] = []
    first_probe = threading.Barrier(4, timeout=10)
    reading = threading.Barrier(4, timeout=10)
    errors: list[BaseException] = []

    def create(n: int) -> None:
        probed: list[bool] = []

        def probe() -> str | None:
            if not probed:
                # All four hold the shared lock here, and all see no cache.
                probed.append(True)
                first_probe.wait()
            return "complete" if built.is_set() else None

        try:
            with Cache(store.directory).using(KEY, probe) as use:
                if use.found is None:
                    assert use.exclusive
                    if not built.is_set():
                        builders.append(n)
                        time.sleep(0.3)  # the bootstrap
                        built.set()
                    use.share()
                # Every create reaches this point while the others hold
                # their shared locks: the barrier breaks if they queue.
                reading.wait()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(builders) == 1


# -- expiry -------------------------------------------------------------------

def test_old_archives_are_removed_with_their_record_and_lock(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 15, now)
    assert store.expire(now) == [entry.path]
    assert os.listdir(store.directory) == []


def test_young_archives_are_kept(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 13, now)
    assert store.expire(now) == []
    assert os.path.exists(entry.path)


def test_archive_without_owner_write_is_kept_forever(store):
    entry = stored(store)
    now = time.time()
    os.chmod(entry.path, 0o400)
    age(entry.path, 4000, now)
    assert store.expire(now) == []
    assert os.path.exists(entry.path) and os.path.exists(entry.inputs_file)


def test_empty_clean_cache_never_removes(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 4000, now)
    assert Cache(store.directory, clean_days=None).expire(now) == []


def test_zero_days_removes_any_archive_older_than_now(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 0.01, now)
    assert Cache(store.directory, clean_days=0).expire(now) == [entry.path]


def test_shell_edition_archives_expire_too_and_nothing_else_is_touched(store):
    os.makedirs(store.directory)
    now = time.time()
    names = ["cache-trixie-amd64.tar", "cache-bookworm-i386.tar.gz",
             "notes.txt", "cache-trixie-amd64.tar.bak", "mycache.tar"]
    for name in names:
        path = os.path.join(store.directory, name)
        open(path, "w").close()
        age(path, 100, now)
    removed = store.expire(now)
    assert removed == [os.path.join(store.directory, "cache-trixie-amd64.tar")]
    assert sorted(os.listdir(store.directory)) == sorted(names[1:])


def test_archive_in_use_is_not_expired(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 15, now)
    with store.using(KEY, lambda: None):
        assert Cache(store.directory, clean_days=14).expire(now) == []
        assert os.path.exists(entry.path)


def test_expiry_of_a_missing_directory_does_nothing(tmp_path):
    assert Cache(str(tmp_path / "none"), clean_days=1).expire() == []
    assert not os.path.exists(tmp_path / "none")


# -- the administrator's view (ganeti-debootstrap-cache) ---------------------------

def test_recorded_inputs_give_back_the_key():
    assert CacheKey.from_inputs(OTHER.inputs()) == OTHER
    assert CacheKey.from_inputs({**KEY.inputs(), "colour": "blue"}) is None
    assert CacheKey.from_inputs({"suite": "trixie"}) is None
    assert CacheKey.from_inputs(["not", "a", "record"]) is None


def test_archives_lists_each_archive_with_its_key_images_and_age(store):
    entry = stored(store)
    image = os.path.join(store.directory, cache_store.image_name(KEY.stem, "ext4"))
    with open(image, "wb") as f:
        f.write(b"\0" * 4096)
    open(os.path.join(store.directory, "cache-trixie-amd64.tar"), "w").close()
    open(os.path.join(store.directory, "notes.txt"), "w").close()
    ours, legacy = sorted(store.archives(), key=lambda a: a.legacy)
    assert (ours.path, ours.key, ours.kept, ours.legacy) == (entry.path, KEY, False, False)
    assert [(i.fstype, i.path, i.size) for i in ours.images] == [("ext4", image, 4096)]
    assert ours.total_size == os.path.getsize(entry.path) + 4096
    assert ours.mtime == os.stat(entry.path).st_mtime
    assert ours.refreshed is None and ours.record["created"]
    assert (legacy.stem, legacy.key, legacy.legacy) == ("cache-trixie-amd64", None, True)


def test_archives_reports_a_refresh_the_record_holds(store):
    entry = stored(store)
    with open(entry.inputs_file) as f:
        record = json.load(f)
    record[cache_store.REFRESHED_FIELD] = "2026-12-01T03:00:00Z"
    with open(entry.inputs_file, "w") as f:
        json.dump(record, f)
    [archive] = store.archives()
    assert archive.refreshed == "2026-12-01T03:00:00Z"


def test_archive_recorded_for_other_inputs_lists_without_a_key(store):
    entry = stored(store)
    with open(entry.inputs_file) as f:
        record = json.load(f)
    record["key"] = OTHER.inputs()
    with open(entry.inputs_file, "w") as f:
        json.dump(record, f)
    [archive] = store.archives()
    assert archive.key is None


def test_expired_says_what_expire_would_drop_and_changes_nothing(store):
    old, kept = stored(store), stored(store, OTHER)
    now = time.time()
    age(old.path, 15, now)
    age(kept.path, 15, now)
    os.chmod(kept.path, 0o400)
    before = sorted(os.listdir(store.directory))
    assert store.expired(now) == [old.path]
    assert sorted(os.listdir(store.directory)) == before
    assert store.expire(now) == [old.path]


def test_remove_drops_the_archive_its_record_images_and_lock(store):
    entry = stored(store)
    image = os.path.join(store.directory, cache_store.image_name(KEY.stem, "ext4"))
    open(image, "w").close()
    open(image + ".json", "w").close()
    assert store.remove(entry.path, "no variant uses it") is True
    assert os.listdir(store.directory) == []


def test_remove_leaves_a_kept_archive_and_one_in_use(store):
    kept, busy = stored(store), stored(store, OTHER)
    os.chmod(kept.path, 0o400)
    assert store.remove(kept.path, "test") is False
    with Cache(store.directory).using(OTHER, lambda: None):
        assert store.remove(busy.path, "test") is False
    assert os.path.exists(kept.path) and os.path.exists(busy.path)
    assert store.remove(os.path.join(store.directory, "cache-gone.tar"), "test") is False


def test_images_of_every_root_type_are_listed_and_their_temporaries_expire(store):
    stored(store)
    for fstype in ("xfs", "btrfs", "ext4"):
        with open(os.path.join(store.directory, cache_store.image_name(KEY.stem, fstype)),
                  "wb") as f:
            f.write(b"\0" * 4096)
    assert store.image_types(KEY) == ["btrfs", "ext4", "xfs"]
    assert cache_store._TEMPORARY.match(
        cache_store.image_name(KEY.stem, "xfs") + cache_store.TMP_TAG + "abc123")
    assert not cache_store._IMAGE_ONLY.match(cache_store.image_name(KEY.stem, "zfs"))
