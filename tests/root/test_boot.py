"""Instances made by create boot under qemu: with Ganeti's kernel boot, and from GRUB.

One instance configuration with a kernel serves every test here, so that
the suite pays one extra bootstrap: the variant ``boot`` (BOOTLOADER=grub,
which adds linux-image-amd64 and grub-pc to the bootstrap). Its cache is
made by the first create with that variant, once per session (kept between
runs under GIDB_TEST_LOCALSTATEDIR). The other instances come from the same
cache: a gpt variant turning GRUB on through the OS parameter, and an import.

Three boots per run, about 40 s each under software emulation: the msdos
instance the way Ganeti's KVM boots by default (kernel and initrd given to
qemu), the gpt instance from its own GRUB through its BIOS boot partition,
and an exported and imported instance from the GRUB the node's tools put
on its disk. GRUB on msdos is also checked on the disk itself (boot code in
the MBR, core.img embedded after it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.root import bootstrap_fixture, scripts
from tests.root.qemu_boot import boot_and_run
from tests.root.scripts import OSTree, create_env, mounted_root, read, run_script

# The kernel and GRUB exist for amd64 here; qemu-system-x86_64 runs it.
pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="boots an amd64 instance under qemu-system-x86_64")

HOSTNAME = "boot1.example.org"
DISK_MIB = 2048  # the tree with a kernel and its initrd is about 1 GiB
BOOT_TIMEOUT = 300.0  # a hard limit for each boot, login and commands included
GPT_VARIANT = "bootgpt"
# openssh-server too: the same one extra cache shows that instances made
# from one cache get their own SSH host keys.
BOOT_EXTRA_PKGS = "openssh-server"
BOOT_VARIANT = f'BOOTLOADER="grub"\nEXTRA_PKGS="{BOOT_EXTRA_PKGS}"\n'


@dataclass(frozen=True)
class BootSetup:
    """The scratch OS tree with the boot variants, and the msdos instance made by it."""

    tree: OSTree
    msdos_disk: str
    root_uuid: str


def _localstatedir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's cache directory: the kept one, the one already used, or a new one."""
    chosen = (os.environ.get(bootstrap_fixture.ENVIRONMENT_VARIABLE)
              or bootstrap_fixture._built.get("path"))
    if chosen:
        os.makedirs(chosen, exist_ok=True)
        return chosen
    return str(tmp_path_factory.mktemp("boot-localstatedir"))


@pytest.fixture(scope="session")
def boot_setup(tmp_path_factory: pytest.TempPathFactory) -> BootSetup:
    """The boot variants, and an msdos grub instance with a serial console.

    Its create is the one that bootstraps the variant's cache when there is
    none yet; the time it took is printed.
    """
    base = tmp_path_factory.mktemp("boot")
    tree = scripts.make_os_tree(str(base / "os"), _localstatedir(tmp_path_factory))
    tree.variant("boot", BOOT_VARIANT)
    # GRUB through the OS parameter here, with the same packages: same cache.
    tree.variant(GPT_VARIANT, f'PARTITION_STYLE="gpt"\nEXTRA_PKGS="{BOOT_EXTRA_PKGS}"\n')
    disk = scripts.sparse_disk(str(base), DISK_MIB, "msdos.img")
    started = time.monotonic()
    res = run_script(tree, "create", create_env(
        HOSTNAME, disk, OS_VARIANT="boot", INSTANCE_HV_serial_console="True"))
    log = res.stderr.decode()
    how = "bootstrapped" if "Bootstrapping" in log else "from the cache"
    sys.stderr.write(f"\ncreate of the boot instance ({how}): "
                     f"{time.monotonic() - started:.1f} s\n")
    with scripts.root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    return BootSetup(tree, disk, uuid)


def _report(what: str, seconds: float, login_seconds: float) -> None:
    sys.stderr.write(f"\n{what}: login prompt after {login_seconds:.1f} s, "
                     f"{seconds:.1f} s in all\n")


