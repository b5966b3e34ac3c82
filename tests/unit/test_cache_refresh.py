"""Refreshing a cache entry: versions compared, the report, sources, record and expiry (no root)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from ganeti_debootstrap import cache_refresh, cache_store
from ganeti_debootstrap.cache_refresh import PackageChange, RefreshReport
from ganeti_debootstrap.cache_store import Cache
from ganeti_debootstrap.errors import CacheError, CommandError
from ganeti_debootstrap.settings import Settings
from ganeti_debootstrap.target import Target
from tests.cachelocks import lock_held
from tests.cacheentries import DAY, KEY, age, fake_tar_create, stored, tar_bytes

LISTING = ("apt\t3.0.3\tii \n"
           "nano\t8.4-1\tii \n"
           "libc6:amd64\t2.41-12\tii \n"
           "oldconf\t1.0\trc \n"
           "broken line\n")


def test_installed_packages_are_parsed_and_removed_ones_ignored():
    assert cache_refresh.parse_installed(LISTING) == {
        "apt": "3.0.3", "nano": "8.4-1", "libc6:amd64": "2.41-12"}


def test_installed_asks_dpkg_query_about_the_tree(fake_runner):
    fake_runner.expect("dpkg-query", stdout=LISTING)
    assert cache_refresh.installed("/staging")["nano"] == "8.4-1"
    assert fake_runner.commands() == [
        "dpkg-query --admindir=/staging/var/lib/dpkg --show "
        "--showformat=${binary:Package}\\t${Version}\\t${db:Status-Abbrev}\\n"]


def test_changes_list_upgrades_new_and_removed_packages_by_name():
    before = {"apt": "3.0.3", "nano": "8.4-1", "gone": "1"}
    after = {"apt": "3.0.3", "nano": "8.4-1+deb13u1", "new": "2"}
    assert cache_refresh.version_changes(before, after) == (
        PackageChange("gone", "1", ""), PackageChange("nano", "8.4-1", "8.4-1+deb13u1"),
        PackageChange("new", "", "2"))
    assert cache_refresh.version_changes(before, dict(before)) == ()


def test_report_is_plain_json_and_says_what_changed():
    report = RefreshReport("/c/cache-trixie-amd64-x.tar",
                           (PackageChange("nano", "8.4-1", "8.4-2"),), 12.345,
                           ("/c/cache-trixie-amd64-x.ext4.img",))
    data = json.loads(json.dumps(report.to_json()))
    assert data == {"entry": "/c/cache-trixie-amd64-x.tar", "changed": True,
                    "seconds": 12.3,
                    "upgraded": [{"package": "nano", "old": "8.4-1", "new": "8.4-2"}],
                    "images": ["/c/cache-trixie-amd64-x.ext4.img"]}
    assert report.summary() == ("cache-trixie-amd64-x.tar: 1 package(s) upgraded in "
                                "12 s: nano 8.4-1 -> 8.4-2")
    unchanged = RefreshReport("/c/e.tar", (), 3.0)
    assert not unchanged.changed and unchanged.to_json()["upgraded"] == []
    assert unchanged.summary() == "e.tar: up to date (3 s)"


def _tree(tmp_path, codename="trixie", sources="deb http://m.example/debian trixie main\n"):
    root = tmp_path / "tree"
    (root / "etc" / "apt").mkdir(parents=True)
    (root / "usr" / "share" / "keyrings").mkdir(parents=True)
    (root / "usr" / "share" / "keyrings" / "debian-archive-keyring.gpg").write_bytes(b"k")
    (root / "etc" / "os-release").write_text(f"ID=debian\nVERSION_CODENAME={codename}\n")
    (root / "etc" / "apt" / "sources.list").write_text(sources)
    return Target(str(root))


def test_sources_are_the_instances_with_updates_and_security(tmp_path):
    name, text = cache_refresh.instance_sources(_tree(tmp_path), KEY)
    assert name == "refresh.sources"
    assert "URIs: http://m.example/debian\nSuites: trixie trixie-updates\n" in text
    assert "Suites: trixie-security" in text
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in text


def test_sources_of_an_older_release_are_one_line_from_the_keys_mirror(tmp_path):
    key = dataclasses.replace(KEY, suite="bullseye", mirror="http://local.example/debian",
                              components=("main", "contrib"))
    name, text = cache_refresh.instance_sources(_tree(tmp_path, "bullseye"), key)
    assert name == "refresh.list"
    assert "deb http://local.example/debian bullseye-updates main contrib\n" in text
    assert "deb http://security.debian.org/debian-security bullseye-security" in text


def test_refresh_sources_are_removed_from_the_tree_afterwards(tmp_path):
    t = _tree(tmp_path)
    with cache_refresh.refresh_sources(t, "refresh.list", "deb x y z\n"):
        with open(t.path(cache_refresh.PARTS_DIR + "/refresh.list")) as f:
            assert f.read() == "deb x y z\n"
        assert os.path.exists(t.path(cache_refresh.EMPTY_LIST))
    assert not os.path.exists(t.path(cache_refresh.SOURCES_DIR))
    assert not os.path.lexists(t.path_nofollow("/etc/resolv.conf"))
    assert os.path.exists(t.path("/etc/apt/sources.list"))


# -- the record and expiry --------------------------------------------------------

def _record(path):
    with open(path) as f:
        return json.load(f)


def test_a_refreshed_store_keeps_the_creation_time_and_records_the_refresh(store, fake_runner):
    entry = stored(store)
    record = _record(entry.inputs_file)
    record["created"] = "2020-01-01T00:00:00Z"
    with open(entry.inputs_file, "w") as f:
        json.dump(record, f)
    fake_runner.expect("tar", "--create", action=fake_tar_create(tar_bytes(5)))
    with store.using(KEY, lambda: None):
        entry = store.store(KEY, "/tree", refreshed=True)
    record = _record(entry.inputs_file)
    assert record["created"] == "2020-01-01T00:00:00Z"
    refreshed = cache_store.record_time(record, "refreshed")
    assert refreshed is not None and abs(refreshed - time.time()) < 5
    assert record["size"] == os.path.getsize(entry.path)
    assert store.record(entry) == record


def test_marking_a_refresh_leaves_the_archive_valid(store):
    entry = stored(store)
    mtime = os.stat(entry.path).st_mtime_ns
    with store.using(KEY, lambda: None):
        store.mark_refreshed(KEY)
        assert store.lookup(KEY) == entry
    assert os.stat(entry.path).st_mtime_ns == mtime
    record = _record(entry.inputs_file)
    assert "refreshed" in record and "recorded_again" not in record


def test_recording_again_keeps_the_last_refresh(store):
    entry = stored(store)
    with store.using(KEY, lambda: None):
        store.mark_refreshed(KEY)
    refreshed = _record(entry.inputs_file)["refreshed"]
    with store.using(KEY, lambda: None):
        store._record(KEY, entry.path, entry.inputs_file, _record(entry.inputs_file))
    assert _record(entry.inputs_file)["refreshed"] == refreshed


def test_expiry_counts_from_the_last_refresh(store):
    entry = stored(store)
    now = time.time()
    age(entry.path, 20, now)
    with store.using(KEY, lambda: None):
        store.mark_refreshed(KEY)
    assert Cache(store.directory, clean_days=14).expire(now) == []
    assert os.path.exists(entry.path)
    # Fifteen days after that refresh, it expires.
    assert Cache(store.directory, clean_days=14).expire(now + 15 * DAY) == [entry.path]


def test_an_old_refresh_does_not_keep_an_old_archive(store):
    entry = stored(store)
    now = time.time()
    record = _record(entry.inputs_file)
    record["refreshed"] = time.strftime(cache_store.TIME_FORMAT, time.gmtime(now - 30 * DAY))
    with open(entry.inputs_file, "w") as f:
        json.dump(record, f)
    age(entry.path, 20, now)
    assert store.expire(now) == [entry.path]


def test_record_times_parse_ours_only():
    assert cache_store.record_time({"created": "1970-01-02T00:00:00Z"}, "created") == DAY
    assert cache_store.record_time({"created": "yesterday"}, "created") is None
    assert cache_store.record_time({"created": 5}, "created") is None
    assert cache_store.record_time({}, "refreshed") is None


# -- the apt runs ------------------------------------------------------------------

APT = ("chroot /r apt-get -o Dir::Etc::SourceList=/run/ganeti-debootstrap-refresh/empty.list "
       "-o Dir::Etc::SourceParts=/run/ganeti-debootstrap-refresh/sources.list.d")


def test_apt_runs_noninteractive_through_the_nodes_proxy(fake_runner):
    fake_runner.expect("chroot", "/r", "apt-get")
    cache_refresh.upgrade("/r", Settings(proxy="http://proxy.example:3128"))
    assert fake_runner.commands() == [
        f"{APT} --error-on=any update",
        f"{APT} -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
        f"--no-install-recommends dist-upgrade",
        "chroot /r apt-get clean"]
    for env in fake_runner.envs:
        assert env is not None
        assert env["DEBIAN_FRONTEND"] == "noninteractive"
        assert env["http_proxy"] == env["https_proxy"] == "http://proxy.example:3128"


def test_a_failed_update_stops_before_the_upgrade(fake_runner):
    fake_runner.expect("chroot", "/r", "apt-get").fail_at(0)
    with pytest.raises(CommandError, match="reaches the mirror"):
        cache_refresh.upgrade("/r", Settings())
    assert len(fake_runner.calls) == 1


def test_dpkg_audit_must_say_nothing(fake_runner):
    fake_runner.expect("chroot", "/r", "dpkg", "--audit")
    cache_refresh.check_tree("/r")
    fake_runner.expect("chroot", "/r", "dpkg", "--audit",
                       stdout="The following packages are only half configured\n")
    with pytest.raises(CacheError, match="half configured"):
        cache_refresh.check_tree("/r")


def test_a_kept_archive_stays_kept_and_valid(store):
    entry = stored(store)
    cache_refresh.keep_forever(entry.path)
    assert os.stat(entry.path).st_mode & 0o777 == 0o400
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry


# -- the refresh lock and the swap ------------------------------------------------

def test_a_refresh_lock_keeps_a_second_refresh_out_but_not_readers(store):
    stored(store)
    with store.refreshing(KEY):
        assert lock_held(store.refresh_lock_path(KEY), exclusive=True)
        # Creates (shared) read alongside the refresh.
        assert not lock_held(store.lock_path(KEY), exclusive=False)
    assert not lock_held(store.refresh_lock_path(KEY), exclusive=True)


def test_a_refresh_may_stage_and_record_under_the_shared_lock_only_with_its_lock(store):
    entry = stored(store)
    with store.using(KEY, lambda: store.peek(KEY)) as use:
        assert not use.exclusive
        with pytest.raises(RuntimeError, match="refresh lock"):
            store.mark_refreshed(KEY)
    with store.refreshing(KEY), store.using(KEY, lambda: store.peek(KEY)) as use:
        assert not use.exclusive
        with store.staging_dir(KEY) as root:
            assert os.path.isdir(root)
        store.mark_refreshed(KEY)
    assert "refreshed" in _record(entry.inputs_file)


def test_temporaries_are_not_removed_as_leftovers_while_a_refresh_runs(store):
    stored(store)
    copy = os.path.join(store.directory, f"{KEY.stem}.ext4.img{cache_store.TMP_TAG}abc")
    open(copy, "w").close()
    other = Cache(store.directory)  # another process's view
    with store.refreshing(KEY):
        assert other.expire() == []
        with other.using(KEY, lambda: None):
            pass
        assert os.path.exists(copy)
    other.expire()
    assert not os.path.exists(copy)


def refreshed_archive(store) -> str:
    """A new archive of KEY under the temporary name a refresh writes it to."""
    new = os.path.join(store.directory, store.archive_tmp_prefix(KEY) + "x")
    with open(new, "wb") as f:
        f.write(tar_bytes(5))
    return new


def test_the_swap_refuses_an_archive_replaced_while_refreshing(store, fake_runner):
    entry = stored(store)
    before = os.stat(entry.path)
    new = refreshed_archive(store)
    with store.refreshing(KEY), store.using(KEY, lambda: store.peek(KEY)) as use:
        # Another run repacked the archive while the lock was converted.
        age(entry.path, 1, time.time())
        use.take_exclusive()
        with pytest.raises(CacheError, match="replaced or removed while it was being"):
            store.replace(KEY, new, before)
    assert os.path.exists(new)
    os.unlink(new)


def test_the_swap_puts_the_new_archive_in_place_as_refreshed(store):
    entry = stored(store)
    before = os.stat(entry.path)
    new = refreshed_archive(store)
    with store.refreshing(KEY), store.using(KEY, lambda: store.peek(KEY)) as use:
        with pytest.raises(RuntimeError, match="shared lock"):
            store.replace(KEY, new, before)
        use.take_exclusive()
        assert lock_held(store.lock_path(KEY), exclusive=False)
        assert store.replace(KEY, new, before) == entry
    assert not os.path.exists(new)
    with open(entry.path, "rb") as f:
        assert f.read() == tar_bytes(5)
    assert "refreshed" in _record(entry.inputs_file)


def test_removing_an_entry_removes_its_refresh_lock_file(store):
    entry = stored(store)
    with store.refreshing(KEY):
        pass
    assert os.path.exists(store.refresh_lock_path(KEY))
    assert store.remove(entry.path, "test")
    assert not os.path.exists(store.refresh_lock_path(KEY))
    assert not os.path.exists(store.lock_path(KEY))
