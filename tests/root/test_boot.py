"""Instances made by create boot under qemu: with Ganeti's kernel boot, and from GRUB.

One instance configuration with a kernel serves every test here, so that
the suite pays one extra bootstrap: the variant ``boot`` (BOOTLOADER=grub,
which adds linux-image-amd64 and grub-pc to the bootstrap). Its cache is
made by the first create with that variant, once per session (kept between
runs under GIDB_TEST_LOCALSTATEDIR). The other instances come from the same
cache: a gpt variant turning GRUB on through the OS parameter, and an import.

Three boots per run, about 40 s each under software emulation: the msdos
instance the way Ganeti's KVM boots by default (kernel and initrd given to
qemu), the gpt instance from its own GRUB through its BIOS boot partition
(with a swap partition, OS parameter swap, and a data disk,
data_disks=format: the same boot shows the swap active and the data disk
mounted), and an exported and imported instance from the GRUB the node's
tools put on its disk; then an XFS root on msdos and a Btrfs root on gpt,
each from its own GRUB. GRUB on msdos is also checked on the disk itself
(boot code in the MBR, core.img embedded after it).

UEFI (bootloader=grub-efi, variant ``bootefi``, the same cache): a created
instance boots under OVMF (qemu -bios, software emulation) from the
node-built EFI/BOOT/BOOTX64.EFI, then its export and import does too: two
more boots, about 65-75 s each here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.root import bootstrap_fixture, scripts
from tests.root.qemu_boot import UserNic, boot_and_run
from tests.root.scripts import OSTree, create_env, mounted_root, read, run_script

# The kernel and GRUB exist for amd64 here; qemu-system-x86_64 runs it.
pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="boots an amd64 instance under qemu-system-x86_64")

HOSTNAME = "boot1.example.org"
DISK_MIB = 2048  # the tree with a kernel and its initrd is about 1 GiB
BOOT_TIMEOUT = 300.0  # a hard limit for each boot, login and commands included
GPT_VARIANT = "bootgpt"
# openssh-server too: the same one extra cache shows that instances made
# from one cache get their own SSH host keys, and lets the host in with the
# key of ssh_authorized_keys; sudo for admin_user.
BOOT_EXTRA_PKGS = "openssh-server,sudo"
# The msdos instance's one NIC, static on qemu's user-mode network (only
# its port 22 is reachable, from the host's loopback).
NIC_MAC = "52:54:00:12:34:56"
NIC_ENV = {"NIC_COUNT": "1", "NIC_0_MAC": NIC_MAC, "NIC_0_IP": "10.0.2.15",
           "NIC_0_MODE": "bridged", "NIC_0_LINK": "br0",
           "NIC_0_NETWORK_SUBNET": "10.0.2.0/24", "NIC_0_NETWORK_GATEWAY": "10.0.2.2"}
BOOT_VARIANT = f'BOOTLOADER="grub"\nEXTRA_PKGS="{BOOT_EXTRA_PKGS}"\n'


@dataclass(frozen=True)
class BootSetup:
    """The scratch OS tree with the boot variants, and the msdos instance made by it."""

    tree: OSTree
    msdos_disk: str
    root_uuid: str
    login: Login
    create_log: str


@dataclass(frozen=True)
class Login:
    """The key and password the msdos instance was made with (OS parameters)."""

    key_file: str  # the private half, on the host
    public_key: str
    password: str
    password_hash: str


def make_login(directory: Path) -> Login:
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tenant@example.org",
                    "-f", str(key)], check=True)
    password = "Gidb-" + secrets.token_hex(6)
    hashed = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password,
                            capture_output=True, text=True, check=True).stdout.strip()
    return Login(str(key), (directory / "id_ed25519.pub").read_text().strip(),
                 password, hashed)


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
    # grub-efi adds only the kernel: with grub-pc listed, the same cache again
    # (EXTRA_PKGS are sorted in its key); grub-pc is never run there.
    tree.variant(EFI_VARIANT, f'PARTITION_STYLE="gpt"\n'
                              f'EXTRA_PKGS="{BOOT_EXTRA_PKGS},grub-pc"\n')
    disk = scripts.sparse_disk(str(base), DISK_MIB, "msdos.img")
    login = make_login(base)
    started = time.monotonic()
    # Root gets a key and a password: the boots log in with that password,
    # and the kernel boot's test connects with the key.
    res = run_script(tree, "create", create_env(
        HOSTNAME, disk, OS_VARIANT="boot", INSTANCE_HV_serial_console="True",
        DEBUG_LEVEL="1", OSP_SSH_AUTHORIZED_KEYS=login.public_key,
        OSP_PASSWORD_HASH=login.password_hash, **NIC_ENV))
    log = res.stderr.decode()
    how = "bootstrapped" if "Bootstrapping" in log else "from the cache"
    sys.stderr.write(f"\ncreate of the boot instance ({how}): "
                     f"{time.monotonic() - started:.1f} s\n")
    with scripts.root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    return BootSetup(tree, disk, uuid, login, log)


def _report(what: str, seconds: float, login_seconds: float) -> None:
    sys.stderr.write(f"\n{what}: login prompt after {login_seconds:.1f} s, "
                     f"{seconds:.1f} s in all\n")


def free_port() -> int:
    """A TCP port on the host's loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class SshOutcome:
    key_login: subprocess.CompletedProcess[str]
    password_login: subprocess.CompletedProcess[str]
    password_asked: bool