def test_instance_boots_with_ganeti_kvm_kernel_boot_and_logs_in_on_serial(
        boot_setup, tmp_path):
    result = boot_and_run(
        Path(boot_setup.msdos_disk), workdir=tmp_path / "qemu", mode="kernel",
        expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT, commands=[
            "cat /etc/hostname; findmnt -no SOURCE,FSTYPE /",
            "systemctl is-enabled serial-getty@ttyS0.service",
            "systemctl is-active serial-getty@ttyS0.service",
            "cat /etc/machine-id",
            "systemctl is-system-running || true",
            "systemctl --failed --no-legend --plain",
        ])
    _report("kernel boot", result.seconds, result.login_seconds)
    assert result.outputs[0].splitlines() == [HOSTNAME, "/dev/vda1 ext4"]
    enabled, active, machine_id, state, failed = (out.strip() for out in result.outputs[1:])
    # The unit create enabled is the one that gave the login prompt.
    assert (enabled, active) == ("enabled", "active")
    # create leaves /etc/machine-id empty; systemd made this instance's own.
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id), machine_id
    assert state in ("running", "degraded"), state
    if state == "degraded":
        warnings.warn(f"the booted instance is degraded; failed units:\n{failed}")
        sys.stderr.write(f"failed units:\n{failed}\n")
    assert (state == "running") == (failed == "")


def test_gpt_instance_boots_from_its_own_grub(boot_setup, tmp_path):
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, "gpt.img")
    run_script(boot_setup.tree, "create", create_env(
        HOSTNAME, disk, OS_VARIANT=GPT_VARIANT, OSP_BOOTLOADER="grub",
        INSTANCE_HV_serial_console="True"))
    table = subprocess.run(["sfdisk", "--dump", disk], capture_output=True, text=True,
                           check=True).stdout
    assert "type=21686148-6449-6E6F-744E-656564454649" in table
    # No -kernel: the BIOS runs the MBR's GRUB, which needs the BIOS boot partition.
    result = boot_and_run(Path(disk), workdir=tmp_path / "qemu", mode="disk",
                          expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT,
                          commands=["findmnt -no SOURCE /; cat /proc/cmdline"])
    _report("GRUB boot (gpt)", result.seconds, result.login_seconds)
    source, cmdline = result.outputs[0].splitlines()
    assert source == "/dev/vda1"
    # GRUB's own mark, and the serial console create configured.
    assert cmdline.startswith("BOOT_IMAGE=/vmlinuz root=UUID=")
    assert "console=ttyS0,115200" in cmdline.split()


def _gap(disk: str, start: int, end: int) -> bytes:
    with open(disk, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def check_grub_on_msdos(disk: str, uuid: str) -> None:
    """GRUB's boot code in the MBR, core.img after it, grub.cfg for root ``uuid``."""
    with mounted_root(disk) as root:
        cfg = read(root, "/boot/grub/grub.cfg")
        with open(os.path.join(root, "boot/grub/i386-pc/core.img"), "rb") as f:
            core = f.read()
        debconf = read(root, "/var/cache/debconf/config.dat")
        dropin = read(root, "/etc/default/grub.d/ganeti-instance-debootstrap.cfg")
    assert "insmod part_msdos" in cfg and "insmod ext2" in cfg
    assert f"search --no-floppy --fs-uuid --set=root {uuid}" in cfg
    assert re.search(rf"(?m)^\s*linux /vmlinuz root=UUID={uuid} ro console=tty0 "
                     r"console=ttyS0,115200$", cfg), cfg
    assert "terminal_output serial console" in cfg
    mbr = _gap(disk, 0, 512)
    assert any(mbr[:440]), "no boot code in the MBR"
    assert mbr[510:] == b"\x55\xaa"
    # grub-bios-setup embeds core.img from sector 1 and patches a few bytes
    # of its first two sectors (where to find the rest, the boot drive).
    embedded = _gap(disk, 512, 512 + len(core))
    assert embedded[1024:] == core[1024:], "core.img is not embedded after the MBR"
    assert re.search(r"Name: grub-pc/install_devices\nTemplate: [^\n]*\nValue: /dev/vda\n",
                     debconf)
    assert "console=ttyS0,115200" in dropin


def test_msdos_instance_has_grub_in_the_mbr_gap_and_a_config_for_its_root(boot_setup):
    check_grub_on_msdos(boot_setup.msdos_disk, boot_setup.root_uuid)


def test_imported_instance_boots_from_the_node_grub(boot_setup, tmp_path):
    dump = str(tmp_path / "dump")
    env = dict(INSTANCE_NAME=HOSTNAME, DISK_COUNT="1", OS_VARIANT="boot",
               INSTANCE_HV_serial_console="True")
    with open(dump, "wb") as out:
        run_script(boot_setup.tree, "export", scripts.ganeti_env(
            DISK_0_PATH=boot_setup.msdos_disk, EXPORT_INDEX="0",
            EXPORT_DISK_PATH=boot_setup.msdos_disk, **env), stdout=out.fileno())
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, "imported.img")
    with open(dump, "rb") as inp:
        res = run_script(boot_setup.tree, "import", scripts.ganeti_env(
            DISK_0_PATH=disk, IMPORT_INDEX="0", IMPORT_DISK_PATH=disk, DEBUG_LEVEL="1",
            **env), stdin=inp.fileno())
    log = res.stderr.decode()
    # GRUB comes from the node: nothing of the restored system ran.
    assert "running: chroot" not in log
    assert "running: /usr/lib/grub/i386-pc/grub-bios-setup" in log
    with scripts.root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    assert uuid != boot_setup.root_uuid
    check_grub_on_msdos(disk, uuid)
    # No -kernel: the BIOS runs the MBR's GRUB, the node's, for the new root.
    result = boot_and_run(Path(disk), workdir=tmp_path / "qemu", mode="disk",
                          expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT,
                          commands=["findmnt -no SOURCE,UUID /; cat /proc/cmdline"])
    _report("GRUB boot (imported, the node's GRUB)", result.seconds, result.login_seconds)
    root, cmdline = result.outputs[0].splitlines()
    assert root.split() == ["/dev/vda1", uuid]
    assert cmdline.startswith(f"BOOT_IMAGE=/vmlinuz root=UUID={uuid} ")


