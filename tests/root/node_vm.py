"""A Ganeti node under qemu, to run the production path: device-mapper, kpartx, LVM.

This machine's kernel has no device-mapper, so the node path of the
scripts (kpartx mappings of LVM logical volumes) cannot run on it. A Debian
kernel has all of it: the node VM is an instance made by our own ``create``
(variant ``node``: a kernel, lvm2, kpartx, dmsetup,
python3-debian, dump, mmdebstrap...), booted under software emulation with
two more virtio disks:

- the data disk (ext4, serial ``gidbdata``): the OS definition's source
  (``src/ganeti_debootstrap``, ``src/tests/launch.py``, the scenario script)
  and a localstatedir whose bootstrap cache holds the host's entries, with
  their ext4 images, for the default settings and for the node's own
  packages (the one the node image was made from; with BOOTLOADER=grub,
  which adds nothing to that list, the grub instance's too), so that no
  network is needed inside;
- the LVM disk (serial ``gidblvm``, sparse): the volume group's physical volume.

:func:`run_node_vm` builds what is missing, boots the node, runs
``node_vm_scenarios.py`` over the serial console (one run, every scenario)
and returns one result per scenario with the timings. The node image is
cached between runs under the session's localstatedir (``node-vm/``),
keyed by what it is made from; qemu is always killed (``qemu_boot``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ganeti_debootstrap import cache_images
from ganeti_debootstrap.cache_store import Cache, CacheEntry
from ganeti_debootstrap.settings import Settings
from tests.root import bootstrap_fixture, scripts
from tests.root.node_vm_scenarios import NODE_PACKAGES
from tests.root.qemu_boot import (
    BootFailed,
    BootResult,
    extract_kernel,
    qemu_argv,
    run_console_session,
)

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent
SCENARIO_SCRIPT = HERE / "node_vm_scenarios.py"
RESULT_PREFIX = "NODEVM-RESULT "

NODE_HOSTNAME = "gidbnode.example.org"
# The node's packages are node_vm_scenarios.NODE_PACKAGES. The node boots
# the way Ganeti's KVM boots by default (kernel and initrd given to qemu),
# so GRUB is not installed on its disk. The serial console comes from
# INSTANCE_HV_serial_console.
NODE_VARIANT = f'EXTRA_PKGS="{" ".join(NODE_PACKAGES)}"\n'
NODE_DISK_MIB = 3072
# Bumped when the node image must be rebuilt for a reason the key misses.
NODE_FORMAT = 1
# Two cache entries with their ext4 images (about 0.45 and 1.2 GiB), the
# source, and room for a dump.
DATA_DISK_MIB = 3072
# Four 1 GiB and two 2 GiB logical volumes (sparse on the host).
LVM_DISK_MIB = 10240
MEMORY_MIB = 1536
# One vCPU: with two, a CI run under load saw the guest kernel oops and then
# spin in a soft lockup until the 1080 s deadline (multi-threaded TCG on a
# 2-core host). The scenarios run one command at a time anyway.
CPUS = 1
# A guest kernel that oopses or panics powers the VM off at once (qemu runs
# with -no-reboot) instead of hanging until the deadline.
KERNEL_DEATH_ARGS = "oops=panic panic=1"
# Lines by which a guest kernel's death is recognised in the console.
KERNEL_DEATH = re.compile(r"Kernel panic|Oops:|BUG: |soft lockup|rcu_preempt self-detected stall")
# The whole session's hard limit (boot, every scenario, power-off), and one
# command's (the scenario run is one command).
# Measured boot to power-off: 4.6-5.3 min (login prompt after 51-89 s),
# 9.7 min with the measurement under a load average of 9.6 on 2 cores; with
# the grub round trip and one vCPU, 3.5 min (login prompt after 36 s), 5.5-6.7
# min with the measurements (about 2 min of it).
BOOT_TIMEOUT = 1200.0
STEP_TIMEOUT = 1080.0
# Set to 1 to run the measurements too (see node_vm_scenarios.MEASUREMENTS).
MEASURE_VARIABLE = "GIDB_NODE_VM_MEASURE"
DATA_MOUNT = "/mnt/gidb"


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    ok: bool
    path: str  # the partition path the scenario's scripts used
    seconds: float
    detail: str


@dataclass(frozen=True)
class NodeRun:
    results: dict[str, ScenarioResult]
    image_seconds: float  # building (or finding) the node image
    data_seconds: float  # making the data disk
    login_seconds: float  # qemu start to the login prompt
    seconds: float  # qemu start to exit
    transcript: Path
    output: str  # the scenario command's output
    status: int


def _node_key() -> str:
    inputs = {"variant": NODE_VARIANT, "disk_mib": NODE_DISK_MIB, "format": NODE_FORMAT,
              "hostname": NODE_HOSTNAME,
              "bootstrap": bootstrap_fixture.default_key().inputs()}
    canonical = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def node_image(localstatedir: str, workdir: Path) -> Path:
    """The node's disk image, made by create with the ``node`` variant if not cached."""
    directory = Path(localstatedir) / "node-vm"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _node_key()
    image = directory / f"node-{key}.img"
    with _locked(directory / f"node-{key}.lock"):
        if image.exists():
            return image
        for old in directory.glob("node-*.img"):  # other keys' images
            old.unlink()
        tree = scripts.make_os_tree(os.fspath(workdir / "node-os"), localstatedir)
        tree.variant("node", NODE_VARIANT)
        tmp = Path(scripts.sparse_disk(os.fspath(directory), NODE_DISK_MIB,
                                       f".node-{key}.img.tmp"))
        try:
            scripts.run_script(tree, "create", scripts.create_env(
                NODE_HOSTNAME, os.fspath(tmp), OS_VARIANT="node",
                INSTANCE_HV_serial_console="True"), timeout=1800)
            tmp.rename(image)
        finally:
            tmp.unlink(missing_ok=True)
    return image