def ssh_checks(login: Login, port: int, known_hosts: Path, workdir: Path) -> SshOutcome:
    """From the host: log in with the key, then try root's password (it must fail).

    The password attempt is real: SSH_ASKPASS gives ssh the correct password
    (the one the console login used), and a marker shows ssh asked for it.
    """
    common = ["ssh", "-p", str(port), "-o", f"UserKnownHostsFile={known_hosts}",
              "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=60",
              "-o", "LogLevel=ERROR", "-F", "/dev/null"]
    key_login = subprocess.run(
        [*common, "-i", login.key_file, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "root@127.0.0.1", "id -un; hostname; cat /proc/sys/kernel/random/boot_id"],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    marker = workdir / "askpass-asked"
    askpass = workdir / "askpass"
    askpass.write_text(f"#!/bin/sh\ntouch {marker}\necho '{login.password}'\n")
    askpass.chmod(0o700)
    password_login = subprocess.run(
        [*common, "-o", "PubkeyAuthentication=no", "-o", "IdentitiesOnly=yes",
         "-o", "PreferredAuthentications=password,keyboard-interactive",
         "-o", "NumberOfPasswordPrompts=1", "root@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        env={**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
             "DISPLAY": ":0"}, start_new_session=True)
    return SshOutcome(key_login, password_login, marker.exists())


def known_hosts_for(disk: str, port: int, path: Path) -> Path:
    """A known_hosts naming the instance's host keys (read from its disk) for the port."""
    lines = [f"[127.0.0.1]:{port} {' '.join(text.split()[:2])}\n"
             for text in _host_keys(disk).values()]
    path.write_text("".join(lines))
    return path


def test_create_log_holds_neither_the_key_nor_the_password_hash(boot_setup):
    login = boot_setup.login
    log = boot_setup.create_log
    assert "running: ssh-keygen -l -f -" in log  # the keys were checked (debug log)
    assert "root: 1 SSH key(s) (ssh-ed25519), a password hash" in log
    assert login.public_key.split()[1] not in log and "tenant@example.org" not in log
    assert login.password_hash not in log and login.password_hash.split("$")[-1] not in log


def test_root_key_and_password_hash_are_in_the_instance_with_owners_and_modes(boot_setup):
    login = boot_setup.login
    with mounted_root(boot_setup.msdos_disk) as root:
        keys = read(root, "/root/.ssh/authorized_keys")
        shadow = read(root, "/etc/shadow")
        modes = {inner: os.lstat(os.path.join(root, inner)) for inner in
                 ("root", "root/.ssh", "root/.ssh/authorized_keys", "etc/shadow")}
    assert keys == login.public_key + "\n"
    assert f"root:{login.password_hash}:" in [ln[:ln.index(":", 5) + 1]
                                               for ln in shadow.splitlines()]
    assert {k: (oct(v.st_mode & 0o7777), v.st_uid) for k, v in modes.items()} == {
        "root": ("0o700", 0), "root/.ssh": ("0o700", 0),
        "root/.ssh/authorized_keys": ("0o600", 0), "etc/shadow": ("0o640", 0)}


def test_admin_user_is_made_with_the_keys_and_passwordless_sudo(boot_setup, tmp_path):
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, "admin.img")
    login = boot_setup.login
    run_script(boot_setup.tree, "create", create_env(
        "admin1.example.org", disk, OS_VARIANT="boot", OSP_ADMIN_USER="ops",
        OSP_SSH_AUTHORIZED_KEYS=f"{login.public_key} ; {login.public_key} second"))
    with mounted_root(disk) as root:
        passwd = read(root, "/etc/passwd")
        shadow = read(root, "/etc/shadow")
        group = read(root, "/etc/group")
        keys = read(root, "/home/ops/.ssh/authorized_keys")
        modes = {inner: os.lstat(os.path.join(root, inner)) for inner in
                 ("home/ops", "home/ops/.ssh", "home/ops/.ssh/authorized_keys",
                  "etc/sudoers.d/ganeti-instance-debootstrap")}
        # The instance's own sudo reads its rules (run on our test's copy).
        rules = subprocess.run(["chroot", root, "sudo", "-l", "-U", "ops"],
                               capture_output=True, text=True, check=True).stdout
    uid = next(int(ln.split(":")[2]) for ln in passwd.splitlines() if ln.startswith("ops:"))
    assert uid >= 1000
    assert keys == f"{login.public_key}\n{login.public_key} second\n"
    assert {k: (oct(v.st_mode & 0o7777), v.st_uid) for k, v in modes.items()} == {
        "home/ops": ("0o700", uid), "home/ops/.ssh": ("0o700", uid),
        "home/ops/.ssh/authorized_keys": ("0o600", uid),
        "etc/sudoers.d/ganeti-instance-debootstrap": ("0o440", 0)}
    fields = {ln.split(":")[0]: ln.split(":")[1] for ln in shadow.splitlines() if ln}
    assert (fields["root"], fields["ops"]) == ("*", "*")
    sudo_members = next(ln for ln in group.splitlines() if ln.startswith("sudo:"))
    assert "ops" in sudo_members.split(":")[3].split(",")
    assert "(ALL : ALL) NOPASSWD: ALL" in rules


