"""The benchmark from start to end: set up, run the scenarios, report, clean up."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from . import (backup, backup_kinds, cold, devices, ganeti, install, machine, memory,
               parallel, procs, refresh, roottypes, startup, warm)
from .context import GIB, Bench, archive_from_log, bootstrapped
from .options import Options, parse_args
from .procs import BenchError, Interrupted
from .stats import Failure, phase_times

EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 3
WARMUP_DISK_BYTES = 2 * GIB


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _source_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _given_cache_dir(localstatedir: str) -> str:
    """The cache directory of ``--cache`` (a localstatedir, or the directory itself)."""
    for candidate in (os.path.join(localstatedir, "cache", install.PACKAGE), localstatedir):
        if glob.glob(os.path.join(candidate, "cache-*.tar")):
            return candidate
    raise BenchError(f"--cache {localstatedir}: neither it nor its cache/{install.PACKAGE} "
                     f"holds a cache archive (cache-*.tar)")


def _link_cache(source: str, dest: str) -> list[str]:
    """Hard-link (or copy, keeping times) the archives and their records."""
    linked = []
    for path in sorted(glob.glob(os.path.join(source, "cache-*.tar")) +
                       glob.glob(os.path.join(source, "cache-*.inputs.json"))):
        target = os.path.join(dest, os.path.basename(path))
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        linked.append(os.path.basename(path))
    return linked


def _setup(bench: Bench) -> None:
    """The installation's settings, the warm cache, and the warm-up creates."""
    opts = bench.options
    install.configure_settings(bench.inst)
    bench.inst.add_variant(cold.DEBOOTSTRAP_VARIANT, 'BOOTSTRAP_TOOL="debootstrap"\n')
    os.makedirs(bench.warm_cache)
    if opts.cache:
        source = _given_cache_dir(opts.cache)
        names = _link_cache(source, bench.warm_cache)
        bench.say(f"warm cache: linked from {source}: {', '.join(names)}")
    bench.restore_warm_cache()
    if set(opts.scenarios) <= {"cold"}:
        return
    # Until a create copies the cache's image: the first may bootstrap (no
    # usable cache), the next one makes the image, the last only copies it.
    for attempt in range(1, 4):
        disk = bench.fresh_disk("warmup.img", WARMUP_DISK_BYTES)
        result = bench.ours_create(disk, "warmup.example.org", f"setup-warmup-{attempt}")
        text = result.log_text()
        image = phase_times(text).get("filesystem image")
        if bootstrapped(text):
            what = "bootstrapped and stored the cache (no usable cache given)"
        elif "Made the filesystem image" in text:
            what = f"made the cache's ext4 filesystem image in {image:.2f} s"
        else:
            what = "copied the image"
        bench.say(f"warm-up create {attempt}: {result.seconds:.2f} s: {what}")
        archive = archive_from_log(text)
        if archive:
            bench.archive = os.path.realpath(archive)
        if not bootstrapped(text) and "Made the filesystem image" not in text:
            break
    if not bench.archive:
        raise BenchError("the warm-up creates name no cache archive in their logs")
    bench.say(f"warm cache archive: {bench.archive} "
              f"({os.path.getsize(bench.archive) / 2**20:.0f} MiB)")


def _scenario(bench: Bench, name: str) -> None:
    from ganeti_debootstrap.settings import DEFAULT_SUITE
    if name == "warm":
        warm.run(bench)
    elif name == "roottypes":
        roottypes.run(bench)
    elif name == "cold":
        cold.run(bench, DEFAULT_SUITE)
    elif name == "refresh":
        refresh.run(bench)
    elif name == "startup":
        startup.run(bench)
    elif name == "parallel":
        parallel.run(bench)
    elif name == "memory":
        memory.run(bench)
    elif name == "backup":
        backup.run(bench)
    elif name == "ganeti":
        ganeti.run(bench)
    elif name == "backup-kinds":
        backup_kinds.run(bench)


def _check_nothing_left(bench: Bench, after: str) -> None:
    """Our scripts must release everything: a leftover is a finding."""
    released = devices.release([bench.workdir])
    if released:
        bench.verdicts.append(Failure(after, "left behind (now released): "
                                             + "; ".join(released)))
        bench.say("  " + bench.verdicts[-1].line())


