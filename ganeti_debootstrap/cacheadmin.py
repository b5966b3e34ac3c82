"""``ganeti-debootstrap-cache``: the administrator's command for the bootstrap cache.

It works on the cache and settings create uses, through the same code: the
variants' settings are read by plan.prepare as create reads them, each
variant's cache key is CacheKey.from_settings of those, entries are made by
cache.open_source + bootstrap + cache.store_tree, and listed, expired and
removed by cache_store (names, records, locks, expiry and "kept" are
defined there, nowhere else).

Subcommands (each one entry of :data:`COMMANDS`: its name, help, arguments
and function; adding one is one entry and its function):

- ``list``: every entry with its inputs, the variants that map to it, age,
  last refresh, size, images, whether it is kept; entries no variant uses
  are orphans;
- ``build [VARIANT...|--all]``: make the variants' entries now, so the
  first create is warm; a complete entry is reported and left alone;
- ``refresh [VARIANT...|--all]``: bring the variants' entries up to date
  from the mirror without a new bootstrap (cache_refresh.py); a variant
  without an entry is skipped with --all (the timer's call) and refused
  when named;
- ``prune [--dry-run]``: remove expired (CLEAN_CACHE) and orphaned
  entries, kept ones excepted;
- ``push [VARIANT...|--all] [-n NODE]...``: copy the variants' entries from
  the master to the other nodes with Ganeti's ``gnt-cluster copyfile``
  (cache_push.py), after checking that every node computes the same keys.
  Two hidden subcommands serve it on the nodes, run by ``gnt-cluster
  command``: ``key`` (the node's keys and entries) and ``receive MANIFEST``
  (a pushed entry put in place).

Every subcommand takes ``--json`` (the result as JSON on stdout, for
monitoring). The log goes to stderr; on a terminal, long work shows a
status line (progress.py). Exit status: 0 done, 1 an error (explained in
the last paragraph of stderr, as the scripts' cli.py does), 2 a usage
error, 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from . import bootstrap, cache, cache_push, cache_refresh, log, progress, signals
from .cache_store import Cache, CacheKey, StoredArchive
from .environment import Request
from .errors import (CacheError, ClusterError, ConfigError, DefinitionError, Interrupted,
                     UsageError)
from .paths import Paths, from_installed
from .plan import Prepared, prepare
from .settings import BOOTLOADERS, read_variants_list

PROGRAM = "ganeti-debootstrap-cache"
# create's settings are read as for Ganeti's current OS API.
API_VERSION = 20
EXIT_ERROR = 1
EXIT_USAGE = 2

logger = logging.getLogger(__name__)


# --- the variants and their keys ----------------------------------------------------

@dataclass(frozen=True)
class VariantKey:
    """A cache key one variant's creates use.

    ``bootloader`` is the OS parameter it holds for ("": not given, the
    variant's BOOTLOADER setting decides): with grub or grub-efi, the boot
    loader's packages join EXTRA_PKGS and so the key.
    """

    variant: str  # "" when no variant is published: the defaults alone
    bootloader: str
    key: CacheKey
    prepared: Prepared

    @property
    def label(self) -> str:
        name = self.variant or "(defaults)"
        return f"{name} (bootloader={self.bootloader})" if self.bootloader else name


def published_variants(paths: Paths) -> list[str]:
    """The variants create accepts from Ganeti; [""] (the defaults) when none are."""
    return read_variants_list(paths.variants_list) or [""]


def variant_request(variant: str, os_params: dict[str, str] | None = None) -> Request:
    """The part of a create request the settings, parameters and key depend on."""
    return Request(script="create", api_version=API_VERSION, os_variant=variant,
                   os_params=dict(os_params or {}))


def key_of(prepared: Prepared) -> CacheKey:
    """The key create computes for these prepared settings."""
    return CacheKey.from_settings(prepared.settings, prepared.tool, prepared.arch)


def variant_keys(paths: Paths, variant: str) -> list[VariantKey]:
    """Every key ``variant``'s creates can use: as configured, and per boot loader.

    Empty with GENERATE_CACHE=no (its creates never use the cache). A
    setting error of the variant is raised; a boot loader the variant
    cannot use (grub-efi without gpt) just adds no key.
    """
    first = prepare(variant_request(variant), paths, bootstraps=True)
    if not first.settings.generate_cache:
        return []
    found = [VariantKey(variant, "", key_of(first), first)]
    for loader in BOOTLOADERS:
        try:
            other = prepare(variant_request(variant, {"bootloader": loader}), paths,
                            bootstraps=True)
        except DefinitionError:
            continue
        key = key_of(other)
        if all(k.key != key for k in found):
            found.append(VariantKey(variant, loader, key, other))
    return found


def all_variant_keys(paths: Paths) -> list[VariantKey]:
    return [k for v in published_variants(paths) for k in variant_keys(paths, v)]


def clean_days(keys: list[VariantKey]) -> int | None:
    """The shortest CLEAN_CACHE of the variants using the cache (None: none expires).

    Every create of a variant with GENERATE_CACHE=yes expires each entry
    older than its CLEAN_CACHE, so the shortest is what the next creates
    would do anyway; variants without the cache expire nothing.
    """
    days = [k.prepared.settings.clean_cache_days for k in keys]
    known = [d for d in days if d is not None]
    return min(known) if known else None


# --- what list reports -------------------------------------------------------------

@dataclass(frozen=True)
class EntryView:
    """One archive with what the administrator wants to know of it."""

    archive: StoredArchive
    variants: tuple[str, ...]
    expired: bool
    now: float

    @property
    def orphan(self) -> bool:
        return not self.variants

    @property
    def age(self) -> float:
        return max(0.0, self.now - self.archive.mtime)

    def as_json(self) -> dict[str, Any]:
        a = self.archive
        return {
            "name": a.stem,
            "archive": a.path,
            "inputs": a.key.inputs() if a.key else None,
            "variants": list(self.variants),
            "orphan": self.orphan,
            "age_seconds": int(self.age),
            "created": (a.record or {}).get("created"),
            "refreshed": a.refreshed,
            "size_bytes": a.total_size,
            "archive_bytes": a.size,
            "images": [{"fstype": i.fstype, "path": i.path, "bytes": i.size}
                       for i in a.images],
            "kept": a.kept,
            "expired": self.expired,
        }


def entry_views(store: Cache, keys: list[VariantKey], now: float) -> list[EntryView]:
    expired = set(store.expired(now))
    return [EntryView(a, tuple(k.label for k in keys if k.key == a.key),
                      a.path in expired, now)
            for a in store.archives()]


def human_age(seconds: float) -> str:
    """A short age: 40s, 5m, 3h12m, 2d4h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def human_size(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB"


def inputs_line(a: StoredArchive) -> str:
    if a.key is not None:
        return a.key.describe()
    if a.legacy:
        return "the shell edition's cache: records no inputs, not used"
    return "no readable record of its inputs (create checks it when used)"


def render_table(views: list[EntryView], missing: list[VariantKey], out: IO[str]) -> None:
    if not views:
        out.write("No cache entries.\n")
    else:
        rows = [("ENTRY", "VARIANTS", "AGE", "REFRESHED", "SIZE", "IMAGES", "KEPT")]
        for v in views:
            a = v.archive
            rows.append((a.stem, ", ".join(v.variants) or "- (orphan)",
                         human_age(v.age) + (" (expired)" if v.expired else ""),
                         a.refreshed or "never", human_size(a.total_size),
                         ",".join(i.fstype for i in a.images) or "-",
                         "yes" if a.kept else "no"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for n, row in enumerate(rows):
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
            if n:
                out.write(f"    {inputs_line(views[n - 1].archive)}\n")
    orphans = sum(v.orphan for v in views)
    if orphans:
        out.write(f"{orphans} orphan(s): no variant uses them ({PROGRAM} prune "
                  f"removes them unless kept).\n")
    shown = [k for k in missing if not k.bootloader]
    if shown:
        out.write("Variants without a cache: "
                  + ", ".join(k.label for k in shown)
                  + f" ({PROGRAM} build makes them).\n")


# --- the subcommands -----------------------------------------------------------------

@dataclass
class Context:
    """What every subcommand gets besides its arguments."""

    paths: Paths
    out: IO[str]
    terminal: progress.Terminal | None = None
    now: Callable[[], float] = time.time
    # This command's own path, as the other nodes run it (push).
    program: str = PROGRAM
    # The names this node goes by, to tell whether it is the master (push).
    myself: Callable[[], set[str]] = cache_push.this_node_names

    def emit_json(self, data: object) -> None:
        json.dump(data, self.out, indent=2)
        self.out.write("\n")


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    keys = all_variant_keys(ctx.paths)
    store = Cache(ctx.paths.cache_dir, clean_days=clean_days(keys))
    views = entry_views(store, keys, ctx.now())
    if args.json:
        ctx.emit_json([v.as_json() for v in views])
    else:
        present = {v.archive.key for v in views}
        render_table(views, [k for k in keys if k.key not in present], ctx.out)
    return 0


def parse_os_params(text: str) -> dict[str, str]:
    """``name=value,name=value`` as gnt-instance add -O takes them."""
    params = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"-O {text!r}: write OS parameters as NAME=VALUE[,NAME=VALUE] "
                             f"(e.g. -O bootloader=grub,filesystem=ext3).")
        params[name.strip()] = value.strip()
    return params


def chosen_variants(args: argparse.Namespace, paths: Paths) -> list[str]:
    """The variants named (or all with --all), refusing unknown ones by name.

    For every subcommand taking ``VARIANT... | --all`` (build; refresh too).
    """
    published = published_variants(paths)
    names = ", ".join(v for v in published if v) or "none published: use --all"
    if args.all == bool(args.variants):
        raise UsageError(f"Name the variants to {args.command} or give --all "
                         f"(variants: {names}).")
    if args.all:
        return published
    unknown = [v for v in args.variants if v not in published]
    if unknown:
        raise ConfigError(
            f"Unknown variant(s) {', '.join(unknown)}: the variants listed in "
            f"{paths.variants_list} are {names}.")
    return list(dict.fromkeys(args.variants))


@dataclass
class BuildResult:
    variant: str
    entry: str = ""
    status: str = ""  # built, present, image made, failed
    seconds: float = 0.0
    error: str = ""
    images: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "entry": self.entry, "status": self.status,
                "seconds": round(self.seconds, 1), "images": self.images,
                "error": self.error or None}

    @property
    def label(self) -> str:
        return self.variant or "(defaults)"

    def line(self) -> str:
        images = f" ({','.join(self.images)} image)" if self.images else ""
        return f"{self.label}: {self.status} {self.entry}{images}"


class _Result(Protocol):
    """What build and refresh report per variant (or entry)."""

    @property
    def label(self) -> str: ...
    status: str
    error: str

    def as_json(self) -> dict[str, Any]: ...

    def line(self) -> str: ...


def report(args: argparse.Namespace, ctx: Context, results: Sequence[_Result],
           doing: str, note: str) -> None:
    """Print the results (a line each, or JSON); raise naming the failed ones last."""
    if args.json:
        ctx.emit_json([r.as_json() for r in results])
    else:
        for r in results:
            ctx.out.write(r.line() + "\n")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise CacheError(f"{doing} failed for "
                         + "; ".join(f"{r.label}: {r.error.splitlines()[0]}" for r in failed)
                         + f" ({note}).")


def build_one(prepared: Prepared, paths: Paths, result: BuildResult) -> None:
    """Make (or find) the entry create would use for ``prepared``, as create would."""
    conf = prepared.settings
    if not conf.generate_cache:
        raise ConfigError(
            f"The variant {result.variant or '(defaults)'} has GENERATE_CACHE=no "
            f"(set in {' or '.join(conf.sources)}): its creates never use the "
            f"cache, so there is nothing to build.")
    key = key_of(prepared)
    fstype = prepared.params.filesystem
    result.entry = key.stem
    before = Cache(paths.cache_dir).image_types(key)
    with contextlib.ExitStack() as hold:
        source = cache.open_source(hold, conf, prepared.tool, prepared.arch, fstype,
                                   paths.cache_dir)
        if source.entry is not None:
            made = source.image is not None and fstype not in before
            result.status = "image made" if made else "present"
        else:
            logger.info("No cache for %s: bootstrapping it", key.describe())
            with source.store.staging_dir(key) as root:
                bootstrap.run(conf, prepared.tool, root)
                bootstrap.clean_tree(root)
                cache.store_tree(source, root, fstype, conf.cache_image)
            if source.store.peek(key) is None:
                raise CacheError(f"The cache of {key.describe()} could not be stored "
                                 f"in {paths.cache_dir} (the log above says why).")
            result.status = "built"
    result.images = Cache(paths.cache_dir).image_types(key)


def run_build(args: argparse.Namespace, ctx: Context) -> int:
    variants = chosen_variants(args, ctx.paths)
    params = parse_os_params(args.os_parameters or "")
    # Every variant's settings are checked before anything is bootstrapped.
    prepared = [(v, prepare(variant_request(v, params), ctx.paths, bootstraps=True))
                for v in variants]
    results = []
    for n, (variant, prep) in enumerate(prepared, 1):
        result = BuildResult(variant)
        results.append(result)
        label = f"[{n}/{len(prepared)}] {variant or '(defaults)'}"
        start = time.monotonic()
        try:
            with progress.status(ctx.terminal, f"{label}: building the cache"):
                build_one(prep, ctx.paths, result)
        except DefinitionError as exc:
            result.status, result.error = "failed", str(exc)
            logger.error("%s: %s", label, exc)
        result.seconds = time.monotonic() - start
        logger.info("%s: %s %s in %.0f s", label, result.entry or "cache",
                    result.status, result.seconds)
    report(args, ctx, results, "Building", "details above")
    return 0


@dataclass
class RefreshResult:
    """One entry refresh was asked about, and what became of it."""

    label: str  # the variant (and boot loader) it was refreshed for
    entry: str  # the entry's name (key stem)
    status: str = ""  # upgraded, up to date, no entry, failed
    report: cache_refresh.RefreshReport | None = None
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"variant": self.label, "name": self.entry,
                                "status": self.status, "error": self.error or None}
        if self.report is not None:
            data.update(self.report.to_json())
        return data

    def line(self) -> str:
        if self.report is not None:
            return f"{self.label}: {self.report.summary()}"
        return f"{self.label}: {self.status} {self.entry}" + (
            f" ({self.error.splitlines()[0]})" if self.error else "")


# The most of a --sources file read: a sources.list is a few lines.
SOURCES_MAX_BYTES = 64 * 1024


def read_sources(path: str) -> str:
    """The administrator's APT sources for ``refresh --sources``, checked for size."""
    try:
        with open(path, "rb") as f:
            data = f.read(SOURCES_MAX_BYTES + 1)
    except OSError as err:
        raise UsageError(f"--sources {path}: cannot read it ({err.strerror}); give "
                         f"a file of APT sources in sources.list(5) one-line "
                         f"format.") from err
    if len(data) > SOURCES_MAX_BYTES:
        raise UsageError(f"--sources {path} is larger than {SOURCES_MAX_BYTES} "
                         f"bytes; give a sources.list(5) file of a few 'deb' lines.")
    text = data.decode("utf-8", "replace")
    if not any(line.split()[:1] == ["deb"] for line in text.splitlines()):
        raise UsageError(f"--sources {path} has no 'deb' line; give APT sources in "
                         f"sources.list(5) one-line format, e.g. 'deb URL SUITE "
                         f"COMPONENT'.")
    return text


def run_refresh(args: argparse.Namespace, ctx: Context) -> int:
    sources = read_sources(args.sources) if args.sources is not None else None
    variants = chosen_variants(args, ctx.paths)
    # Every variant's settings are checked before anything is refreshed.
    keys = [k for v in variants for k in variant_keys(ctx.paths, v)]
    results: list[RefreshResult] = []
    seen: set[CacheKey] = set()
    present = {a.stem for a in Cache(ctx.paths.cache_dir).archives()}
    for k in keys:
        if k.key in seen:
            continue  # two variants (or boot loaders) with the same entry
        seen.add(k.key)
        if k.key.stem not in present and k.bootloader:
            continue  # no instance was made with that boot loader: nothing to say
        conf = k.prepared.settings
        store = Cache(ctx.paths.cache_dir, clean_days=conf.clean_cache_days)
        result = RefreshResult(k.label, k.key.stem)
        results.append(result)
        if k.key.stem not in present:
            result.status = "no entry"
            if not args.all:
                result.status, result.error = "failed", (
                    f"there is no cache entry for {k.label} to refresh: make it "
                    f"with '{PROGRAM} build {k.variant}' (or a create)")
            continue
        try:
            with progress.status(ctx.terminal, f"{k.label}: refreshing the cache"):
                result.report = cache_refresh.refresh(store, k.key, conf,
                                                      sources=sources)
            result.status = "upgraded" if result.report.changed else "up to date"
        except DefinitionError as exc:
            result.status, result.error = "failed", str(exc)
            logger.error("%s: %s (the entry is left as it was)", k.label, exc)
    report(args, ctx, results, "Refreshing",
           "details above; each failed entry is left as it was")
    return 0


@dataclass(frozen=True)
class PruneItem:
    """An entry prune is about: expired or orphaned, and what became of it."""

    archive: StoredArchive
    reason: str  # expired, orphan
    removed: bool

    def as_json(self) -> dict[str, Any]:
        a = self.archive
        return {"name": a.stem, "archive": a.path, "reason": self.reason,
                "kept": a.kept, "removed": self.removed, "would_remove": not a.kept,
                "bytes": a.total_size}

    def line(self, dry_run: bool) -> str:
        if self.archive.kept:
            what = "kept (read-only)"
        elif dry_run:
            what = "would remove"
        else:
            what = "removed" if self.removed else "in use, left"
        return (f"{what}: {self.archive.stem} ({self.reason}, "
                f"{human_size(self.archive.total_size)})")


def prune(store: Cache, views: list[EntryView], now: float,
          dry_run: bool) -> list[PruneItem]:
    """Remove expired and orphaned entries but kept ones (nothing with ``dry_run``).

    Expired ones go through Cache.expire, as create's expiry; orphans
    through Cache.remove: both under the key's lock, leaving one in use.
    """
    doomed = [v for v in views if v.expired or v.orphan]
    expired_now = [] if dry_run else store.expire(now)
    items = []
    for view in doomed:
        a = view.archive
        if view.expired:
            reason, removed = "expired", a.path in expired_now
        else:
            reason = "orphan"
            removed = not (dry_run or a.kept) and store.remove(
                a.path, "no variant uses it (orphan)")
        items.append(PruneItem(a, reason, removed))
    return items


def run_prune(args: argparse.Namespace, ctx: Context) -> int:
    # A variant whose settings cannot be read raises here: without its keys,
    # its entries would look orphaned.
    keys = all_variant_keys(ctx.paths)
    store = Cache(ctx.paths.cache_dir, clean_days=clean_days(keys))
    now = ctx.now()
    items = prune(store, entry_views(store, keys, now), now, args.dry_run)
    if args.json:
        ctx.emit_json([i.as_json() for i in items])
    else:
        for item in items:
            ctx.out.write(item.line(args.dry_run) + "\n")
        if not items:
            ctx.out.write("Nothing to prune.\n")
    return 0


# --- push, and what it runs on the other nodes ---------------------------------------

@dataclass
class PushResult:
    """One entry sent to one node, and what became of it."""

    entry: str
    node: str
    variants: str
    status: str = ""  # pushed, up to date, no entry, failed
    bytes: int = 0
    copy_seconds: float = 0.0  # gnt-cluster copyfile of the entry, all its nodes
    receive_seconds: float = 0.0
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.entry or self.variants} to {self.node}"

    def as_json(self) -> dict[str, Any]:
        return {"entry": self.entry, "node": self.node, "variants": self.variants,
                "status": self.status, "bytes": self.bytes,
                "copy_seconds": round(self.copy_seconds, 1),
                "receive_seconds": round(self.receive_seconds, 1),
                "error": self.error or None}

    def line(self) -> str:
        size = f" ({human_size(self.bytes)}, {self.copy_seconds:.0f} s)" \
            if self.status == "pushed" else ""
        error = f": {self.error.splitlines()[0]}" if self.error else ""
        return f"{self.node}: {self.status} {self.entry or self.variants}{size}{error}"