def test_instance_boots_with_ganeti_kvm_kernel_boot_and_logs_in_on_serial(
        boot_setup, tmp_path):
    # One boot checks the console login with root's password (from the
    # password_hash parameter), the key login through a loopback-only port
    # forward, and that root's password is refused over SSH.
    port = free_port()
    (tmp_path / "ssh").mkdir()
    known_hosts = known_hosts_for(boot_setup.msdos_disk, port, tmp_path / "ssh/known_hosts")
    result = boot_and_run(
        Path(boot_setup.msdos_disk), workdir=tmp_path / "qemu", mode="kernel",
        expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT + 120,
        nic=UserNic(NIC_MAC, port), password=boot_setup.login.password,
        during=lambda: ssh_checks(boot_setup.login, port, known_hosts, tmp_path / "ssh"),
        commands=[
            "cat /etc/hostname; findmnt -no SOURCE,FSTYPE /",
            "systemctl is-enabled serial-getty@ttyS0.service",
            "systemctl is-active serial-getty@ttyS0.service",
            "cat /etc/machine-id",
            "systemctl is-system-running || true",
            "systemctl --failed --no-legend --plain",
            "cat /proc/sys/kernel/random/boot_id; ip -4 -o addr show nic0",
        ])
    _report("kernel boot (with two SSH logins)", result.seconds, result.login_seconds)
    ssh = result.during
    assert isinstance(ssh, SshOutcome)
    # The key logs root in (and the host key is the one create made).
    assert ssh.key_login.returncode == 0, ssh.key_login.stderr
    user, host, boot_id = ssh.key_login.stdout.split()
    assert (user, host) == ("root", HOSTNAME)
    # root's right password, asked for and sent, is refused over SSH.
    assert ssh.password_asked
    assert ssh.password_login.returncode == 255
    assert "Permission denied" in ssh.password_login.stderr
    console_boot_id, address = result.outputs[6].split("\n", 1)
    assert console_boot_id == boot_id  # the same machine, this boot
    assert "inet 10.0.2.15/24" in address
    assert result.outputs[0].splitlines() == [HOSTNAME, "/dev/vda1 ext4"]
    enabled, active, machine_id, state, failed = (out.strip() for out in result.outputs[1:6])
    # The unit create enabled is the one that gave the login prompt.
    assert (enabled, active) == ("enabled", "active")
    # create leaves /etc/machine-id empty; systemd made this instance's own.
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id), machine_id
    assert state in ("running", "degraded"), state
    if state == "degraded":
        warnings.warn(f"the booted instance is degraded; failed units:\n{failed}")
        sys.stderr.write(f"failed units:\n{failed}\n")
    assert (state == "running") == (failed == "")


