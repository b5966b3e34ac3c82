"""What the Ganeti cluster tests share (test_ganeti.py, test_ganeti_two_nodes.py):
the Debian package built from this tree, unpacked, and the checks of an
instance's disk made from the node, read-only."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ganeti_debootstrap.runner import output, run
from tests.debpackage import BuiltPackage
from tests.root.ganeti_cluster import PACKAGE_OS_PARENT

OS_NAME = "debootstrap"
OS_PATH = f"{PACKAGE_OS_PARENT}/{OS_NAME}"
VARIANTS_LIST = "/etc/ganeti/instance-debootstrap/variants.list"
CLUSTER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SECTOR = 512
# PARTITION_STYLE=msdos and PARTITION_ALIGNMENT=2048 are the defaults.
DEFAULT_ALIGNMENT = 2048


@dataclass(frozen=True)
class RootFilesystem:
    """What the node sees in partition 1 of an instance's disk."""

    partition_start: int  # in sectors
    bootable: bool
    fstype: str
    uuid: str
    hostname: str
    mailname: str | None
    fstab_root: tuple[str, str] | None  # (device field, type field) of "/"
    debian_version: str
    files: tuple[str, ...] = ()  # the text of the files inspect_disk was asked for


class Scenario:
    """Which steps passed, and what they left for the next ones."""

    def __init__(self) -> None:
        self.passed: set[str] = set()
        self.disks: dict[str, RootFilesystem] = {}

    def require(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.passed]
        if missing:
            pytest.fail(f"needs the earlier step(s) {', '.join(missing)}, which "
                        f"did not pass (see above)", pytrace=False)


@contextlib.contextmanager
def released_by(argv: Sequence[str]) -> Iterator[None]:
    """Run argv when the block ends; its failure never hides the block's own."""
    try:
        yield
    except BaseException:
        run(argv, check=False)
        raise
    run(argv)


def fstab_root(fstab: str) -> tuple[str, str] | None:
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#") and fields[1] == "/":
            return fields[0], fields[2]
    return None


def inspect_disk(disk: Path, mountpoint: Path, read: Sequence[str] = ()) -> RootFilesystem:
    """Mount partition 1 of ``disk`` read-only and read what the tests check.

    ``read``: more files (paths inside the instance) whose text to return.
    """
    table = json.loads(output(["sfdisk", "--json", str(disk)]))["partitiontable"]
    assert table["label"] == "dos", f"{disk} has a {table['label']} table, not msdos"
    assert table.get("sectorsize", SECTOR) == SECTOR
    first = table["partitions"][0]
    mountpoint.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        loop = output(["losetup", "--find", "--show", "--read-only",
                       f"--offset={first['start'] * SECTOR}",
                       f"--sizelimit={first['size'] * SECTOR}", str(disk)])
        stack.enter_context(released_by(["losetup", "--detach", loop]))
        fstype = output(["blkid", "--probe", "--output", "value",
                         "--match-tag", "TYPE", loop])
        uuid = output(["blkid", "--probe", "--output", "value",
                       "--match-tag", "UUID", loop])
        run(["mount", "-o", "ro", "-t", fstype, loop, str(mountpoint)])
        stack.enter_context(released_by(["umount", str(mountpoint)]))
        mailname = mountpoint / "etc" / "mailname"
        found = RootFilesystem(
            partition_start=first["start"],
            bootable=bool(first.get("bootable")),
            fstype=fstype,
            uuid=uuid,
            hostname=(mountpoint / "etc" / "hostname").read_text().strip(),
            mailname=mailname.read_text().strip() if mailname.exists() else None,
            fstab_root=fstab_root((mountpoint / "etc" / "fstab").read_text()),
            debian_version=(mountpoint / "etc" / "debian_version").read_text().strip(),
            files=tuple((mountpoint / inner.lstrip("/")).read_text() for inner in read),
        )
    return found


def assert_instance_root(fs: RootFilesystem, name: str, fstype: str) -> None:
    """The checks every step repeats on an instance's root filesystem."""
    assert fs.partition_start == DEFAULT_ALIGNMENT
    assert fs.bootable, "partition 1 lacks the bootable flag"
    assert fs.fstype == fstype
    assert fs.hostname == name
    assert fs.fstab_root == (f"UUID={fs.uuid}", fstype)


def assert_no_warnings(proc: subprocess.CompletedProcess[str]) -> None:
    warnings = [line for line in proc.stdout.splitlines() if " - WARNING: " in line]
    assert not warnings, "Ganeti warned:\n" + "\n".join(warnings)


def variants(package_root: Path) -> list[str]:
    """The variants the package publishes (its /etc/ganeti/.../variants.list)."""
    lines = (package_root / VARIANTS_LIST.lstrip("/")).read_text().splitlines()
    return [v.strip() for v in lines if v.strip() and not v.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def package_root(tmp_path_factory: pytest.TempPathFactory,
                 built_package: BuiltPackage) -> Path:
    """The .deb built from this tree, unpacked as dpkg would install it."""
    start = time.monotonic()
    root = tmp_path_factory.mktemp("gidb-package") / "root"
    run(["dpkg-deb", "--extract", str(built_package.deb), str(root)])
    print(f"\npackage build {built_package.seconds:.1f} s (once per session), "
          f"dpkg-deb --extract {time.monotonic() - start:.1f} s")
    return root


@pytest.fixture(scope="module")
def os_dir(package_root: Path) -> Path:
    """The package's OS directory, seen from the node."""
    return package_root / OS_PATH.lstrip("/")