def variant_arguments(args: argparse.Namespace) -> list[str]:
    return ["--all"] if args.all else list(args.variants)


def chosen_nodes(args: argparse.Namespace, cluster: cache_push.ClusterView) -> list[str]:
    if not args.node:
        return list(cluster.nodes)
    unknown = [n for n in args.node if n not in cluster.nodes]
    if unknown:
        raise UsageError(f"Not an online node of this cluster other than the master: "
                         f"{', '.join(unknown)} (they are: "
                         f"{', '.join(cluster.nodes) or 'none'}).")
    return list(dict.fromkeys(args.node))


def check_node_keys(keys: list[VariantKey], outputs: dict[str, cache_push.NodeOutput],
                    program: str) -> dict[str, dict[str, Any]]:
    """Each node's entries; refuse (ClusterError) nodes whose keys differ from ours.

    An entry pushed to a node computing another key for the variant would
    never be used there: the node's settings (or its tools, architecture)
    differ from the master's.
    """
    ours = {k.label: k.key.stem for k in keys}
    problems, entries = [], {}
    for node, out in outputs.items():
        report_ = out.report()
        if report_ is None or out.status != 0:
            problems.append(f"{node} could not tell its keys ({program} key exited "
                            f"with {out.status}: {out.tail()})")
            continue
        if not report_.get("cache_dir_exists"):
            problems.append(f"{node} has no cache directory {report_.get('cache_dir')} "
                            f"(is ganeti-instance-debootstrap installed there?)")
            continue
        theirs = report_.get("keys") or {}
        differ = [f"{label}: {theirs.get(label) or 'no cache'} instead of {stem}"
                  for label, stem in ours.items() if theirs.get(label) != stem]
        if differ:
            problems.append(f"{node} would use other entries ({'; '.join(differ)})")
        entries[node] = report_.get("entries") or {}
    if problems:
        raise ClusterError(
            "Not pushing: " + "; ".join(problems) + ". An entry is used only by "
            "nodes that compute the same key for the variant: make the settings "
            "(defaults file, variant files), the bootstrap tool and the architecture "
            "the same on every node (or leave the differing nodes out with -n), "
            "then push again.")
    return entries


