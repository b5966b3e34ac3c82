"""Where an instance came from: the origin file's content and create's log words."""

from __future__ import annotations

import json
import os
import stat

from ganeti_debootstrap import origin
from ganeti_debootstrap.origin import Origin
from ganeti_debootstrap.target import Target
from tests.cacheentries import KEY


def test_a_refreshed_entry_is_named_with_its_times():
    o = Origin(KEY, KEY.stem, "cache image", "2026-11-20T04:00:00Z", "2026-12-01T03:12:00Z")
    assert o.describe() == (f"from the cache image {KEY.stem} (made 2026-11-20T04:00:00Z, "
                            f"last refreshed 2026-12-01T03:12:00Z)")
    data = o.data()
    assert data["refreshed"] == "2026-12-01T03:12:00Z" and "bootstrapped" not in data
    assert (data["suite"], data["arch"], data["mirror"], data["components"],
            data["extra_pkgs"], data["tool"]) == ("trixie", "amd64", "", [], [], "mmdebstrap")


def test_a_bootstrap_without_cache_names_no_entry():
    o = Origin(KEY, bootstrapped="2026-12-02T08:00:00Z")
    assert o.describe() == "bootstrapped 2026-12-02T08:00:00Z"
    assert o.data()["entry"] is None and o.data()["created"] is None


def test_the_file_is_json_readable_by_all(tmp_path):
    t = Target(str(tmp_path))
    origin.write(t, Origin(KEY, KEY.stem, "cache archive", "2026-11-20T04:00:00Z"))
    path = t.path(origin.ORIGIN_FILE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with open(path) as f:
        assert json.load(f)["entry"] == KEY.stem