SWAP_MIB = 256


def test_gpt_instance_boots_from_its_own_grub_with_swap_and_a_data_disk(boot_setup,
                                                                        tmp_path):
    # The same boot shows the swap partition (OS parameter swap) active and
    # the data disk (data_disks=format) mounted, both from fstab by UUID.
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, "gpt.img")
    data = scripts.sparse_disk(str(tmp_path), 256, "data1.img")
    env = create_env(HOSTNAME, disk, OS_VARIANT=GPT_VARIANT, OSP_BOOTLOADER="grub",
                     INSTANCE_HV_serial_console="True", OSP_SWAP=f"{SWAP_MIB}M",
                     OSP_DATA_DISKS="format", DISK_1_PATH=data, DISK_1_ACCESS="rw")
    run_script(boot_setup.tree, "create", {**env, "DISK_COUNT": "2"})
    table = subprocess.run(["sfdisk", "--dump", disk], capture_output=True, text=True,
                           check=True).stdout
    assert "type=21686148-6449-6E6F-744E-656564454649" in table
    # Root 1, BIOS boot 2, swap 3 (at the end of the disk).
    assert re.search(rf"(?m)^\S+3 : start=.*size= *{SWAP_MIB * 2048}, "
                     rf"type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", table), table
    # No -kernel: the BIOS runs the MBR's GRUB, which needs the BIOS boot partition.
    result = boot_and_run(Path(disk), workdir=tmp_path / "qemu", mode="disk",
                          expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT,
                          extra_disks=[Path(data)],
                          commands=["findmnt -no SOURCE /; cat /proc/cmdline",
                                    "swapon --show=NAME,TYPE,SIZE --bytes --noheadings",
                                    "findmnt -no SOURCE,FSTYPE /srv/disk1"])
    _report("GRUB boot (gpt, swap, data disk)", result.seconds, result.login_seconds)
    source, cmdline = result.outputs[0].splitlines()
    assert source == "/dev/vda1"
    # GRUB's own mark, and the serial console create configured.
    assert cmdline.startswith("BOOT_IMAGE=/vmlinuz root=UUID=")
    assert "console=ttyS0,115200" in cmdline.split()
    # All of the partition but the swap header's page.
    assert result.outputs[1].split() == ["/dev/vda3", "partition",
                                         str(SWAP_MIB * 2**20 - 4096)]
    assert result.outputs[2].split() == ["/dev/vdb", "ext4"]


