"""One real bootstrap per test session, shared by every root test that needs it.

``bootstrapped_localstatedir`` returns a localstatedir whose
``cache/ganeti-instance-debootstrap/`` holds a valid cache entry for the
default settings, built by the real code (bootstrap.run, clean_tree,
Cache.store). Set GIDB_TEST_LOCALSTATEDIR to a directory to keep that cache
between runs: a valid entry there is reused instead of bootstrapping again.

Import it from a conftest (or a test module); however many modules import
it, the bootstrap runs once per session.
"""

from __future__ import annotations

import os

import pytest

from ganeti_debootstrap import bootstrap
from ganeti_debootstrap.cache_store import Cache, CacheEntry, CacheKey
from ganeti_debootstrap.paths import Paths
from ganeti_debootstrap.settings import Settings

ENVIRONMENT_VARIABLE = "GIDB_TEST_LOCALSTATEDIR"

# The localstatedir of this session, once built: every import of this module
# shares it, even when pytest registers the fixture more than once.
_built: dict[str, str] = {}


def default_key() -> CacheKey:
    """The cache key create computes for default settings on this node."""
    settings = Settings()
    return CacheKey.from_settings(settings, bootstrap.choose_tool(settings.bootstrap_tool))


def cache_dir(localstatedir: str) -> str:
    return Paths(sysconfdir="/nonexistent", localstatedir=localstatedir,
                 os_dir="/nonexistent").cache_dir


def ensure_default_cache(localstatedir: str) -> CacheEntry:
    """The default settings' cache entry under ``localstatedir``, built if missing."""
    return ensure_cache(localstatedir, Settings())


def ensure_cache(localstatedir: str, settings: Settings) -> CacheEntry:
    """The cache entry create uses for ``settings`` under ``localstatedir``, built if missing."""
    tool = bootstrap.choose_tool(settings.bootstrap_tool)
    key = CacheKey.from_settings(settings, tool)
    store = Cache(cache_dir(localstatedir), clean_days=None)
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        if entry is None:
            with store.staging_dir(key) as root:
                bootstrap.run(settings, tool, root)
                bootstrap.clean_tree(root)
                entry = store.store(key, root)
    return entry


@pytest.fixture(scope="session")
def bootstrapped_localstatedir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A localstatedir holding a valid cache for the default settings."""
    if "path" not in _built:
        chosen = os.environ.get(ENVIRONMENT_VARIABLE)
        if chosen:
            os.makedirs(chosen, exist_ok=True)
        else:
            chosen = str(tmp_path_factory.mktemp("localstatedir"))
        ensure_default_cache(chosen)
        _built["path"] = chosen
    return _built["path"]
