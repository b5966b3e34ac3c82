"""The production path, run inside the node VM (tests/root/node_vm.py boots it).

Usage (inside the VM, as root): node_vm_scenarios.py DATA_DIR LVM_DISK [measure]

DATA_DIR is the data disk mounted: ``src/`` (the OS definition's source:
``ganeti_debootstrap/`` and ``tests/launch.py``) and ``var/`` (a
localstatedir whose bootstrap cache is warm, so that no network is
needed). LVM_DISK becomes the physical volume of a volume group whose
logical volumes are the instance disks, as Ganeti's ``plain`` template
makes them.

Every scenario prints one line ``NODEVM-RESULT {json}`` (name, ok,
partition path used, seconds, detail) that the pytest module on the host
parses into one test each. The scripts run as Ganeti runs them: their own
process, a clean environment, umask 077, cwd the OS directory.

Only the standard library: this runs on the node VM's /usr/bin/python3.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator

PREFIX = "NODEVM-RESULT "
VG = "gidbvg"
LV_MIB = 1024
PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
PYTHON = "/usr/bin/python3"
HOSTNAME = "node1.example.org"
# One script run's limit: a hang fails its scenario, not the whole boot.
SCRIPT_TIMEOUT = 240.0
PAUSE_VARIABLE = "GIDB_TEST_PAUSE_AT"
# The node's GRUB program import runs (bootloader.NODE_GRUB_BIOS_SETUP).
GRUB_BIOS_SETUP = "/usr/lib/grub/i386-pc/grub-bios-setup"
# The node's packages (node_vm.py makes the node image with them): what a
# Ganeti node has, and linux-image-amd64 (device-mapper, LVM, virtio) and
# grub-pc (grub-pc-bin, which import's GRUB from the node needs). They are
# also the EXTRA_PKGS of the variant ``grub``: BOOTLOADER=grub adds the
# kernel and grub-pc, already here, so its bootstrap cache is the node's,
# which the data disk carries (no network inside).
NODE_PACKAGES = ("linux-image-amd64", "grub-pc", "lvm2", "kpartx", "dmsetup",
                 "python3", "python3-debian", "dump", "fdisk", "e2fsprogs",
                 "util-linux", "mmdebstrap", "psmisc")
# The grub instance (a kernel, an initrd and the node's packages, about
# 1 GiB as an ext4 image grown to the disk) and its import.
GRUB_LV_MIB = 2048
# Removed from the grub instance before its export, so that the round trip
# moves about what an instance without a kernel does (the dump is the
# slowest step under emulation): kernel modules, documentation and
# translations. The kernel and initrd GRUB's configuration names stay.
THINNED = ("usr/lib/modules", "usr/share/locale", "usr/share/doc", "usr/share/man",
           "usr/share/info")
_PATH_LINE = re.compile(r"Partition 1 of (\S+): (\S+) \((kpartx|offset loop device)\)")


class Failed(Exception):
    """A scenario's check did not hold."""