def push_entry(store: Cache, k: VariantKey, labels: str, nodes: list[str],
               node_entries: dict[str, dict[str, Any]], ctx: Context,
               results: list[PushResult]) -> None:
    """Send ``k``'s entry to the nodes that lack it as it is here."""
    stem = k.key.stem
    mine = [PushResult(stem, n, labels) for n in nodes]
    results.extend(mine)
    with store.using(k.key, lambda: store.peek(k.key)) as use:
        if use.found is None:
            for r in mine:
                r.status, r.error = "failed", (
                    f"the entry {stem} is not complete here: make it with "
                    f"'{PROGRAM} build' first")
            return
        entry = use.found
        fstypes = cache_push.usable_images(entry, store)
        mine_stat = cache_push.node_entries(store).get(stem)
        targets = []
        for r in mine:
            theirs = node_entries.get(r.node, {}).get(stem)
            if theirs and mine_stat and all(theirs.get(f) == mine_stat.get(f)
                                            for f in ("size", "mtime_ns")) \
                    and set(fstypes) <= set(theirs.get("images", ())):
                r.status = "up to date"
            else:
                targets.append(r)
        if not targets:
            return
        with cache_push.outgoing(store, entry, fstypes) as sending:
            names = [r.node for r in targets]
            start = time.monotonic()
            cache_push.copy_to_nodes(sending, names, ctx.terminal)
            copied = time.monotonic() - start
            outputs = cache_push.run_on_nodes(
                names, [ctx.program, "receive", sending.manifest])
        for r in targets:
            r.copy_seconds, r.bytes = copied, sending.size
            out = outputs[r.node]
            got = out.report()
            if got is not None and got.get("status") == "received" and out.status == 0:
                r.status = "pushed"
                r.receive_seconds = float(got.get("seconds") or 0.0)
            else:
                r.status = "failed"
                r.error = (got or {}).get("error") or (
                    f"{PROGRAM} receive exited with {out.status}: {out.tail()}")
        logger.info("%s: %s to %s in %.0f s", stem, human_size(sending.size),
                    ", ".join(names), copied)


