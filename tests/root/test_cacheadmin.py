"""ganeti-debootstrap-cache run as installed, in its own process, on real caches.

list and build work on the session's bootstrapped cache (read, or found
complete: nothing is bootstrapped again); prune works on a cache of its own
(small real archives of tests/root/cachetree.py), never on the session's,
which other tests use.
"""

from __future__ import annotations

import json
import os
import time

from ganeti_debootstrap import bootstrap
from ganeti_debootstrap.cache_store import Cache, CacheKey
from ganeti_debootstrap.settings import Settings
from tests.root import scripts
from tests.root.bootstrap_fixture import default_key
from tests.root.cachetree import make_system

COMMAND = "ganeti-debootstrap-cache"
DAY = 86400


def cache_command(tree: scripts.OSTree, *args: str, check: bool = True):
    return scripts.run_script(tree, COMMAND, scripts.ganeti_env(), args=args, check=check)


def test_list_shows_the_session_entry_and_the_variant_using_it(tree):
    listed = json.loads(cache_command(tree, "list", "--json").stdout)
    [entry] = [e for e in listed if e["name"] == default_key().stem]
    assert entry["variants"] == ["default"]
    assert entry["inputs"] == default_key().inputs()
    assert (entry["orphan"], entry["kept"]) == (False, False)
    assert entry["archive_bytes"] > 50 * 2**20
    assert entry["size_bytes"] >= entry["archive_bytes"]
    table = cache_command(tree, "list").stdout.decode()
    [row] = [line for line in table.splitlines() if line.startswith(default_key().stem)]
    assert row.split()[1] == "default"
    assert default_key().describe() in table


def test_build_of_a_new_variant_on_a_warm_key_reports_the_entry_present(tree):
    # Another variant whose settings give the same key: its first create is warm.
    tree.variant("warm", "CLEAN_CACHE=30\n")
    start = time.monotonic()
    proc = cache_command(tree, "build", "warm", "--json")
    took = time.monotonic() - start
    [result] = json.loads(proc.stdout)
    assert (result["variant"], result["entry"]) == ("warm", default_key().stem)
    assert result["status"] in ("present", "image made")
    assert "ext4" in result["images"]
    assert b"Bootstrapping" not in proc.stderr
    assert took < 60


def test_build_refuses_an_unknown_variant_with_the_list_of_variants(tree):
    proc = cache_command(tree, "build", "nosuch", check=False)
    assert proc.returncode == 1
    last = proc.stderr.decode().rstrip().splitlines()[-1]
    assert "Unknown variant(s) nosuch" in last and "default" in last


def stored_tree(store: Cache, key: CacheKey, root: str) -> str:
    """A real (small) archive of cachetree's system stored as ``key``'s cache."""
    with store.using(key, lambda: None):
        return store.store(key, root).path


def test_prune_removes_an_expired_entry_and_an_orphan_and_keeps_a_kept_one(tmp_path):
    tree = scripts.make_os_tree(str(tmp_path / "os"), str(tmp_path / "var"))
    tree.variant("second", "EXTRA_PKGS=vim\n")
    system = tmp_path / "system"
    system.mkdir()
    make_system(str(system))
    tool = bootstrap.choose_tool("auto")
    second = CacheKey.from_settings(Settings(extra_pkgs=("vim",)), tool)
    orphan = CacheKey.from_settings(Settings(extra_pkgs=("nano",)), tool)
    kept = CacheKey.from_settings(Settings(extra_pkgs=("ed",)), tool)
    store = Cache(tree.cache_dir)
    expired_path = stored_tree(store, default_key(), str(system))
    fresh_path = stored_tree(store, second, str(system))
    orphan_path = stored_tree(store, orphan, str(system))
    kept_path = stored_tree(store, kept, str(system))
    old = time.time() - 15 * DAY
    os.utime(expired_path, (old, old))
    os.chmod(kept_path, 0o400)

    dry = json.loads(cache_command(tree, "prune", "--dry-run", "--json").stdout)
    assert all(os.path.exists(p) for p in (expired_path, orphan_path, kept_path))
    report = json.loads(cache_command(tree, "prune", "--json").stdout)

    assert [(i["name"], i["would_remove"]) for i in dry] == \
        [(i["name"], not i["kept"]) for i in report]
    assert {i["name"]: (i["reason"], i["removed"], i["kept"]) for i in report} == {
        default_key().stem: ("expired", True, False),
        orphan.stem: ("orphan", True, False),
        kept.stem: ("orphan", False, True)}
    assert not os.path.exists(expired_path) and not os.path.exists(orphan_path)
    assert os.path.exists(fresh_path) and os.path.exists(kept_path)
    left = sorted(os.listdir(tree.cache_dir))
    assert not [n for n in left if n.startswith((default_key().stem, orphan.stem))]
    assert json.loads(cache_command(tree, "prune", "--json").stdout) == [
        {**[i for i in report if i["name"] == kept.stem][0]}]