class Node:
    """The OS definition installed in a scratch tree, and the volume group."""

    def __init__(self, data: str, pv: str) -> None:
        self.data = data
        self.pv = pv
        self.launcher = os.path.join(data, "src", "tests", "launch.py")
        self.localstatedir = os.path.join(data, "var")
        work = "/run/gidb-node"
        self.sysconfdir = os.path.join(work, "etc")
        self.os_dir = os.path.join(work, "os")
        self.scratch = os.path.join(data, "scratch")

    def setup(self) -> str:
        config = os.path.join(self.sysconfdir, "ganeti", "instance-debootstrap")
        for d in (os.path.join(self.sysconfdir, "default"), os.path.join(config, "hooks"),
                  os.path.join(config, "variants"), self.os_dir, self.scratch):
            os.makedirs(d, mode=0o755, exist_ok=True)
        with open(os.path.join(self.sysconfdir, "default", "ganeti-instance-debootstrap"),
                  "w") as f:
            f.write("")
        variants = {"default": "", "msdos": 'PARTITION_STYLE="msdos"\n',
                    "gpt": 'PARTITION_STYLE="gpt"\n',
                    "grub": (f'PARTITION_STYLE="msdos"\nBOOTLOADER="grub"\n'
                             f'EXTRA_PKGS="{" ".join(NODE_PACKAGES)}"\n')}
        for name, text in variants.items():
            with open(os.path.join(config, "variants", name + ".conf"), "w") as f:
                f.write(text)
        with open(os.path.join(self.os_dir, "variants.list"), "w") as f:
            f.write("".join(name + "\n" for name in variants))
        sh(["pvcreate", "-q", "-y", "-ff", self.pv])
        sh(["vgcreate", "-q", VG, self.pv])
        return f"volume group {VG} on {self.pv}"

    def lv(self, name: str, mib: int = LV_MIB) -> str:
        sh(["lvcreate", "-q", "-y", "-L", f"{mib}M", "-n", name, VG])
        return f"/dev/{VG}/{name}"

    def env(self, **variables: str) -> dict[str, str]:
        env = {"PATH": PATH, "OS_API_VERSION": "20", "OS_NAME": "debootstrap",
               "OS_VARIANT": "default", "DEBUG_LEVEL": "0", "HYPERVISOR": "kvm",
               "NIC_COUNT": "0"}
        env.update(variables)
        return env

    def create_env(self, disk: str, variant: str, **extra: str) -> dict[str, str]:
        return self.env(INSTANCE_NAME=HOSTNAME, DISK_COUNT="1", DISK_0_PATH=disk,
                        DISK_0_ACCESS="rw", OS_VARIANT=variant, **extra)

    def argv(self, script: str) -> list[str]:
        return [PYTHON, self.launcher, self.sysconfdir, self.localstatedir,
                self.os_dir, script]

    def start(self, script: str, env: dict[str, str], **kwargs: object
              ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(script), env=env, cwd=self.os_dir,
                                preexec_fn=lambda: os.umask(0o077),  # noqa: PLW1509
                                **kwargs)  # type: ignore[call-overload]

    def run(self, script: str, env: dict[str, str], *, stdin: int | None = None,
            stdout: int | None = None,
            timeout: float = SCRIPT_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        # Progress on the console: what a stuck run was doing shows there.
        sys.stdout.write(f"NODEVM-STEP {script} {env.get('DISK_0_PATH', '')}\n")
        sys.stdout.flush()
        try:
            return subprocess.run(
                self.argv(script), env=env, cwd=self.os_dir,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE, timeout=timeout,
                preexec_fn=lambda: os.umask(0o077))  # noqa: PLW1509
        except subprocess.TimeoutExpired as exc:
            log = (exc.stderr or b"").decode(errors="replace")
            raise Failed(f"{script} did not finish within {timeout:.0f} s (killed); "
                         f"its log:\n{log[-1500:]}") from None


# --- helpers ------------------------------------------------------------------

def sh(argv: list[str], check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env={"PATH": PATH})
    if check and res.returncode != 0:
        raise Failed(f"{' '.join(argv)} exited {res.returncode}: "
                     f"{(res.stderr or res.stdout).strip()[-600:]}")
    return res.stdout


def stderr_of(res: subprocess.CompletedProcess[bytes]) -> str:
    return res.stderr.decode(errors="replace")


def must_succeed(what: str, res: subprocess.CompletedProcess[bytes]) -> str:
    log = stderr_of(res)
    if res.returncode != 0:
        raise Failed(f"{what} exited {res.returncode}:\n{log[-1500:]}")
    return log


def phases(log: str) -> str:
    """The script's phase timings from its log ("dump 12.3 s, ...")."""
    found = re.findall(r"(?m)^([\w ()]+): done in ([\d.]+) s$", log)
    return ", ".join(f"{name} {seconds} s" for name, seconds in found)


def partition_path(log: str) -> str:
    """What the script's log says partition 1 was reached through."""
    found = sorted({m.group(3) for m in _PATH_LINE.finditer(log)})
    return "+".join(found) or "none logged"


def part_mappings() -> list[str]:
    """device-mapper mappings of partitions (kpartx's "-partN" names)."""
    out = sh(["dmsetup", "ls"])
    names = [line.split()[0] for line in out.splitlines() if line.split()]
    return [n for n in names if re.search(r"-part\d+$", n)]


def loop_devices() -> list[str]:
    return [line for line in sh(["losetup", "-a"]).splitlines() if line.strip()]


def mounts_of(source_pattern: str) -> list[str]:
    out = sh(["findmnt", "-rn", "-o", "SOURCE,TARGET"], check=False)
    return [line for line in out.splitlines()
            if re.search(source_pattern, line.split()[0] if line.split() else "")]


def leftovers() -> list[str]:
    """Mappings, loop devices and mounts of instance disks left behind."""
    found = [f"mapping {n}" for n in part_mappings()]
    found += [f"loop {line}" for line in loop_devices()]
    found += [f"mount {line}" for line in mounts_of(rf"^/dev/(mapper/{VG}|{VG}/|loop)")]
    return found


def no_leftovers(when: str) -> None:
    left = leftovers()
    if left:
        raise Failed(f"left {when}: {left}")


def kpartx_listing_clean(disk: str) -> None:
    """kpartx -l names partition 1, and no such mapping exists now."""
    listing = sh(["kpartx", "-l", "-p", "-part", disk])
    names = [line.split(" : ")[0].strip() for line in listing.splitlines()
             if " : " in line]
    if not names:
        raise Failed(f"kpartx -l lists no partition on {disk}")
    present = [n for n in names if os.path.exists(os.path.join("/dev/mapper", n))]
    if present:
        raise Failed(f"mapping(s) still present: {present}")


def digest(disk: str) -> str:
    """A digest of the disk's start (tables, superblock) and end (GPT backup)."""
    h = hashlib.sha256()
    with open(disk, "rb") as f:
        h.update(f.read(8 << 20))
        size = f.seek(0, os.SEEK_END)
        f.seek(size - (1 << 20))
        h.update(f.read())
    return h.hexdigest()


@contextlib.contextmanager
def partition_1(disk: str, *, writable: bool = False, fsck: bool = False
                ) -> Iterator[tuple[str, str]]:
    """Partition 1 of ``disk`` mapped with kpartx and mounted: (its device, mount point).

    ``fsck``: e2fsck -n -f it (ext4 required) before mounting. The mapping
    is removed afterwards.
    """
    listing = sh(["kpartx", "-l", "-p", "-part", disk])
    name = next(line.split(" : ")[0].strip() for line in listing.splitlines()
                if line.split(" : ")[0].strip().endswith("-part1"))
    part = f"/dev/mapper/{name}"
    sh(["kpartx", "-a", "-s", *([] if writable else ["-r"]), "-p", "-part", disk])
    mnt = "/run/gidb-node/check"
    try:
        if fsck:
            fstype = sh(["blkid", "-p", "-o", "value", "-s", "TYPE", part]).strip()
            if fstype != "ext4":
                raise Failed(f"partition 1 holds {fstype!r}, expected ext4")
            sh(["e2fsck", "-n", "-f", part])
        os.makedirs(mnt, exist_ok=True)
        sh(["mount", "-o", "rw" if writable else "ro", part, mnt])
        try:
            yield part, mnt
        finally:
            sh(["umount", mnt])
    finally:
        sh(["kpartx", "-d", "-p", "-part", disk])


def check_instance(disk: str, style: str, hostname: str = HOSTNAME) -> str:
    """The disk's table style, and its partition 1 holding a clean ext4 with the instance."""
    label = json.loads(sh(["sfdisk", "--json", disk]))["partitiontable"]["label"]
    if {"dos": "msdos"}.get(label, label) != style:
        raise Failed(f"{disk} has a {label} table, expected {style}")
    with partition_1(disk, fsck=True) as (_, mnt):
        with open(os.path.join(mnt, "etc", "hostname")) as f:
            shown = f.read().strip()
        if shown != hostname:
            raise Failed(f"/etc/hostname is {shown!r}, expected {hostname!r}")
        if not os.path.exists(os.path.join(mnt, "usr", "bin", "apt-get")):
            raise Failed("no usr/bin/apt-get in the instance")
    return f"{style} table, ext4 clean (e2fsck -n), hostname {hostname}"


def check_grub(disk: str) -> tuple[str, str]:
    """GRUB for BIOS on msdos ``disk``: (the root's UUID, what was seen).

    Boot code with GRUB's signature in the MBR, core.img (as in the root's
    /boot/grub/i386-pc) embedded from sector 1, and a grub.cfg loading the
    kernel from that root. grub-bios-setup patches a few bytes of core.img's
    first two sectors (where to find the rest, the boot drive): compared
    from byte 1024 on, as test_boot.py does on the host.
    """
    with partition_1(disk) as (part, mnt):
        uuid = sh(["blkid", "-p", "-o", "value", "-s", "UUID", part]).strip()
        with open(os.path.join(mnt, "boot", "grub", "i386-pc", "core.img"), "rb") as f:
            core = f.read()
        with open(os.path.join(mnt, "boot", "grub", "grub.cfg")) as f:
            cfg = f.read()
    with open(disk, "rb") as f:
        head = f.read(512 + len(core))
    mbr = head[:512]
    if mbr[510:] != b"\x55\xaa" or b"GRUB" not in mbr[:440]:
        raise Failed(f"no GRUB boot code in the MBR of {disk}: {mbr[:440].hex()[:160]}...")
    if head[512 + 1024:] != core[1024:]:
        raise Failed(f"core.img ({len(core)} bytes) is not embedded after the MBR of {disk}")
    if (f"search --no-floppy --fs-uuid --set=root {uuid}" not in cfg
            or not re.search(rf"(?m)^\s*linux (/boot)?/vmlinuz root=UUID={uuid} ro", cfg)):
        raise Failed(f"grub.cfg does not boot the root {uuid}:\n{cfg[-1500:]}")
    return uuid, (f"GRUB's boot code in the MBR, core.img ({len(core) >> 10} KiB) "
                  f"embedded after it, grub.cfg booting root {uuid}")


def thin(disk: str) -> str:
    """Remove THINNED from the instance on ``disk``; how much that freed."""
    with partition_1(disk, writable=True) as (_, mnt):
        before = shutil.disk_usage(mnt).used
        for top in THINNED:
            directory = os.path.join(mnt, top)
            for name in os.listdir(directory) if os.path.isdir(directory) else ():
                sh(["rm", "-rf", "--one-file-system", os.path.join(directory, name)])
        sh(["sync", "-f", mnt])
        after = shutil.disk_usage(mnt).used
    return f"{(before - after) >> 20} MiB removed, {after >> 20} MiB used"


def create(node: Node, disk: str, variant: str, expect: str, *, listing: bool = True,
           **extra: str) -> tuple[str, str]:
    """A create that must succeed through ``expect``; its path and log.

    ``listing``: also check with kpartx that no mapping of the disk is left.
    """
    res = node.run("create", node.create_env(disk, variant, **extra))
    log = must_succeed(f"create {variant} on {disk}", res)
    path = partition_path(log)
    if path != expect:
        raise Failed(f"partition path {path!r}, expected {expect!r}; log:\n{log[-1500:]}")
    no_leftovers("after create")
    if listing:
        kpartx_listing_clean(disk)
    return path, log


def refused(node: Node, disk: str, message: str) -> str:
    """A create on ``disk`` refused with ``message``, the disk untouched."""
    before = digest(disk)
    res = node.run("create", node.create_env(disk, "msdos"))
    log = stderr_of(res)
    if res.returncode == 0:
        raise Failed(f"create on {disk} succeeded; it must be refused")
    if message not in log:
        raise Failed(f"create refused without {message!r}:\n{log[-1500:]}")
    if digest(disk) != before:
        raise Failed(f"create changed {disk} although it refused")
    return log.strip().splitlines()[-1][:300]


class Paused:
    """A create stopped at the start of a phase, to be signalled."""

    def __init__(self, node: Node, disk: str, phase: str) -> None:
        env = node.create_env(disk, "msdos", **{PAUSE_VARIABLE: phase})
        self.proc = node.start("create", env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.log = ""
        deadline = time.monotonic() + SCRIPT_TIMEOUT
        while f"PAUSED {phase}" not in self.log:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.proc.kill()
                raise Failed(f"create did not pause at {phase!r}:\n{self.log[-1500:]}")
            self.log += line.decode(errors="replace")

    def finish(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        assert self.proc.stderr is not None
        rest = self.proc.stderr.read().decode(errors="replace")
        return self.proc.wait(timeout=SCRIPT_TIMEOUT), self.log + rest


# --- scenarios -----------------------------------------------------------------

Outcome = tuple[str, str]  # (partition path, detail)


def s_create_msdos(node: Node) -> Outcome:
    disk = node.lv("msdos")
    started = time.monotonic()
    path, _ = create(node, disk, "msdos", "kpartx")
    seconds = time.monotonic() - started
    return path, f"create {seconds:.1f} s: {check_instance(disk, 'msdos')}"


def s_create_gpt(node: Node) -> Outcome:
    disk = node.lv("gpt")
    path, _ = create(node, disk, "gpt", "kpartx")
    return path, check_instance(disk, "gpt")


def s_refuse_mounted_lv(node: Node) -> Outcome:
    disk = f"/dev/{VG}/msdos"
    sh(["kpartx", "-a", "-s", "-p", "-part", disk])
    mnt = "/run/gidb-node/busy"
    os.makedirs(mnt, exist_ok=True)
    try:
        sh(["mount", f"/dev/mapper/{VG}-msdos-part1", mnt])
        try:
            detail = refused(node, disk, "is in use")
            if not mounts_of(rf"^/dev/mapper/{VG}-msdos-part1$"):
                raise Failed("the administrator's mount is gone")
        finally:
            sh(["umount", mnt])
    finally:
        sh(["kpartx", "-d", "-p", "-part", disk])
    return "refused", detail


def s_refuse_lv_with_holder(node: Node) -> Outcome:
    disk = f"/dev/{VG}/msdos"
    sh(["dmsetup", "create", "gidb-holder", "--table", f"0 2048 linear {disk} 0"])
    try:
        detail = refused(node, disk, "gidb-holder is built on it")
        if "gidb-holder" not in sh(["dmsetup", "ls"]):
            raise Failed("the holder mapping is gone")
    finally:
        sh(["dmsetup", "remove", "gidb-holder"])
    return "refused", detail


def s_refuse_foreign_kpartx_mapping(node: Node) -> Outcome:
    disk = f"/dev/{VG}/gpt"
    sh(["kpartx", "-a", "-s", "-p", "-part", disk])
    try:
        detail = refused(node, disk, f"{VG}-gpt-part1 is built on it")
        if f"{VG}-gpt-part1" not in part_mappings():
            raise Failed("the other mapping is gone")
    finally:
        sh(["kpartx", "-d", "-p", "-part", disk])
    return "refused", detail


def s_sigterm_during_create(node: Node) -> Outcome:
    disk = node.lv("term")
    paused = Paused(node, disk, "configure instance")
    during = part_mappings()
    status, log = paused.finish(signal.SIGTERM)
    if status == 0:
        raise Failed("create exited 0 after SIGTERM")
    no_leftovers("after SIGTERM")
    if f"{VG}-term-part1" not in during:
        raise Failed(f"no kpartx mapping while paused (saw {during})")
    return partition_path(log), f"exit {status}, mapping {VG}-term-part1 removed"


def s_sigkill_during_create(node: Node) -> Outcome:
    disk = f"/dev/{VG}/term"
    paused = Paused(node, disk, "configure instance")
    status, log = paused.finish(signal.SIGKILL)
    left = leftovers()
    # What SIGKILL leaves (nothing can clean up): the mapping and its mount.
    # The next create must not overwrite a disk in that state: it refuses,
    # and the administrator follows its messages: unmount, then remove the
    # mapping with the command the second message gives.
    mounted = mounts_of(rf"^/dev/mapper/{VG}-term-part1$")
    if not mounted:
        raise Failed(f"SIGKILL left no mount of the partition (left: {left})")
    refused(node, disk, f"umount {mounted[0].split()[1]}")
    sh(["umount", mounted[0].split()[1]])
    refused(node, disk, f"'kpartx -d -p -part {disk}'")
    sh(["kpartx", "-d", "-p", "-part", disk])
    path, _ = create(node, disk, "msdos", "kpartx")
    check_instance(disk, "msdos")
    return path, (f"exit {status}; left {len(left)} item(s) "
                  f"({', '.join(x.split(' ')[0] for x in left)}); next create refused "
                  f"(mounted, then the mapping named with its kpartx -d), then "
                  f"succeeded with nothing left")


def s_create_grub(node: Node) -> Outcome:
    """create with BOOTLOADER=grub on an LV: the instance's own grub-install, through kpartx."""
    disk = node.lv("grub", GRUB_LV_MIB)
    started = time.monotonic()
    path, log = create(node, disk, "grub", "kpartx", INSTANCE_HV_serial_console="True")
    seconds = time.monotonic() - started
    if f"GRUB installed on {disk}" not in log:
        raise Failed(f"create does not say GRUB was installed on {disk}:\n{log[-1500:]}")
    instance = check_instance(disk, "msdos")
    _, grub = check_grub(disk)
    return path, f"create {seconds:.1f} s ({phases(log)}): {instance}; {grub}"


def s_export_import_rename(node: Node) -> Outcome:
    """The grub instance exported, imported onto another LV (the node's GRUB), renamed."""
    source = f"/dev/{VG}/grub"
    thinned = thin(source)
    source_uuid, _ = check_grub(source)
    drop_caches()  # as before the measurements' exports of the same LV
    dump = os.path.join(node.scratch, "grub.dump")
    env = node.env(INSTANCE_NAME=HOSTNAME, DISK_COUNT="1", DISK_0_PATH=source,
                   EXPORT_INDEX="0", EXPORT_DISK_PATH=source, EXPORT_DEVICE=source)
    started = time.monotonic()
    with open(dump, "wb") as out:
        log = must_succeed("export", node.run("export", env, stdout=out.fileno()))
    seconds = [time.monotonic() - started]
    size = os.path.getsize(dump)
    export_phases = phases(log)
    paths = [partition_path(log)]
    no_leftovers("after export")
    target = node.lv("imported", GRUB_LV_MIB)
    env = node.env(INSTANCE_NAME=HOSTNAME, DISK_COUNT="1", DISK_0_PATH=target,
                   IMPORT_INDEX="0", IMPORT_DISK_PATH=target, IMPORT_DEVICE=target,
                   OS_VARIANT="grub", INSTANCE_HV_serial_console="True", DEBUG_LEVEL="1")
    started = time.monotonic()
    with open(dump, "rb") as inp:
        log = must_succeed("import", node.run("import", env, stdin=inp.fileno()))
    seconds.append(time.monotonic() - started)
    os.unlink(dump)
    paths.append(partition_path(log))
    no_leftovers("after import")
    # GRUB from the node (grub-pc-bin): nothing of the restored system ran.
    if "running: chroot" in log or f"running: {GRUB_BIOS_SETUP}" not in log:
        raise Failed(f"import did not put the node's GRUB on {target}:\n{log[-1500:]}")
    check_instance(target, "msdos")
    target_uuid, grub = check_grub(target)
    if target_uuid == source_uuid:
        raise Failed(f"the imported root has the exported one's UUID {source_uuid}")
    new = "node2.example.org"
    env = node.env(INSTANCE_NAME=new, OLD_INSTANCE_NAME=HOSTNAME, DISK_COUNT="1",
                   DISK_0_PATH=target)
    started = time.monotonic()
    log = must_succeed("rename", node.run("rename", env))
    seconds.append(time.monotonic() - started)
    paths.append(partition_path(log))
    no_leftovers("after rename")
    kpartx_listing_clean(target)
    detail = check_instance(target, "msdos", new)
    times = ", ".join(f"{what} {t:.1f} s" for what, t in
                      zip(("export", "import", "rename"), seconds))
    return "/".join(paths), (f"{times} (grub instance thinned: {thinned}; dump "
                             f"{size >> 20} MiB; export phases: {export_phases}): "
                             f"imported: {grub}; renamed: {detail}")


def timed_export(node: Node, source: str) -> tuple[float, str, str]:
    """Export ``source`` (to a scratch file, removed): seconds, log, and what it made."""
    dump = os.path.join(node.scratch, "measure.dump")
    env = node.env(INSTANCE_NAME=HOSTNAME, DISK_COUNT="1", DISK_0_PATH=source,
                   EXPORT_INDEX="0", EXPORT_DISK_PATH=source, EXPORT_DEVICE=source)
    drop_caches()
    started = time.monotonic()
    with open(dump, "wb") as out:
        log = must_succeed("export", node.run("export", env, stdout=out.fileno()))
    seconds = time.monotonic() - started
    size = os.path.getsize(dump)
    os.unlink(dump)
    no_leftovers("after export")
    return seconds, log, f"dump {size >> 20} MiB; phases: {phases(log)}"


def s_export_without_kpartx(node: Node) -> Outcome:
    """The round trip's export through the offset loop device, for the comparison."""
    with kpartx_hidden():
        seconds, log, what = timed_export(node, f"/dev/{VG}/grub")
    return partition_path(log), f"export {seconds:.1f} s ({what})"


def s_export_loop_direct_io(node: Node) -> Outcome:
    """The same export through an offset loop device with direct I/O."""
    with kpartx_hidden(), losetup_direct_io() as flags:
        seconds, log, what = timed_export(node, f"/dev/{VG}/grub")
        seen = flags()
    check_direct_io(seen)
    return partition_path(log), f"export {seconds:.1f} s ({what}; DIO=1 on {len(seen)} device)"


# The partition paths compared: (name, kpartx hidden, losetup with direct I/O).
COMPARED_PATHS = (("kpartx", False, False), ("offset loop", True, False),
                  ("offset loop, direct I/O", True, True))
COMPARE_ROUNDS = 2


def s_compare_create_paths(node: Node) -> Outcome:
    """create msdos on one LV through each partition path in turn, COMPARE_ROUNDS times.

    Whether ``losetup --direct-io=on`` (nothing cached twice: not in the
    loop's page cache and the LV's too) would make the offset loop device
    good enough to be the only path. In turn, so that a load on the host
    spreads over every path; the guest's caches dropped before each; each
    result checked (table, e2fsck, hostname).
    """
    disk = node.lv("compare")
    times: dict[str, list[float]] = {name: [] for name, _, _ in COMPARED_PATHS}
    paths: dict[str, str] = {}
    for _ in range(COMPARE_ROUNDS):
        for name, hide, direct in COMPARED_PATHS:
            with contextlib.ExitStack() as stack:
                if hide:
                    stack.enter_context(kpartx_hidden())
                flags = stack.enter_context(losetup_direct_io()) if direct else None
                expect = "offset loop device" if hide else "kpartx"
                drop_caches()
                started = time.monotonic()
                paths[name], _ = create(node, disk, "msdos", expect, listing=False)
                times[name].append(time.monotonic() - started)
                if flags is not None:
                    check_direct_io(flags())
            check_instance(disk, "msdos")
    shown = "; ".join(f"{name} {', '.join(f'{t:.1f}' for t in ts)} s"
                      for name, ts in times.items())
    return "/".join(paths[name] for name, _, _ in COMPARED_PATHS), (
        f"create msdos, {COMPARE_ROUNDS} rounds: {shown}; every result checked")


def drop_caches() -> None:
    """Empty the guest's page cache, so that no step reads what the one before left."""
    sh(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def check_direct_io(seen: list[tuple[str, str]]) -> None:
    if not seen or any(flag != "1" for _, flag in seen):
        raise Failed(f"the offset loop device(s) did not run with direct I/O: {seen}")


def s_kpartx_absent(node: Node) -> Outcome:
    with kpartx_hidden():
        disk = node.lv("noKpartx")
        started = time.monotonic()
        path, _ = create(node, disk, "msdos", "offset loop device", listing=False)
        seconds = time.monotonic() - started
    kpartx_listing_clean(disk)
    return path, f"create {seconds:.1f} s: {check_instance(disk, 'msdos')}"


@contextlib.contextmanager
def kpartx_hidden() -> Iterator[None]:
    """kpartx absent from the node meanwhile (device-mapper still there)."""
    kpartx = shutil.which("kpartx", path=PATH)
    if kpartx is None:
        raise Failed("kpartx is not installed on the node")
    hidden = kpartx + ".hidden"
    os.rename(kpartx, hidden)
    try:
        yield
    finally:
        os.rename(hidden, kpartx)


_DIRECT_IO_WRAPPER = """#!/bin/sh
# node_vm_scenarios.py: offset loop devices with direct I/O, for a measurement.
case " $* " in
*" --offset "*)
    dev=$({real} --direct-io=on "$@") || exit
    printf '%s\\n' "$dev"
    {real} --noheadings --list --output NAME,DIO "$dev" >>{record}
    ;;
*) exec {real} "$@" ;;
esac
"""


@contextlib.contextmanager
def losetup_direct_io() -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """losetup adding --direct-io=on to every attach with an offset, meanwhile.

    Yields a function returning (device, DIO flag) for each such attach.
    """
    losetup = shutil.which("losetup", path=PATH)
    if losetup is None:
        raise Failed("losetup is not installed on the node")
    real = losetup + ".gidb-real"
    record = "/run/gidb-node/direct-io.list"
    with open(record, "w"):
        pass

    def flags() -> list[tuple[str, str]]:
        with open(record) as f:
            return [(line.split()[0], line.split()[1]) for line in f if len(line.split()) == 2]

    os.rename(losetup, real)
    try:
        with open(losetup, "w") as f:
            f.write(_DIRECT_IO_WRAPPER.format(real=real, record=record))
        os.chmod(losetup, 0o755)
        yield flags
    finally:
        os.replace(real, losetup)


SCENARIOS: list[tuple[str, Callable[[Node], Outcome]]] = [
    ("create_msdos_on_lv", s_create_msdos),
    ("create_gpt_on_lv", s_create_gpt),
    ("refuse_mounted_lv", s_refuse_mounted_lv),
    ("refuse_lv_with_holder", s_refuse_lv_with_holder),
    ("refuse_foreign_kpartx_mapping", s_refuse_foreign_kpartx_mapping),
    ("sigterm_during_create_on_lv", s_sigterm_during_create),
    ("sigkill_during_create_on_lv", s_sigkill_during_create),
    ("create_msdos_on_lv_without_kpartx", s_kpartx_absent),
    ("create_grub_on_lv", s_create_grub),
    ("export_import_rename_on_lvs", s_export_import_rename),
]
# Run only when asked (argument "measure"), outside CI's budget (about
# 2-3 minutes under emulation): the round trip's export through the offset
# loop device, buffered and with direct I/O, to compare with
# export_import_rename_on_lvs' (kpartx), and creates through each path in turn.
MEASUREMENTS: list[tuple[str, Callable[[Node], Outcome]]] = [
    ("export_on_lv_without_kpartx", s_export_without_kpartx),
    ("export_on_lv_loop_direct_io", s_export_loop_direct_io),
    ("compare_create_paths_on_lv", s_compare_create_paths),
]


def report(name: str, ok: bool, path: str, seconds: float, detail: str) -> None:
    line = json.dumps({"name": name, "ok": ok, "path": path,
                       "seconds": round(seconds, 1), "detail": detail})
    sys.stdout.write(PREFIX + line + "\n")
    sys.stdout.flush()


def main() -> int:
    data, pv = sys.argv[1:3]
    measure = "measure" in sys.argv[3:]
    node = Node(data, pv)
    start = time.monotonic()
    try:
        detail = node.setup()
    except Exception as exc:  # noqa: BLE001 - reported, then nothing else can run
        report("setup", False, "-", time.monotonic() - start, f"{exc}")
        return 1
    report("setup", True, "-", time.monotonic() - start, detail)
    failed = 0
    for name, scenario in SCENARIOS + (MEASUREMENTS if measure else []):
        start = time.monotonic()
        try:
            path, detail = scenario(node)
            ok = True
        except Failed as exc:
            path, detail, ok = "-", str(exc), False
        except Exception:  # noqa: BLE001 - one scenario's bug must not hide the others
            path, detail, ok = "-", traceback.format_exc()[-1500:], False
        failed += not ok
        report(name, ok, path, time.monotonic() - start, detail)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
