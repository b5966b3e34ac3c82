"""The benchmark's command line, parsed into a frozen :class:`Options`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

# In the order they run: parallel compares with the warm median
# measured before it in the same invocation.
SCENARIOS = ("warm", "roottypes", "cold", "refresh", "startup", "parallel", "memory",
             "backup", "backup-kinds", "ganeti")
# Scenarios that need the mirror (minutes each): --quick skips them.
# (refresh compares with the cold median, and makes its own without cold.)
COLD_SCENARIOS = ("cold", "refresh", "parallel", "ganeti")

DEFAULT_RUNS = 5
QUICK_RUNS = 3
DEFAULT_COLD_RUNS = 3
QUICK_COLD_RUNS = 1
DEFAULT_WORKDIR = "/var/tmp"

DESCRIPTION = """\
Measure ganeti-instance-debootstrap against its performance targets: warm
create vs the shell edition's way (<= 0.33) and vs the disk's floor (writing
the same bytes directly; idle disk and busy with a concurrent writer),
data a warm create writes on 2, 20 and 128 GiB disks (<= 1.1x the
image's data), warm creates on XFS and Btrfs sharing the image's blocks
(<= 0.2 s), warm create of an XFS and a Btrfs root vs an ext4 root
(<= 1.5 each), cold create vs debootstrap
(<= 0.5), refreshing a cache entry from a loopback mirror with nothing and
with one package to upgrade (each <= 0.3 of a cold create), each
script's start-up (< 0.1 s), four parallel creates on a cold node
(<= cold + 3 warm), peak memory of a create (< 100 MiB, the same for 2
and 20 GiB disks), export and import against dump and restore by hand,
export and import of an ext4, XFS and Btrfs data disk vs dump/restore or
tar by hand (<= 1.1),
and gnt-instance add, gnt-backup export and import through a test Ganeti
cluster against Debian's shell edition. Runs as root; everything lives in a scratch
directory that is removed at the end, with every loop device and mount
released, also on Ctrl-C."""


@dataclass(frozen=True)
class Options:
    """What one invocation of the benchmark measures, and where."""

    scenarios: tuple[str, ...] = SCENARIOS
    runs: int = DEFAULT_RUNS
    cold_runs: int = DEFAULT_COLD_RUNS
    quick: bool = False
    workdir: str = DEFAULT_WORKDIR
    cache: str | None = None
    entry: str = "installed"
    keep: bool = False


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _scenarios(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(SCENARIOS)}")
    # Always in the canonical order, once each.
    return tuple(s for s in SCENARIOS if s in names)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"fewer runs ({QUICK_RUNS}) and no scenario that "
                        f"needs the mirror ({', '.join(COLD_SCENARIOS)}) "
                        f"unless --scenarios names it")
    p.add_argument("--runs", type=_positive, metavar="N",
                   help=f"runs of each side in warm, startup and memory "
                        f"(default {DEFAULT_RUNS}, quick {QUICK_RUNS})")
    p.add_argument("--cold-runs", type=_positive, metavar="N",
                   help=f"runs of each side in cold, 15-50 s each (default "
                        f"{DEFAULT_COLD_RUNS}, quick {QUICK_COLD_RUNS})")
    p.add_argument("--scenarios", type=_scenarios, metavar="LIST",
                   help=f"comma-separated, from {','.join(SCENARIOS)} (default: all; "
                        f"quick: without {','.join(COLD_SCENARIOS)})")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, metavar="DIR",
                   help="a scratch directory is made (and removed) inside DIR "
                        "(default %(default)s; disks are sparse files)")
    p.add_argument("--cache", metavar="DIR",
                   help="an existing localstatedir whose cache/ganeti-instance-"
                        "debootstrap holds a bootstrap cache to reuse (linked, "
                        "never modified) instead of bootstrapping once")
    p.add_argument("--source-tree", dest="entry", action="store_const",
                   const="source", default="installed",
                   help="run the scripts from the source tree through "
                        "tests/launch.py instead of a scratch 'make install'")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (logs, installation) at the end")
    return p


def parse_args(argv: Sequence[str]) -> Options:
    """Parse the command line; argparse exits with status 2 on a usage error."""
    args = parser().parse_args(list(argv))
    quick = bool(args.quick)
    if args.scenarios is not None:
        scenarios = args.scenarios
    elif quick:
        scenarios = tuple(s for s in SCENARIOS if s not in COLD_SCENARIOS)
    else:
        scenarios = SCENARIOS
    runs = args.runs or (QUICK_RUNS if quick else DEFAULT_RUNS)
    cold_runs = args.cold_runs or (QUICK_COLD_RUNS if quick else DEFAULT_COLD_RUNS)
    return Options(scenarios=scenarios, runs=runs, cold_runs=cold_runs, quick=quick,
                   workdir=args.workdir, cache=args.cache, entry=args.entry,
                   keep=bool(args.keep))