@pytest.mark.parametrize("fstype,variant", [("xfs", "boot"), ("btrfs", GPT_VARIANT)])
def test_xfs_and_btrfs_roots_boot_from_their_own_grub(boot_setup, tmp_path, fstype, variant):
    """XFS on msdos (core.img after the MBR), Btrfs on gpt (the BIOS boot
    partition): GRUB reads the root with its module for the type, the
    kernel mounts it by UUID, and it fills the partition (grown image)."""
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, f"{fstype}.img")
    run_script(boot_setup.tree, "create", create_env(
        HOSTNAME, disk, OS_VARIANT=variant, OSP_BOOTLOADER="grub",
        OSP_FILESYSTEM=fstype, INSTANCE_HV_serial_console="True"))
    with mounted_root(disk) as root:
        assert f"insmod {fstype}" in read(root, "/boot/grub/grub.cfg")
    with scripts.root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
        scripts.assert_fs_clean(dev, fstype)
    result = boot_and_run(Path(disk), workdir=tmp_path / "qemu", mode="disk",
                          expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT,
                          commands=["findmnt -no FSTYPE,SOURCE /",
                                    "df -B1 --output=size / | tail -n 1",
                                    "cat /proc/cmdline",
                                    "touch /written && sync && rm /written && echo rw"])
    _report(f"GRUB boot ({fstype} root)", result.seconds, result.login_seconds)
    assert result.outputs[0].split() == [fstype, "/dev/vda1"]
    assert int(result.outputs[1]) > (DISK_MIB - 200) * 2**20, "the root fills its partition"
    assert f"root=UUID={uuid}" in result.outputs[2].split()
    assert result.outputs[3].strip() == "rw"


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
                          password=boot_setup.login.password,
                          commands=["findmnt -no SOURCE,UUID /; cat /proc/cmdline"])
    _report("GRUB boot (imported, the node's GRUB)", result.seconds, result.login_seconds)
    root, cmdline = result.outputs[0].splitlines()
    assert root.split() == ["/dev/vda1", uuid]
    assert cmdline.startswith(f"BOOT_IMAGE=/vmlinuz root=UUID={uuid} ")


