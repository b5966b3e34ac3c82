"""Where an instance's system came from, recorded in the instance and in create's log.

create writes ``/etc/ganeti-instance-debootstrap/origin`` (JSON, 0644) so
that an administrator can tell how current an instance was at birth: the
cache entry it was unpacked (or copied as an image) from, the inputs of
that entry (suite, architecture, mirror, components, extra packages, tool),
when the entry was made and last refreshed (cache_refresh.py); or, when no
cache was used, the time of its own bootstrap.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from .cache import Source
from .cache_store import REFRESHED_FIELD, TIME_FORMAT, CacheKey
from .target import Target

ORIGIN_FILE = "/etc/ganeti-instance-debootstrap/origin"


@dataclass(frozen=True)
class Origin:
    """What an instance's system was made from."""

    key: CacheKey
    entry: str = ""  # the cache entry's name (its archive's stem); "" if none
    via: str = "bootstrap"  # "cache archive", "cache image" or "bootstrap"
    created: str = ""  # when the cache entry was made
    refreshed: str = ""  # when it was last refreshed; "" if never
    bootstrapped: str = ""  # when this instance's own bootstrap ran

    def describe(self) -> str:
        """For create's log line."""
        if not self.bootstrapped:
            return (f"from the {self.via} {self.entry} (made {self.created or 'unknown'}, "
                    f"last refreshed {self.refreshed or 'never'})")
        kept = f", kept as the cache {self.entry}" if self.entry else ""
        return f"bootstrapped {self.bootstrapped}{kept}"

    def data(self) -> dict[str, Any]:
        """The file's content as plain data."""
        out: dict[str, Any] = {
            "comment": "Where this system came from; written by "
                       "ganeti-instance-debootstrap when the instance was made.",
            "source": self.via,
            "entry": self.entry or None,
            "suite": self.key.suite, "arch": self.key.arch,
            "mirror": self.key.mirror, "components": list(self.key.components),
            "extra_pkgs": list(self.key.extra_pkgs), "tool": self.key.tool,
            "created": self.created or None,
            "refreshed": self.refreshed or None,
        }
        if self.bootstrapped:
            out["bootstrapped"] = self.bootstrapped
        return out


def now() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())


def of_source(source: Source, stored: bool) -> Origin:
    """The origin of a system installed from ``source`` (its lock still held).

    ``stored``: a fresh bootstrap was to be kept as the cache
    (GENERATE_CACHE=yes); it is named when its archive is there.
    """
    if source.entry is None:
        kept = stored and os.path.isfile(source.store.archive_path(source.key))
        return Origin(source.key, source.key.stem if kept else "", bootstrapped=now())
    record = source.store.record(source.entry) or {}
    return Origin(source.key, source.key.stem,
                  "cache image" if source.image is not None else "cache archive",
                  str(record.get("created") or ""), str(record.get(REFRESHED_FIELD) or ""))


def write(t: Target, origin: Origin) -> None:
    """Write the origin file into the instance (0644)."""
    t.write_text(ORIGIN_FILE, json.dumps(origin.data(), indent=2) + "\n", mode=0o644)