def run_push(args: argparse.Namespace, ctx: Context) -> int:
    variants = chosen_variants(args, ctx.paths)
    keys = [k for v in variants for k in variant_keys(ctx.paths, v)]
    cluster = cache_push.find_cluster(ctx.myself(), PROGRAM)
    nodes = chosen_nodes(args, cluster)
    if not nodes:
        if args.json:
            ctx.emit_json([])
        else:
            ctx.out.write("No other online node in the cluster: nothing to push.\n")
        return 0
    store = Cache(ctx.paths.cache_dir)
    present = {a.stem for a in store.archives()}
    # Only the keys of entries there are to push count: a boot loader's key
    # that no instance here used says nothing about what a node would use.
    sent = [k for k in keys if k.key.stem in present]
    node_entries: dict[str, dict[str, Any]] = {}
    if sent:
        with progress.status(ctx.terminal, "asking the nodes for their keys"):
            outputs = cache_push.run_on_nodes(
                nodes, [ctx.program, "key", *variant_arguments(args)])
        node_entries = check_node_keys(sent, outputs, ctx.program)
    results: list[PushResult] = []
    by_stem: dict[str, list[VariantKey]] = {}
    for k in keys:
        by_stem.setdefault(k.key.stem, []).append(k)
    for stem, same in by_stem.items():
        labels = ", ".join(k.label for k in same)
        if stem not in present:
            if all(k.bootloader for k in same):
                continue  # no instance was made with that boot loader
            for node in nodes:
                r = PushResult(stem, node, labels, "no entry")
                if not args.all:
                    r.status, r.error = "failed", (
                        f"there is no cache entry for {labels} here: make it with "
                        f"'{PROGRAM} build {same[0].variant}' first")
                results.append(r)
            continue
        push_entry(store, same[0], labels, nodes, node_entries, ctx, results)
    report(args, ctx, results, "Pushing",
           "the nodes keep what they had; push again once fixed")
    return 0