EFI_VARIANT = "bootefi"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def check_efi_disk(disk: str, root_uuid: str) -> str:
    """gpt: root partition 1, ESP partition 2 (FAT) with BOOTX64.EFI; fstab entry.

    Returns the ESP's UUID.
    """
    table = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True,
                           check=True).stdout
    parts = json.loads(table)["partitiontable"]["partitions"]
    assert [p["node"][-1] for p in parts] == ["1", "2"]
    root, esp = parts
    assert root["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
    assert esp["type"] == ESP_TYPE
    assert esp["start"] == 2048 and esp["size"] == 64 * 2048
    assert root["start"] == esp["start"] + esp["size"]
    offset = f"{disk}@@{esp['start'] * 512}"
    listing = subprocess.run(["mdir", "-b", "-i", offset, "::/EFI/BOOT"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert listing.split() == ["::/EFI/BOOT/BOOTX64.EFI"]
    image = subprocess.run(["mtype", "-i", offset, "::/EFI/BOOT/BOOTX64.EFI"],
                           capture_output=True, check=True,
                           env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert image[:2] == b"MZ"  # a PE image
    esp_uuid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", "-O",
                               str(esp["start"] * 512), disk],
                              capture_output=True, text=True, check=True).stdout.strip()
    with mounted_root(disk) as mounted:
        fstab = read(mounted, "/etc/fstab")
        cfg = read(mounted, "/boot/grub/grub.cfg")
        assert os.path.isdir(os.path.join(mounted, "boot/efi"))
    assert re.search(rf"(?m)^UUID={esp_uuid}\t/boot/efi\tvfat\tumask=0077\t0\t1$", fstab)
    assert f"search --no-floppy --fs-uuid --set=root {root_uuid}" in cfg
    assert "insmod part_gpt" in cfg
    return esp_uuid


def test_grub_efi_instance_boots_under_ovmf_and_survives_export_import(
        boot_setup, tmp_path):
    tree = boot_setup.tree
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, "efi.img")
    started = time.monotonic()
    res = run_script(tree, "create", create_env(
        HOSTNAME, disk, OS_VARIANT=EFI_VARIANT, OSP_BOOTLOADER="grub-efi",
        INSTANCE_HV_serial_console="True", DEBUG_LEVEL="1"))
    sys.stderr.write(f"\ncreate (grub-efi): {time.monotonic() - started:.1f} s\n")
    # The node's GRUB builds the EFI image; nothing runs in the instance.
    log = res.stderr.decode()
    assert "running: chroot" not in log
    assert "--format=x86_64-efi" in log
    with scripts.root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    esp_uuid = check_efi_disk(disk, uuid)
    # OVMF (TCG), no -kernel: the firmware boots EFI/BOOT/BOOTX64.EFI.
    result = boot_and_run(Path(disk), workdir=tmp_path / "qemu", mode="efi",
                          expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT,
                          commands=["findmnt -no SOURCE /; cat /proc/cmdline; "
                                    "test -d /sys/firmware/efi && echo uefi; "
                                    "findmnt -no SOURCE,FSTYPE /boot/efi"])
    _report("GRUB boot (UEFI, OVMF)", result.seconds, result.login_seconds)
    source, cmdline, firmware, esp_mount = result.outputs[0].splitlines()
    assert source == "/dev/vda1"
    assert cmdline.startswith(f"BOOT_IMAGE=/vmlinuz root=UUID={uuid} ")
    assert "console=ttyS0,115200" in cmdline.split()
    assert firmware == "uefi"
    assert esp_mount.split() == ["/dev/vda2", "vfat"]

    # Export dumps the root only; import makes a new ESP and the node's image.
    dump = str(tmp_path / "dump")
    env = dict(INSTANCE_NAME=HOSTNAME, DISK_COUNT="1", OS_VARIANT=EFI_VARIANT,
               OSP_BOOTLOADER="grub-efi", INSTANCE_HV_serial_console="True")
    with open(dump, "wb") as out:
        run_script(tree, "export", scripts.ganeti_env(
            DISK_0_PATH=disk, EXPORT_INDEX="0", EXPORT_DISK_PATH=disk, **env),
            stdout=out.fileno())
    imported = scripts.sparse_disk(str(tmp_path), DISK_MIB, "efi-imported.img")
    with open(dump, "rb") as inp:
        res = run_script(tree, "import", scripts.ganeti_env(
            DISK_0_PATH=imported, IMPORT_INDEX="0", IMPORT_DISK_PATH=imported,
            DEBUG_LEVEL="1", **env), stdin=inp.fileno())
    log = res.stderr.decode()
    assert "running: chroot" not in log
    assert "--format=x86_64-efi" in log
    with scripts.root_device(imported) as dev:
        new_uuid = scripts.blkid(dev, "UUID")
    assert new_uuid != uuid
    new_esp = check_efi_disk(imported, new_uuid)
    assert new_esp != esp_uuid
    result = boot_and_run(Path(imported), workdir=tmp_path / "qemu-imported",
                          mode="efi", expect_hostname=HOSTNAME, timeout=BOOT_TIMEOUT,
                          commands=["findmnt -no SOURCE,UUID /; "
                                    "findmnt -no SOURCE /boot/efi"])
    _report("GRUB boot (UEFI, imported)", result.seconds, result.login_seconds)
    root_line, esp_line = result.outputs[0].splitlines()
    assert root_line.split() == ["/dev/vda1", new_uuid]
    assert esp_line == "/dev/vda2"


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


# --- cloud-init -----------------------------------------------------------------

CLOUD_VARIANT = "bootcloud"
# Its own cache (cloud-init brings Python and its modules): the one extra
# bootstrap this test costs, timed in the create's report line.
CLOUD_EXTRA_PKGS = "openssh-server,cloud-init"
CLOUD_HOSTNAME = "cloud1.example.org"
CLOUD_UUID = "0b5d3c1e-9a8f-4e2d-b7c6-112233445566"
USER_DATA = ("#cloud-config\n"
             "write_files:\n"
             "  - path: /root/from-user-data\n"
             "    content: 'written by cloud-init: ok'\n")


def test_cloud_init_nocloud_seed_applies_user_data_name_and_static_address(
        boot_setup, tmp_path):
    tree = boot_setup.tree
    tree.variant(CLOUD_VARIANT, f'BOOTLOADER="grub"\nEXTRA_PKGS="{CLOUD_EXTRA_PKGS}"\n')
    disk = scripts.sparse_disk(str(tmp_path), DISK_MIB, "cloud.img")
    started = time.monotonic()
    res = run_script(tree, "create", create_env(
        CLOUD_HOSTNAME, disk, OS_VARIANT=CLOUD_VARIANT, INSTANCE_HV_serial_console="True",
        INSTANCE_UUID=CLOUD_UUID, OSP_CLOUD_INIT="nocloud", DEBUG_LEVEL="1",
        OSP_USER_DATA=base64.b64encode(USER_DATA.encode()).decode(), **NIC_ENV))
    how = "bootstrapped" if "Bootstrapping" in res.stderr.decode() else "from the cache"
    sys.stderr.write(f"\ncreate of the cloud-init instance ({how}): "
                     f"{time.monotonic() - started:.1f} s\n")
    assert "write_files" not in res.stderr.decode()  # user data is not logged
    result = boot_and_run(
        Path(disk), workdir=tmp_path / "qemu", mode="kernel",
        expect_hostname=CLOUD_HOSTNAME, timeout=BOOT_TIMEOUT + 180,
        nic=UserNic(NIC_MAC, free_port()), check=False, commands=[
            "cloud-init status --wait --long",
            "cat /root/from-user-data; echo",
            "hostname; cat /etc/hostname; cat /var/lib/cloud/data/instance-id",
            "ip -4 -o addr show nic0; ip -4 route show default",
            "grep -c nic0 /etc/network/interfaces || true; "
            "ls /etc/network/interfaces.d /etc/systemd/network",
            "systemctl --failed --no-legend --plain",
        ])
    _report("kernel boot with cloud-init", result.seconds, result.login_seconds)
    status, written, names, address, files, failed = result.outputs
    # Done without errors; exit status 2 ("degraded done") only for the
    # deprecation notice of gateway4/gateway6 (see cloudinit.network_config).
    assert result.statuses[0] in (0, 2), status
    assert re.search(r"(?m)^status: done$", status), status
    assert re.search(r"(?m)^errors: \[\]$", status), status
    recoverable = re.findall(r"(?m)^\t- (.*)$", status)
    assert all("`gateway4` and `gateway6` is deprecated" in line for line in recoverable), status
    assert result.statuses[1:] == (0, 0, 0, 0, 0), result.outputs
    assert written.strip() == "written by cloud-init: ok"
    # cloud-init applied the same name create wrote: no fight over it.
    assert names.split() == [CLOUD_HOSTNAME, CLOUD_HOSTNAME, CLOUD_UUID]
    assert "inet 10.0.2.15/24" in address and "default via 10.0.2.2 dev nic0" in address
    # Ours: the loopback only; cloud-init's own file configures nic0.
    assert files.split("\n", 1)[0] == "0", files
    assert "50-cloud-init" in files and "10-ganeti-" not in files
    assert failed.strip() == "", failed