def test_update_grub_run_by_a_hook_does_not_leave_grub_without_entries(boot_setup, tmp_path):
    # Its own OS tree: the hook must not run in the other tests' creates.
    tree = scripts.make_os_tree(str(tmp_path / "os"), boot_setup.tree.localstatedir)
    tree.variant("boot", BOOT_VARIANT)
    # What installing a kernel in a hook does (its postinst runs update-grub).
    tree.hook("50-update-grub", 'chroot "$TARGET" update-grub\n'
                                'cp "$TARGET/boot/grub/grub.cfg" "$TARGET/root/after-hook.cfg"\n')
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB)
    res = run_script(tree, "create", create_env(
        HOSTNAME, disk, OS_VARIANT="boot", INSTANCE_HV_serial_console="True"))
    with scripts.root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    with mounted_root(disk) as root:
        after_hook = read(root, "/root/after-hook.cfg")
    # The premise: on the node's loop device update-grub writes no Linux entry.
    assert not re.search(r"(?m)^\s*linux\s", after_hook), after_hook
    assert "no entry booting Linux" in res.stderr.decode()
    check_grub_on_msdos(disk, uuid)


def _host_keys(disk: str) -> dict[str, str]:
    with mounted_root(disk) as root:
        ssh = os.path.join(root, "etc/ssh")
        return {name: read(root, f"/etc/ssh/{name}") for name in sorted(os.listdir(ssh))
                if name.startswith("ssh_host_") and name.endswith(".pub")}


def test_two_instances_from_one_cache_have_their_own_identity(boot_setup, tmp_path):
    logs, keys = [], []
    for i in range(2):
        disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, f"id{i}.img")
        res = run_script(boot_setup.tree, "create", create_env(
            f"id{i}.example.org", disk, OS_VARIANT="boot"))
        logs.append(res.stderr.decode())
        keys.append(_host_keys(disk))
        with mounted_root(disk) as root:
            # Empty: systemd makes the instance's own at its first boot.
            assert read(root, "/etc/machine-id") == ""
            for shared in ("var/lib/systemd/random-seed", "var/lib/dbus/machine-id"):
                path = os.path.join(root, shared)
                assert not os.path.isfile(path) or os.path.islink(path), shared
    assert keys[0] and set(keys[0]) == set(keys[1])
    for name in keys[0]:
        assert keys[0][name] != keys[1][name], f"{name} shared by two instances"
    # The create log shows each key's fingerprint, for the first login.
    for i in range(2):
        fingerprints = re.findall(r"SHA256:[A-Za-z0-9+/]{43}", logs[i])
        assert len(fingerprints) == len(keys[i])
        for name in keys[i]:
            line = subprocess.run(["ssh-keygen", "-l", "-f", "/dev/stdin"],
                                  input=keys[i][name], capture_output=True,
                                  text=True, check=True).stdout
            assert line.split()[1] in fingerprints