def _summary(bench: Bench) -> int:
    bench.say("== summary ==")
    for verdict in bench.verdicts:
        bench.say(("  " if verdict.passed else "! ") + f"[{verdict.scenario}] "
                  + verdict.line())
    failed = sum(not v.passed for v in bench.verdicts)
    bench.say(f"  {len(bench.verdicts) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed else EXIT_PASSED


def _cleanup(bench_dir: str, keep: bool) -> list[str]:
    """Stop what runs, release devices, remove the scratch dir; say what was done."""
    lines = []
    procs.stop_all()
    if procs.stopped:
        lines.append("stopped (SIGTERM to each process group): " + ", ".join(procs.stopped))
    released = devices.release([bench_dir])
    if released:
        lines.append("released: " + ", ".join(released))
    points, loops = devices.leftovers([bench_dir])
    if points or loops:
        lines.append(f"STILL THERE (release by hand): mounts {points}, loop devices {loops}")
        lines.append(f"kept {bench_dir} (something is still mounted from it)")
    elif keep:
        lines.append(f"kept {bench_dir} (--keep)")
    else:
        shutil.rmtree(bench_dir, ignore_errors=True)
        lines.append(f"removed {bench_dir}")
    if not points and not loops:
        lines.append("no loop device or mount of the benchmark is left")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    opts: Options = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench/run must run as root: the scripts attach loop devices, make "
              "filesystems and mount them, as Ganeti runs them. Run: sudo bench/run",
              file=sys.stderr)
        return EXIT_ERROR
    source_root = _source_root()
    sys.path.insert(0, source_root)  # ganeti_debootstrap: the default suite
    os.makedirs(opts.workdir, exist_ok=True)
    bench_dir = tempfile.mkdtemp(prefix="gidb-bench.", dir=opts.workdir)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    began = time.monotonic()
    status = EXIT_ERROR
    bench: Bench | None = None
    print(f"ganeti-instance-debootstrap benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
          flush=True)
    print(f"command: bench/run {shlex.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    print(f"scenarios: {','.join(opts.scenarios)}; runs {opts.runs}, cold runs "
          f"{opts.cold_runs}; scripts: {opts.entry}", flush=True)
    print(f"source: {install.source_state(source_root)}", flush=True)
    print(f"load average before: {machine.loadavg()}", flush=True)
    try:
        start = time.monotonic()
        if opts.entry == "source":
            inst = install.source_tree(source_root, os.path.join(bench_dir, "tree"))
            print("scripts: from the source tree through tests/launch.py", flush=True)
        else:
            inst = install.install(source_root, os.path.join(bench_dir, "install"),
                                   os.path.join(bench_dir, "build.log"))
            print(f"scripts: make install into {bench_dir}/install/inst "
                  f"({time.monotonic() - start:.1f} s); OS dir {inst.os_dir}", flush=True)
        bench = Bench(opts, source_root, bench_dir, inst,
                      os.path.join(bench_dir, "caches", "warm"))
        _setup(bench)
        for name in opts.scenarios:
            bench.say(f"\n== {name} ==")
            scenario_start = time.monotonic()
            try:
                _scenario(bench, name)
            except BenchError as err:
                bench.verdicts.append(Failure(name, str(err)))
                bench.say("  " + bench.verdicts[-1].line())
                bench.restore_warm_cache()
            _check_nothing_left(bench, name)
            bench.say(f"  ({name}: {time.monotonic() - scenario_start:.0f} s, load "
                      f"average {machine.loadavg()})")
        bench.say()
        status = _summary(bench)
    except Interrupted as exc:
        print(f"\nbench/run: {exc}; stopping the running commands and cleaning up",
              file=sys.stderr, flush=True)
        status = 128 + exc.signum
    except BenchError as err:
        print(f"bench/run: {err}", file=sys.stderr, flush=True)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cleanup_lines = _cleanup(bench_dir, opts.keep)
    print("\n== clean-up ==")
    for line in cleanup_lines:
        print("  " + line)
    print("== machine ==")
    for line in machine.describe(opts.workdir):
        print("  " + line)
    print(f"  load average after: {machine.loadavg()}")
    print(f"  total time: {time.monotonic() - began:.0f} s", flush=True)
    return status