def run_key(args: argparse.Namespace, ctx: Context) -> int:
    """(hidden, run on the nodes by push) This node's keys and entries, one JSON line."""
    variants = chosen_variants(args, ctx.paths)
    labels = {k.label: k.key.stem for v in variants for k in variant_keys(ctx.paths, v)}
    ctx.out.write(cache_push.print_report(
        cache_push.key_report(labels, Cache(ctx.paths.cache_dir))))
    return 0


def run_receive(args: argparse.Namespace, ctx: Context) -> int:
    """(hidden, run on the nodes by push) Put a pushed entry in place; one JSON line."""
    try:
        result = cache_push.receive(Cache(ctx.paths.cache_dir), args.manifest)
    except DefinitionError as exc:
        ctx.out.write(cache_push.print_report(
            {"entry": os.path.basename(args.manifest), "status": "failed",
             "error": str(exc)}))
        raise
    ctx.out.write(cache_push.print_report(result))
    return 0


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], int]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="variants to build (as listed in variants.list)")
    parser.add_argument("--all", action="store_true", help="every published variant")
    parser.add_argument("-O", "--os-parameters", metavar="NAME=VALUE[,...]",
                        help="OS parameters the instances will have, as for "
                             "gnt-instance add -O (bootloader changes the "
                             "entry; filesystem the image's type)")


