"""Refreshing a cache entry: nothing to upgrade, and one package to upgrade.

Target: each takes at most 0.3 of a cold create of the same variant (the
default): the median of the cold scenario when it ran in this invocation,
else cold creates made here (--cold-runs of them).

Each round copies the warm cache's entry (archive, record, ext4 image)
into a cache directory of its own and runs the installed
``ganeti-debootstrap-cache refresh default --sources FILE --json`` twice
against a flat APT repository served on 127.0.0.1 from the scratch
directory: it holds the entry's nano at a higher version, so the first
refresh upgrades one package (and writes the new archive and image) and the
second finds nothing to upgrade. Each run's JSON report must say so. The
mirror is local on purpose: what is measured is the refresh's own work,
not the download of a distribution's package lists, which depends on the
mirror and the network (that part of a real refresh is ``apt-get update``).
"""

from __future__ import annotations

import json
import os
import shutil

from tests.root.aptrepo import archive_status, make_repository, served, version_in

from . import cold, install, procs, stats
from .context import Bench
from .procs import BenchError
from .stats import Verdict

NAME = "refresh"
TARGET = 0.3
PACKAGE = "nano"
BUMP = "+gidbbench1"
IMAGE_TYPE = "ext4"
LABELS = ("one package to upgrade", "nothing to upgrade")


def installed_version(archive: str, package: str) -> str:
    """``package``'s installed version in a cache archive (its dpkg status)."""
    try:
        return version_in(archive_status(archive), package)
    except AssertionError:
        raise BenchError(f"{package} is not installed in the cache {archive}: the refresh "
                         f"scenario upgrades it") from None


def entry_copy(bench: Bench, name: str) -> str:
    """A cache directory (the cache link points at it) holding a copy of the warm
    entry: archive, record and ext4 image with its record."""
    directory = bench.fresh_cache(name)
    stem = os.path.basename(bench.archive)[:-len(".tar")]
    copied = []
    for suffix in (".tar", ".inputs.json", f".{IMAGE_TYPE}.img", f".{IMAGE_TYPE}.img.json"):
        source = os.path.join(os.path.dirname(bench.archive), stem + suffix)
        if os.path.exists(source):
            shutil.copy2(source, os.path.join(directory, stem + suffix))
            copied.append(suffix)
    if f".{IMAGE_TYPE}.img" not in copied:
        raise BenchError(f"the warm cache has no {IMAGE_TYPE} image of {bench.archive} "
                         f"to refresh")
    return directory


def _refresh(bench: Bench, listing: str, log_name: str,
             expect: str) -> tuple[procs.Result, dict[str, object]]:
    """One run of the installed command; its result and its JSON report."""
    out_path = bench.path("refresh-report.json")
    with open(out_path, "wb") as out:
        result = procs.run(bench.inst.admin_argv("refresh", "default", "--sources",
                                                 listing, "--json"),
                           env=install.ganeti_env(), log_path=bench.log_path(log_name),
                           cwd=bench.inst.os_dir, umask=0o077, stdout=out)
    with open(out_path, encoding="utf-8") as f:
        [report] = json.load(f)
    if report.get("status") != expect:
        raise BenchError(f"the refresh (log {result.log_path}) reported "
                         f"{report.get('status')!r}, not {expect!r}: {report}")
    return result, report


def _cold_reference(bench: Bench) -> tuple[float, str]:
    """The median cold create of the default variant, and where it came from."""
    if "cold ours" in bench.medians:
        return bench.medians["cold ours"], "median of the cold scenario above"
    times = []
    for run_no in range(bench.options.cold_runs):
        bench.quiesce()
        result, _ = cold._ours(bench, "ours", f"refresh-cold-{run_no + 1}")
        times.append(result.seconds)
        bench.say(f"  cold create {run_no + 1}/{bench.options.cold_runs}  "
                  f"{stats.seconds(result.seconds)} s")
    return stats.median(times), f"median of {len(times)} cold create(s) made here"


def run(bench: Bench) -> None:
    runs = bench.options.runs
    old = installed_version(bench.archive, PACKAGE)
    new = old + BUMP
    bench.say(f"Ours: the installed ganeti-debootstrap-cache refresh default --sources "
              f"FILE, on a copy of the warm entry (archive {os.path.getsize(bench.archive) >> 20}"
              f" MiB and its {IMAGE_TYPE} image) per round, against a flat repository on "
              f"127.0.0.1 holding {PACKAGE} {new} (the entry has {old}): first one "
              f"package to upgrade, then nothing. Reference: a cold create of the same "
              f"variant. Runs: {runs}.")
    repo_dir = bench.path("refresh-repo")
    bench.remove_tree(repo_dir)
    os.makedirs(repo_dir)
    times: dict[str, list[float]] = {label: [] for label in LABELS}
    phases: dict[str, list[dict[str, float]]] = {label: [] for label in LABELS}
    try:
        make_repository(repo_dir, PACKAGE, new)
        repo = os.path.join(repo_dir, "repo")
        listing = os.path.join(repo_dir, "staging.list")
        with served(repo) as url:
            with open(listing, "w") as f:
                f.write(f"deb [trusted=yes] {url} ./\n")
            for run_no in range(runs):
                cache = entry_copy(bench, "refresh")
                try:
                    for label, expect in zip(LABELS, ("upgraded", "up to date")):
                        bench.quiesce()
                        log_name = f"refresh-{run_no + 1}-{label.split()[0]}"
                        result, report = _refresh(bench, listing, log_name, expect)
                        if expect == "upgraded" and report.get("upgraded") != [
                                {"package": PACKAGE, "old": old, "new": new}]:
                            raise BenchError(f"the refresh upgraded {report.get('upgraded')}, "
                                             f"not only {PACKAGE} {old} -> {new}")
                        times[label].append(result.seconds)
                        phases[label].append(stats.phase_times(result.log_text()))
                        bench.say(f"  run {run_no + 1}/{runs} {label:24}  "
                                  f"{stats.seconds(result.seconds)} s")
                finally:
                    bench.restore_warm_cache()
                    bench.discard(cache)
    finally:
        bench.discard(repo_dir)
    reference, source = _cold_reference(bench)
    rows = [[label, stats.seconds(stats.median(times[label]))] +
            [", ".join(f"{name.removeprefix('refresh: ')} {value:.2f}"
                       for name, value in stats.median_phases(phases[label]).items())]
            for label in LABELS]
    rows.append(["cold create (reference)", stats.seconds(reference), source])
    for line in stats.table(["refresh", "median (s)", "phases (median s)"], rows):
        bench.say("  " + line)
    for label in LABELS:
        verdict = Verdict(NAME, f"refresh, {label} / cold create",
                          stats.ratio(stats.median(times[label]), reference), TARGET,
                          note="local mirror on 127.0.0.1")
        bench.verdicts.append(verdict)
        bench.say("  " + verdict.line())

