"""A node's disks and kernel faked for unit tests of whole actions.

The composition tests run create, import, export and rename through their
real entry points with every external command answered by a
:class:`tests.fakes.FakeRunner`. The commands' effects that the code reads
back are kept here: which loop device is attached to what (a scratch
``/sys/block``), what is mounted where (a scratch mountinfo), the partition
table sfdisk wrote into a disk file, and the filesystems mke2fs made, each
with a directory holding its files: mount moves them onto the mount point,
umount moves them back.

The kernel's files are replaced through the seams the package has for this
(``blockdev.SYS_BLOCK``, ``mounts.MOUNTINFO``... and the ``_sleep`` of the
retry loops); nothing of the package's own logic is replaced.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ganeti_debootstrap import blockdev, mounts, procs, settings
from tests.fakes import FakeRunner

# The size of the instance disk the composition tests use (conftest's disk0).
DISK0_MIB = 1024

# A filesystem or partition table is where it is on its backing file.
Where = tuple[str, int]  # (real path of the file or device, byte offset)


@dataclass
class FakeFilesystem:
    fstype: str
    uuid: str
    files: Path  # its contents while it is not mounted


@dataclass
class FakeNode:
    """The node's state the fakes of losetup, mount, sfdisk, mke2fs... keep."""

    base: Path
    fake: FakeRunner
    loops: dict[str, Where] = field(default_factory=dict)  # /dev/loopN -> where
    tables: dict[Where, str] = field(default_factory=dict)  # -> the sfdisk script
    filesystems: dict[Where, FakeFilesystem] = field(default_factory=dict)
    mounted: dict[str, Where] = field(default_factory=dict)  # mount point -> where
    # The scripts' temporary directory (their mount points), if it is watched.
    tmpdir: Path | None = None

    @property
    def sys_block(self) -> Path:
        return self.base / "sys" / "block"

    @property
    def mountinfo(self) -> Path:
        return self.base / "mountinfo"

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point the package's kernel paths at the scratch ones; declare the commands."""
        self.sys_block.mkdir(parents=True)
        (self.base / "sys" / "dev" / "block").mkdir(parents=True)
        (self.base / "proc").mkdir()
        (self.base / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
        self.write_mountinfo()
        monkeypatch.setattr(blockdev, "SYS_BLOCK", str(self.sys_block))
        monkeypatch.setattr(blockdev, "SYS_DEV_BLOCK", str(self.base / "sys" / "dev" / "block"))
        monkeypatch.setattr(blockdev, "PROC_SWAPS", str(self.base / "swaps"))
        monkeypatch.setattr(blockdev, "_sleep", lambda seconds: None)
        monkeypatch.setattr(mounts, "MOUNTINFO", str(self.mountinfo))
        monkeypatch.setattr(procs, "PROC", str(self.base / "proc"))
        monkeypatch.setattr(mounts, "_sleep", lambda seconds: None)
        f = self.fake
        # The settings files are shell, read by the shell (settings.load):
        # really, not faked, and not part of the composition (not shown).
        f.expect(*settings.SHELL_COMMAND, real=True)
        f.expect("dpkg", "--print-architecture", stdout="amd64\n")
        f.expect("losetup", "--find", "--show", action=self.losetup, output=self.loop_name)
        f.expect("losetup", "--detach", action=self.detach)
        f.expect("wipefs", action=self.wipefs)
        f.expect("sfdisk", action=self.sfdisk)
        f.expect("sfdisk", "--json", output=self.sfdisk_json)
        f.expect("mke2fs", action=self.mkfs)
        f.expect("mkfs.xfs", action=self.mkfs)
        f.expect("mkfs.btrfs", action=self.mkfs)
        f.expect("mkswap", "-f", action=self.mkswap)
        f.expect("blkid", "-p", "-o", "value", "-s", output=self.blkid)
        f.expect("mount", action=self.mount)
        f.expect("umount", action=self.umount)
        f.expect("tar", "--create", action=self.tar_create)
        f.expect("tar", "--extract", action=self.tar_extract)
        f.expect("tar", "--list", output=self.tar_list)

    # --- where a device's bytes are ------------------------------------

    def where(self, dev: str) -> Where:
        if dev in self.loops:
            return self.loops[dev]
        return os.path.realpath(dev), 0

    def losetup(self, argv: Sequence[str]) -> None:
        offset = int(argv[argv.index("--offset") + 1]) if "--offset" in argv else 0
        backing, base = self.where(argv[-1])
        n = 0
        while f"/dev/loop{n}" in self.loops:
            n += 1
        dev = f"/dev/loop{n}"
        self.loops[dev] = (backing, base + offset)
        loop = self.sys_block / f"loop{n}" / "loop"
        loop.mkdir(parents=True)
        (loop / "backing_file").write_text(backing + "\n")
        (loop.parent / "dev").write_text(f"7:{n}\n")

    def loop_name(self, argv: Sequence[str]) -> str:
        return max(self.loops, key=lambda d: int(d.removeprefix("/dev/loop"))) + "\n"

    def detach(self, argv: Sequence[str]) -> None:
        dev = argv[-1]
        del self.loops[dev]
        shutil.rmtree(self.sys_block / os.path.basename(dev))

    # --- partition tables and filesystems -------------------------------

    def wipefs(self, argv: Sequence[str]) -> None:
        backing, offset = self.where(argv[-1])
        self.tables.pop((backing, offset), None)
        self.filesystems.pop((backing, offset), None)

    def sfdisk(self, argv: Sequence[str]) -> None:
        script = self.fake.stdins[-1]
        assert script is not None, "sfdisk without its script on stdin"
        self.tables[self.where(argv[-1])] = script.decode()

    def sfdisk_json(self, argv: Sequence[str]) -> str:
        """What ``sfdisk --json`` prints for the table sfdisk wrote."""
        script = self.tables[self.where(argv[-1])]
        label = script.split("label: ", 1)[1].split("\n", 1)[0]
        parts: list[str] = []
        for line in script.splitlines():
            if line.startswith("start="):
                fields = dict(f.strip().split("=") for f in line.split(",") if "=" in f)
                parts.append(f'{{"node": "{argv[-1]}p{len(parts) + 1}", '
                             f'"start": {fields["start"]}, "size": {fields["size"]}, '
                             f'"type": "{fields["type"]}"}}')
        return (f'{{"partitiontable": {{"label": "{label}", "device": "{argv[-1]}", '
                f'"unit": "sectors", "sectorsize": 512, '
                f'"partitions": [{", ".join(parts)}]}}}}\n')

    def make_filesystem(self, where: Where, fstype: str) -> FakeFilesystem:
        n = len(self.filesystems) + 1
        files = self.base / "filesystems" / f"fs{n}"
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir(parents=True)
        fs = FakeFilesystem(fstype, f"00000000-0000-4000-8000-{n:012d}", files)
        self.filesystems[where] = fs
        return fs

    def mkfs(self, argv: Sequence[str]) -> None:
        """mke2fs names the type with -t; mkfs.xfs and mkfs.btrfs in their names."""
        fstype = argv[argv.index("-t") + 1] if "-t" in argv else argv[0].split(".")[-1]
        self.make_filesystem(self.where(argv[-1]), fstype)

    def mkswap(self, argv: Sequence[str]) -> None:
        self.make_filesystem(self.where(argv[-1]), "swap")

    def blkid(self, argv: Sequence[str]) -> str:
        tag, where = argv[-2], self.where(argv[-1])
        fs = self.filesystems.get(where)
        if tag == "PTTYPE":
            script = self.tables.get(where)
            return script.split("label: ", 1)[1].split("\n", 1)[0] if script else ""
        if fs is None:
            return ""
        return {"TYPE": fs.fstype, "UUID": fs.uuid}.get(tag, "")

    # --- mounts ---------------------------------------------------------

    def write_mountinfo(self) -> None:
        lines = ["27 1 254:0 / / rw - ext4 /dev/vda rw"]
        for i, point in enumerate(self.mounted):
            lines.append(f"{100 + i} 27 7:{i} / {point} rw - ext4 /dev/fake{i} rw")
        self.mountinfo.write_text("\n".join(lines) + "\n")

    def mount(self, argv: Sequence[str]) -> None:
        """A filesystem's files move onto the mount point; proc, sysfs, a bind
        mount of the node's /dev and devpts are recorded, with no files."""
        source, point = argv[-2], os.path.realpath(argv[-1])
        where = self.where(source)
        fs = self.filesystems.get(where)
        if fs is not None:
            for name in os.listdir(fs.files):
                shutil.move(fs.files / name, os.path.join(point, name))
        self.mounted[point] = where
        self.write_mountinfo()

    def umount(self, argv: Sequence[str]) -> None:
        point = os.path.realpath(argv[-1])
        fs = self.filesystems.get(self.mounted.pop(point))
        if fs is not None:
            for name in os.listdir(point):
                shutil.move(os.path.join(point, name), fs.files / name)
        self.write_mountinfo()

    # --- archives (the bootstrap cache) ---------------------------------

    def tar_create(self, argv: Sequence[str]) -> None:
        """An archive of --directory's files, as tar writes it."""
        directory = argv[argv.index("--directory") + 1]
        with tarfile.open(argv[argv.index("--file") + 1], "w") as archive:
            archive.add(directory, arcname=".")

    def tar_extract(self, argv: Sequence[str]) -> None:
        with tarfile.open(argv[argv.index("--file") + 1]) as archive:
            # The archive is the one tar_create made of a test tree.
            archive.extractall(argv[argv.index("--directory") + 1])

    def tar_list(self, argv: Sequence[str]) -> str:
        with tarfile.open(argv[argv.index("--file") + 1]) as archive:
            return "".join(name + "\n" for name in archive.getnames())

    # --- for the tests' set-up and assertions ---------------------------

    def leftovers(self) -> list[str]:
        """What is still attached or mounted, and what is left in tmpdir."""
        left = [f"attached: {dev}" for dev in self.loops]
        left += [f"mounted: {point}" for point in self.mounted]
        if self.tmpdir is not None:
            left += [f"left in the temporary directory: {n}" for n in os.listdir(self.tmpdir)]
        return left

    def installed(self, disk: str, offset: int, size: int) -> Path:
        """``disk`` as create left it: an msdos table, one ext4 root at ``offset``.

        Returns the directory holding the root's files, to fill in.
        """
        sector = 512
        self.tables[(os.path.realpath(disk), 0)] = (
            "label: dos\nunit: sectors\n\n"
            f"start={offset // sector}, size={size // sector}, type=83, bootable\n")
        return self.make_filesystem((os.path.realpath(disk), offset), "ext4").files


    def root_files(self, disk: str, offset: int) -> Path:
        """The files of the filesystem at ``offset`` bytes into ``disk``."""
        return self.filesystems[(os.path.realpath(disk), offset)].files


def ganeti_env(disk: str, **variables: str) -> dict[str, str]:
    """The environment Ganeti gives the scripts (API 20, one disk, no NIC)."""
    env = {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "OS_API_VERSION": "20",
           "OS_NAME": "debootstrap", "OS_VARIANT": "default", "DEBUG_LEVEL": "0",
           "HYPERVISOR": "kvm", "INSTANCE_NAME": "web1.example.org",
           "DISK_COUNT": "1", "DISK_0_PATH": disk, "DISK_0_ACCESS": "rw",
           "NIC_COUNT": "0"}
    env.update(variables)
    return env


def undo(setup: Sequence[str], loops: Sequence[str]) -> list[str]:
    """The commands that release what the commands ``setup`` acquired, newest first.

    Each ``losetup --find`` attached the next of ``loops`` and is detached
    (unless ``setup`` detached it already), each mount is unmounted; the
    other commands leave nothing to release.
    """
    attached = iter(loops)
    released = []
    for command in setup:
        if command.startswith("losetup --find --show "):
            released.append(f"losetup --detach {next(attached)}")
        elif command.startswith("losetup --detach "):
            released.remove(command)
        elif command.startswith("mount "):
            released.append(f"umount {command.split()[-1]}")
    return released[::-1]


def shown(fake: FakeRunner, disk: str, **names: str) -> list[str]:
    """The commands run, ``disk`` shown as DISK, the instance root's mount point as MNT.

    The settings shell is left out (see FakeNode.install). ``names``: more
    paths to show by a name (``CACHE="/var/cache/..."``).
    """
    points = {c[-1] for c in fake.calls if c[0] == "mount"}
    roots = {p for p in points if not any(p.startswith(q + "/") for q in points)}
    replace = {**{root: "MNT" for root in roots}, disk: "DISK",
               **{path: name for name, path in names.items()}}
    out = []
    for argv, command in zip(fake.calls, fake.commands()):
        if argv[:len(settings.SHELL_COMMAND)] == settings.SHELL_COMMAND:
            continue  # reading the settings (FakeNode.install)
        for path, name in replace.items():
            command = command.replace(path, name)
        out.append(command)
    return out