def _refresh_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="variants whose entries to refresh (as listed in "
                             "variants.list)")
    parser.add_argument("--all", action="store_true",
                        help="every published variant; those without an entry "
                             "are skipped")
    parser.add_argument("--sources", metavar="FILE",
                        help="upgrade from the APT sources in FILE (one-line "
                             "sources.list(5) format: a site's staging mirror) "
                             "instead of the instances' own")


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="say what would be removed, remove nothing")


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="variants whose entries to push (as listed in variants.list)")
    parser.add_argument("--all", action="store_true",
                        help="every published variant; those without an entry "
                             "are skipped")
    parser.add_argument("-n", "--node", action="append", default=[], metavar="NODE",
                        help="push to this node only (repeat for several; "
                             "default: every online node but the master)")


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("variants", nargs="*", metavar="VARIANT")
    parser.add_argument("--all", action="store_true")


def _receive_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST")


COMMANDS: tuple[Subcommand, ...] = (
    Subcommand("list", "show every cache entry",
               "Show every cache entry: its inputs, the variants whose creates "
               "use it, age, last refresh, size, filesystem images and whether "
               "it is kept (its archive read-only); entries no variant uses "
               "are orphans.", _no_arguments, run_list),
    Subcommand("build", "make the cache of variants now",
               "Make the cache entry (and, with CACHE_IMAGE=yes, its filesystem "
               "image) of each named variant now, as create would, so that the "
               "first create is warm. A complete entry is reported and left "
               "alone.", _build_arguments, run_build),
    Subcommand("refresh", "bring entries' packages up to date from the mirror",
               "Upgrade the packages of each named variant's cache entries "
               "(every boot loader's) from the mirror, security and updates "
               "archives included (or from --sources), without a new bootstrap: a "
               "copy is upgraded, checked and swapped in for the old archive "
               "and images; creates running meanwhile use the old entry; a "
               "failed refresh leaves the entry as it was. A refreshed entry "
               "counts as new for CLEAN_CACHE.",
               _refresh_arguments, run_refresh),
    Subcommand("prune", "remove expired and orphaned entries",
               "Remove entries older than CLEAN_CACHE (the shortest among the "
               "variants using the cache) and entries no variant uses, except kept ones "
               "(archive without owner write permission: chmod u-w) and ones "
               "in use.", _prune_arguments, run_prune),
    Subcommand("push", "copy entries to the other nodes of the Ganeti cluster",
               "On the master of a Ganeti cluster: copy each named variant's "
               "cache entry (archive, record and filesystem images) to the other "
               "online nodes with gnt-cluster copyfile, so that their creates "
               "use it as if they had made it. Refused unless run on the "
               "master, and when a node's settings give another cache key for "
               "a variant. Nodes that hold the entry as it is here are left "
               "alone. Each node puts the entry in place under its lock, "
               "checked against the master's sizes and SHA-256 sums: its "
               "creates see the old entry or the whole new one.",
               _push_arguments, run_push),
    # Hidden: what push runs on the other nodes through gnt-cluster command.
    Subcommand("key", "", "This node's cache keys for the variants and its "
               "entries, as one JSON line (run by push on the other nodes).",
               _key_arguments, run_key),
    Subcommand("receive", "", "Put a cache entry pushed from the master in place "
               "(run by push on the other nodes).", _receive_arguments, run_receive),
)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout")
    common.add_argument("-d", "--debug", action="store_true",
                        help="log every command run")
    top = argparse.ArgumentParser(
        prog=PROGRAM, description="The bootstrap cache of the Ganeti OS definition "
                                  "debootstrap, on this node.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        # An empty help hides the subcommand (push's helpers on the nodes).
        if cmd.help:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                               parents=[common])
        else:
            p = sub.add_parser(cmd.name, description=cmd.description, parents=[common])
        cmd.arguments(p)
        p.set_defaults(handler=cmd.run)
    return top