def _copy_source(dest: Path) -> None:
    """The OS definition's code and the launcher, as the VM runs them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(SOURCE / "ganeti_debootstrap", dest / "ganeti_debootstrap", ignore=ignore)
    (dest / "tests").mkdir()
    shutil.copy2(SOURCE / "tests" / "launch.py", dest / "tests" / "launch.py")
    shutil.copy2(SCENARIO_SCRIPT, dest / "tests" / SCENARIO_SCRIPT.name)


def node_settings() -> Settings:
    """The settings the node image is bootstrapped with (its variant's packages)."""
    return Settings(extra_pkgs=NODE_PACKAGES)


def _warm_cache_files(localstatedir: str) -> list[Path]:
    """The cache entries the VM's creates use, and their ext4 images (made if missing).

    The default settings' (msdos, gpt...) and the node's (variant ``grub``:
    BOOTLOADER=grub with the node's packages, which already hold the
    kernel and grub-pc, so its key is the node's). The node's entry is
    normally there since the node image was made from it.
    """
    files: list[Path] = []
    for entry in (bootstrap_fixture.ensure_default_cache(localstatedir),
                  bootstrap_fixture.ensure_cache(localstatedir, node_settings())):
        files += _entry_files(localstatedir, entry)
    return files


def _entry_files(localstatedir: str, entry: CacheEntry) -> list[Path]:
    store = Cache(bootstrap_fixture.cache_dir(localstatedir), clean_days=None)
    with store.using(entry.key, lambda: None):
        image = cache_images.ensure(store, entry, "ext4")
    return [Path(entry.path), Path(entry.inputs_file), Path(image.path),
            Path(cache_images.record_path(entry, "ext4"))]


def make_data_disk(localstatedir: str, path: Path) -> None:
    """An ext4 disk with the source, the scenario script and a warm cache."""
    files = _warm_cache_files(localstatedir)
    with open(path, "wb") as f:
        f.truncate(DATA_DISK_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "gidbdata", os.fspath(path)], check=True)
    mnt = path.parent / "data-mnt"
    mnt.mkdir()
    dev = subprocess.run(["losetup", "--find", "--show", os.fspath(path)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", dev, os.fspath(mnt)], check=True)
        try:
            os.chmod(mnt, 0o755)
            _copy_source(mnt / "src")
            cache = mnt / "var" / "cache" / "ganeti-instance-debootstrap"
            cache.mkdir(parents=True, mode=0o755)
            os.chmod(mnt / "var", 0o755)
            os.chmod(mnt / "var" / "cache", 0o755)
            for file in files:
                # --preserve: the entry's records hold the files' mtimes.
                subprocess.run(["cp", "--preserve=all", "--sparse=always",
                                os.fspath(file), os.fspath(cache / file.name)], check=True)
        finally:
            subprocess.run(["umount", os.fspath(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
        mnt.rmdir()


def parse_results(text: str) -> dict[str, ScenarioResult]:
    results: dict[str, ScenarioResult] = {}
    for line in text.splitlines():
        at = line.find(RESULT_PREFIX)
        if at < 0:
            continue
        try:
            data = json.loads(line[at + len(RESULT_PREFIX):])
        except ValueError:
            continue  # the typed command's echo, or a line cut by a kernel message
        results[data["name"]] = ScenarioResult(data["name"], bool(data["ok"]), data["path"],
                                               float(data["seconds"]), data["detail"])
    return results


def run_node_vm(localstatedir: str, workdir: Path, *, measure: bool = False) -> NodeRun:
    """Build what is missing, boot the node, run the scenarios, power it off.

    ``measure`` adds the measurements (node_vm_scenarios.MEASUREMENTS).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    image = node_image(localstatedir, workdir)
    image_seconds = time.monotonic() - started
    started = time.monotonic()
    data = workdir / "data.img"
    make_data_disk(localstatedir, data)
    lvm = workdir / "lvm.img"
    with open(lvm, "wb") as f:
        f.truncate(LVM_DISK_MIB << 20)
    data_seconds = time.monotonic() - started
    kernel = extract_kernel(image, workdir / "kernel")
    argv = qemu_argv(image, mode="kernel", kernel=kernel, memory_mib=MEMORY_MIB,
                     append=f"root=UUID={kernel.root_uuid} ro console=ttyS0 {KERNEL_DEATH_ARGS}")
    argv += ["-smp", str(CPUS)]
    for disk, serial in ((data, "gidbdata"), (lvm, "gidblvm")):
        # Scratch disks: no snapshot, no flushes. The serial number names
        # them inside (/dev/disk/by-id/virtio-<serial>).
        name = os.fspath(disk).replace(",", ",,")
        argv += ["-drive", f"file={name},if=none,id={serial},format=raw,cache=unsafe",
                 "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]
    by_id = "/dev/disk/by-id/virtio-"
    script = f"{DATA_MOUNT}/src/tests/{SCENARIO_SCRIPT.name}"
    commands = [
        f"udevadm settle; mkdir -p {DATA_MOUNT} && mount {by_id}gidbdata {DATA_MOUNT}",
        f"/usr/bin/python3 {script} {DATA_MOUNT} {by_id}gidblvm{' measure' if measure else ''}",
        # Leave the data disk clean; the node's own disk is a snapshot.
        f"vgchange -an -q gidbvg >/dev/null 2>&1; umount {DATA_MOUNT}",
    ]
    try:
        result = _boot_once_more_if_kernel_died(argv, commands, workdir)
    finally:
        lvm.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
    if result.statuses[0] != 0:
        raise BootFailed(f"The data disk could not be mounted in the node VM:\n"
                         f"{result.outputs[0]}")
    results = parse_results(result.outputs[1])
    run = NodeRun(results, image_seconds, data_seconds, result.login_seconds,
                  result.seconds, result.transcript_path, result.outputs[1],
                  result.statuses[1])
    return run


def _boot_once_more_if_kernel_died(argv: list[str], commands: list[str],
                                   workdir: Path) -> BootResult:
    """Run the console session; boot a second time only if the guest kernel died.

    The emulator, not our code, is what occasionally kills a guest kernel
    under load; a second death, or any other failure, is the test's failure.
    The first console is kept beside the second (console-1.log).
    """
    try:
        return run_console_session(
            argv, commands=commands, expect_hostname=NODE_HOSTNAME, timeout=BOOT_TIMEOUT,
            transcript_path=workdir / "console-1.log", check=False,
            step_timeout=STEP_TIMEOUT)
    except BootFailed as err:
        first = (workdir / "console-1.log").read_bytes().decode("utf-8", "replace")
        death = KERNEL_DEATH.search(first)
        if death is None:
            raise
        print(f"\nnode VM: the guest kernel died ({death.group(0)!r}); booting once more. "
              f"First failure: {str(err).splitlines()[0]}")
    return run_console_session(
        argv, commands=commands, expect_hostname=NODE_HOSTNAME, timeout=BOOT_TIMEOUT,
        transcript_path=workdir / "console.log", check=False, step_timeout=STEP_TIMEOUT)


def summary(run: NodeRun) -> str:
    lines = [f"\nnode VM: image {run.image_seconds:.1f} s, data disk {run.data_seconds:.1f} s, "
             f"login prompt after {run.login_seconds:.1f} s, {run.seconds:.1f} s boot to "
             f"power-off"]
    for r in run.results.values():
        lines.append(f"  {'PASS' if r.ok else 'FAIL'} {r.name}: partition path {r.path}, "
                     f"{r.seconds:.1f} s: {r.detail.splitlines()[0] if r.detail else ''}")
    passed = sum(r.ok for r in run.results.values())
    lines.append(f"node VM scenarios: {passed} passed, {len(run.results) - passed} failed")
    return "\n".join(lines) + "\n"