def refuse_early(paths: Paths, euid: int) -> None:
    """Refuse a user other than root and a cache directory others can change."""
    if euid != 0:
        raise UsageError(f"{PROGRAM} must run as root: the cache, the settings and "
                         f"the bootstrap are root's (run it with sudo).")
    cache.check_trusted(paths.cache_dir)


def main(common: object, argv: Sequence[str] | None = None, *,
         paths: Paths | None = None, euid: int | None = None,
         out: IO[str] | None = None, program: str | None = None,
         myself: Callable[[], set[str]] | None = None) -> int:
    """Run the command; return the exit status.

    ``common`` is the installation's generated module; ``paths``, ``euid``,
    ``out``, ``program`` (this command's path) and ``myself`` (this node's
    names) replace what it and the process give (tests).
    """
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    log.setup(args.debug)
    signals.install()
    paths = paths if paths is not None else from_installed(common)
    what = f"{PROGRAM} {args.command}"
    try:
        refuse_early(paths, os.geteuid() if euid is None else euid)
        with progress.terminal_stderr() as term:
            ctx = Context(paths, out if out is not None else sys.stdout, term,
                          program=program or os.path.abspath(sys.argv[0]),
                          myself=myself or cache_push.this_node_names)
            return int(args.handler(args, ctx))
    except BrokenPipeError:
        # The reader of stdout went away (| head): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except UsageError as exc:
        log.final_error(what, str(exc))
        return EXIT_USAGE
    except DefinitionError as exc:
        if args.debug:
            traceback.print_exc()
        log.final_error(what, str(exc))
        return exc.exit_status
    except Interrupted as exc:
        log.final_error(what, f"Stopped: {exc}. What it had started was released; "
                              f"run it again when ready.")
        return 128 + exc.signum
    except Exception:
        traceback.print_exc()
        log.final_error(what, "Internal error (the traceback above). Please report it.")
        return 70
