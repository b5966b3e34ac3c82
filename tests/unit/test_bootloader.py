"""GRUB for grub-booted instances: packages, disk layout, configuration, install."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from ganeti_debootstrap import blockdev, bootloader, osparams, partitions, settings
from ganeti_debootstrap.bootloader import SerialConsole
from ganeti_debootstrap.environment import Request
from ganeti_debootstrap.errors import CommandError, ConfigError, DiskError
from ganeti_debootstrap.settings import PartitionStyle, Settings
from ganeti_debootstrap.target import Target

MIB = 1024 * 1024
DISK = 600 * MIB
SECTORS = DISK // 512
UUID = "0b9ba4b5-8d0e-4f55-b6c1-1b1f0f7c2a11"


def request(**hv: str) -> Request:
    return Request(script="create", api_version=20, instance_name="vm1.example.org",
                   hypervisor=hv.pop("hypervisor", "kvm"), hv_params=hv)


# --- settings, OS parameter and packages ------------------------------------

def test_bootloader_setting_defaults_to_none_and_refuses_other_values():
    assert settings.validate({}, ["defaults"], 20).bootloader == "none"
    assert settings.validate({"BOOTLOADER": "grub"}, ["defaults"], 20).bootloader == "grub"
    with pytest.raises(ConfigError, match="BOOTLOADER.*'lilo' must be one of none, grub"):
        settings.validate({"BOOTLOADER": "lilo"}, ["defaults"], 20)


def test_bootloader_os_parameter_is_declared_and_checked():
    assert "bootloader" in osparams.parameters_list()
    assert osparams.validate({}).bootloader == ""
    assert osparams.validate({"bootloader": "grub"}).bootloader == "grub"
    with pytest.raises(ConfigError, match="bootloader='lilo'.*none, grub"):
        osparams.validate({"bootloader": "lilo"})


def test_grub_adds_the_kernel_and_grub_pc_to_the_bootstrap():
    conf = bootloader.resolve(Settings(bootloader="grub", extra_pkgs=("less",)), "", "amd64")
    assert conf.bootloader == "grub"
    assert conf.extra_pkgs == ("less", "linux-image-amd64", "grub-pc")


def test_i386_gets_the_pae_kernel():
    assert bootloader.packages("i386") == ("linux-image-686-pae", "grub-pc")


def test_packages_already_in_extra_pkgs_are_not_repeated():
    conf = bootloader.resolve(Settings(bootloader="grub", extra_pkgs=("grub-pc",)), "", "amd64")
    assert conf.extra_pkgs == ("grub-pc", "linux-image-amd64")


def test_os_parameter_overrides_the_setting_both_ways():
    on = bootloader.resolve(Settings(), "grub", "amd64")
    assert on.bootloader == "grub" and "grub-pc" in on.extra_pkgs
    off = bootloader.resolve(Settings(bootloader="grub", extra_pkgs=("less",)), "none", "amd64")
    assert off.bootloader == "none" and off.extra_pkgs == ("less",)


def test_no_bootloader_changes_no_package():
    conf = Settings(extra_pkgs=("less",))
    assert bootloader.resolve(conf, "", "amd64") == conf


def test_grub_without_partition_table_is_refused_naming_both_settings():
    conf = Settings(bootloader="grub", partition_style="none", sources=("/etc/x",))
    with pytest.raises(ConfigError, match="BOOTLOADER=grub.*/etc/x.*PARTITION_STYLE=none"):
        bootloader.resolve(conf, "", "amd64")


def test_grub_on_an_architecture_without_grub_pc_is_refused():
    with pytest.raises(ConfigError, match="ARCH=arm64"):
        bootloader.resolve(Settings(bootloader="grub"), "", "arm64")


@pytest.mark.parametrize("style", ["msdos", "gpt"])
def test_alignment_too_small_for_grub_is_refused_before_any_bootstrap(style):
    with pytest.raises(DiskError, match="PARTITION_ALIGNMENT=64 .*GRUB.*at least"):
        bootloader.resolve(Settings(bootloader="grub", partition_style=style,
                                    partition_alignment=64), "", "amd64")


# --- the disk layout --------------------------------------------------------------

@pytest.fixture
def sector_size(monkeypatch):
    monkeypatch.setattr(blockdev, "logical_sector_size", lambda dev: 512)


def test_gpt_with_grub_gets_a_bios_boot_partition_in_the_gap():
    layout = partitions.plan("gpt", 2048, DISK, boot_area=True)
    assert (layout.start_sector, layout.start_sector + layout.size_sectors) == (2048, SECTORS - 33)
    assert (layout.boot_start_sector, layout.boot_size_sectors) == (34, 2014)


def test_bios_boot_partition_is_listed_second_so_the_root_stays_partition_1():
    layout = partitions.plan("gpt", 2048, DISK, boot_area=True)
    lines = partitions.sfdisk_script(layout, "amd64").splitlines()
    assert lines[-2] == (f"start=2048, size={SECTORS - 33 - 2048}, "
                         "type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")
    assert lines[-1] == "start=34, size=2014, type=21686148-6449-6E6F-744E-656564454649"


def test_bios_boot_partition_on_4k_sectors_fills_the_gap():
    layout = partitions.plan("gpt", 2048, DISK, sector_size=4096, boot_area=True)
    assert (layout.boot_start_sector, layout.boot_size_sectors) == (6, 250)


def test_msdos_with_grub_keeps_one_partition_grub_uses_the_gap():
    layout = partitions.plan("msdos", 2048, DISK, boot_area=True)
    assert layout == partitions.plan("msdos", 2048, DISK)
    assert "type=83, bootable" in partitions.sfdisk_script(layout)
    assert partitions.sfdisk_script(layout).count("start=") == 1


def test_gpt_without_grub_has_no_bios_boot_partition():
    script = partitions.sfdisk_script(partitions.plan("gpt", 2048, DISK), "amd64")
    assert partitions.GPT_BIOS_BOOT not in script


@pytest.mark.parametrize("style,alignment,smallest", [("msdos", 64, 296), ("gpt", 100, 328)])
def test_alignment_leaving_too_little_for_grub_names_the_smallest(style, alignment, smallest):
    with pytest.raises(DiskError, match=f"at least {smallest}"):
        partitions.plan(style, alignment, DISK, boot_area=True)
    # The smallest one named is accepted.
    partitions.plan(style, smallest, DISK, boot_area=True)


def test_grub_layout_is_refused_before_anything_is_written(fake_runner, sector_size):
    with pytest.raises(DiskError):
        partitions.write_table("/dev/loop0", "gpt", 64, DISK, "amd64", boot_area=True)
    assert fake_runner.calls == []


def test_write_table_writes_the_bios_boot_partition(fake_runner, sector_size):
    fake_runner.expect("wipefs")
    fake_runner.expect("sfdisk")
    partitions.write_table("/dev/loop0", "gpt", 2048, DISK, "amd64", boot_area=True)
    assert partitions.GPT_BIOS_BOOT in fake_runner.stdins[1].decode()


def gpt_json(parts: list[tuple[int, int, str]]) -> str:
    return json.dumps({"partitiontable": {
        "label": "gpt", "device": "/dev/loop0", "unit": "sectors", "sectorsize": 512,
        "partitions": [{"node": f"/dev/loop0p{i + 1}", "start": start, "size": size,
                        "type": kind} for i, (start, size, kind) in enumerate(parts)]}})


def test_root_is_found_with_the_bios_boot_partition_before_it_on_disk(fake_runner):
    fake_runner.expect("blkid", stdout="gpt\n")
    fake_runner.expect("sfdisk", "--json", stdout=gpt_json([
        (2048, 1224671, partitions.gpt_root_type("amd64")),
        (34, 2014, partitions.GPT_BIOS_BOOT)]))
    assert partitions.read_layout("/dev/loop0") == partitions.Layout("gpt", 2048, 1224671)


def test_a_bios_boot_partition_1_is_not_taken_for_the_root(fake_runner):
    fake_runner.expect("blkid", stdout="gpt\n")
    fake_runner.expect("sfdisk", "--json", stdout=gpt_json([
        (34, 2014, partitions.GPT_BIOS_BOOT.lower()),
        (2048, 1224671, partitions.gpt_root_type("amd64"))]))
    with pytest.raises(DiskError, match="Partition 1 of /dev/loop0 is a BIOS boot"):
        partitions.read_layout("/dev/loop0")


# --- what the instance sees ---------------------------------------------------------

def test_serial_console_uses_ganeti_serial_speed_or_115200():
    assert bootloader.serial_console(request(serial_console="True", serial_speed="38400")) \
        == SerialConsole("ttyS0", "38400")
    assert bootloader.serial_console(request(serial_console="True")) == SerialConsole("ttyS0")
    assert bootloader.serial_console(request(serial_console="False")) is None
    # Digits that are not ASCII ("¹", "٣") are not a speed.
    for odd in ("\u00b9", "\u0663", "fast", "-9600"):
        assert bootloader.serial_console(request(serial_console="True", serial_speed=odd)) \
            == SerialConsole("ttyS0")


def test_xen_pv_console_has_no_speed_and_no_grub_serial():
    console = bootloader.serial_console(request(hypervisor="xen-pvm"))
    assert console is not None
    assert console.kernel_args() == "console=tty0 console=hvc0"
    assert not console.is_uart


@pytest.mark.parametrize("hypervisor,disk_type,device", [
    ("kvm", "", "/dev/vda"), ("kvm", "paravirtual", "/dev/vda"),
    ("kvm", "scsi", "/dev/sda"), ("kvm", "ide", "/dev/sda"), ("kvm", "scsi-hd", "/dev/sda"),
    ("xen-hvm", "paravirtual", "/dev/xvda"), ("xen-pvm", "", "/dev/xvda"),
])
def test_install_device_inside_the_instance_follows_the_disk_type(hypervisor, disk_type, device):
    hv = {"disk_type": disk_type} if disk_type else {}
    assert bootloader.instance_disk_name(request(hypervisor=hypervisor, **hv)) == device


# --- configuration text ---------------------------------------------------------------

@pytest.mark.parametrize("style,module", [("msdos", "part_msdos"), ("gpt", "part_gpt")])
def test_grub_cfg_finds_the_root_by_uuid_through_the_partition_table(style, module):
    text = bootloader.grub_cfg_text(root_uuid=UUID, style=style, console=None)
    assert f"insmod {module}\ninsmod ext2\n" in text
    entry = text[text.index("menuentry 'Debian GNU/Linux' {"):]
    assert f"\tsearch --no-floppy --fs-uuid --set=root {UUID}\n" in entry
    assert f"\tlinux /vmlinuz root=UUID={UUID} ro\n" in entry
    assert "\tinitrd /initrd.img\n" in entry
    assert entry.rstrip().endswith("}")
    assert "serial" not in text and "console=" not in text
    bootloader.check_config(text)


def test_grub_cfg_with_serial_console_drives_grub_and_kernel_on_it():
    text = bootloader.grub_cfg_text(root_uuid=UUID, style="msdos",
                                    console=SerialConsole("ttyS0", "38400"))
    assert ("serial --unit=0 --speed=38400\nterminal_input serial console\n"
            "terminal_output serial console\n") in text
    assert f"linux /vmlinuz root=UUID={UUID} ro console=tty0 console=ttyS0,38400\n" in text


def test_menu_title_is_quoted_for_grub():
    text = bootloader.grub_cfg_text(root_uuid=UUID, style="gpt", console=None,
                                    title="Debian 'sid'")
    assert "menuentry 'Debian '\\''sid'\\''' {" in text


def test_defaults_dropin_gives_update_grub_the_console():
    text = bootloader.grub_defaults_text(SerialConsole("ttyS0", "115200"))
    assert ('GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX console=tty0 '
            'console=ttyS0,115200"\n') in text
    assert 'GRUB_TERMINAL="serial console"\n' in text
    assert 'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n' in text


@pytest.mark.parametrize("text", [
    "set timeout=5\n# menuentry in a comment\n",
    # What update-grub writes on a UEFI node when it skips the kernel.
    "menuentry 'UEFI Firmware Settings' $menuentry_id_option 'uefi-firmware' {\n"
    "\tfwsetup\n}\n",
])
def test_configuration_without_an_entry_booting_linux_is_refused(text):
    with pytest.raises(bootloader.BootloaderError, match="no menu entry booting Linux"):
        bootloader.check_config(text)


# --- installing, with the fake runner -------------------------------------------------

def make_tree(root: Path, *, kernel: bool = True, grub: bool = True) -> Target:
    (root / "usr/sbin").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n')
    if grub:
        (root / "usr/sbin/grub-install").write_text("")
    if kernel:
        (root / "boot/vmlinuz-6.12.1-amd64").write_text("")
        (root / "boot/initrd.img-6.12.1-amd64").write_text("")
        os.symlink("boot/vmlinuz-6.12.1-amd64", root / "vmlinuz")
        os.symlink("boot/initrd.img-6.12.1-amd64", root / "initrd.img")
    return Target(str(root))


def grub_settings(style: PartitionStyle = "msdos") -> Settings:
    return Settings(bootloader="grub", partition_style=style)


@pytest.mark.parametrize("style,module", [("msdos", "part_msdos"), ("gpt", "part_gpt")])
def test_grub_is_installed_from_inside_the_instance_on_the_whole_disk(
        fake_runner, tmp_path, style, module):
    t = make_tree(tmp_path / "root")
    fake_runner.expect("mount")
    fake_runner.expect("chroot")
    assert bootloader.install(t, request(serial_console="True"), grub_settings(style),
                              disk_device="/dev/loop3", root_uuid=UUID)
    root = t.root
    assert fake_runner.commands() == [
        f"mount -t proc -o nosuid,nodev,noexec proc {root}/proc",
        f"mount -t sysfs -o nosuid,nodev,noexec sysfs {root}/sys",
        f"mount --bind --make-private /dev {root}/dev",
        f"mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=666 devpts {root}/dev/pts",
        f"chroot {root} debconf-set-selections",
        f"chroot {root} grub-install --target=i386-pc --modules={module} ext2 /dev/loop3",
    ]
    assert fake_runner.calls[-1][-2:] == (f"--modules={module} ext2", "/dev/loop3")
    assert fake_runner.stdins[4] == b"grub-pc grub-pc/install_devices multiselect /dev/vda\n"
    cfg = t.read_text("/boot/grub/grub.cfg")
    assert cfg == bootloader.grub_cfg_text(
        root_uuid=UUID, style=style, console=SerialConsole("ttyS0"),
        title="Debian GNU/Linux 13 (trixie)")
    assert "console=ttyS0,115200" in t.read_text(bootloader.GRUB_DEFAULTS_DROPIN)


def test_kernel_links_in_boot_are_preferred(fake_runner, tmp_path):
    t = make_tree(tmp_path / "root")
    os.symlink("vmlinuz-6.12.1-amd64", tmp_path / "root/boot/vmlinuz")
    os.symlink("initrd.img-6.12.1-amd64", tmp_path / "root/boot/initrd.img")
    fake_runner.expect("mount")
    fake_runner.expect("chroot")
    bootloader.install(t, request(), grub_settings(), disk_device="/dev/loop3", root_uuid=UUID)
    cfg = t.read_text("/boot/grub/grub.cfg")
    assert "\tlinux /boot/vmlinuz root=" in cfg and "\tinitrd /boot/initrd.img\n" in cfg
    # No serial console: no console settings for update-grub either.
    assert not t.exists(bootloader.GRUB_DEFAULTS_DROPIN)


def test_nothing_runs_without_grub(fake_runner, tmp_path):
    t = make_tree(tmp_path / "root")
    assert not bootloader.install(t, request(), Settings(), disk_device="/dev/loop3",
                                  root_uuid=UUID)
    assert fake_runner.calls == []
    assert not t.exists("/boot/grub/grub.cfg")


def test_failed_grub_install_fails_with_its_output_and_writes_no_config(fake_runner, tmp_path):
    t = make_tree(tmp_path / "root")
    fake_runner.expect("mount")
    fake_runner.expect("chroot")
    fake_runner.expect("chroot", t.root, "grub-install", returncode=1,
                       stderr="grub-install: error: embedding is not possible")
    with pytest.raises(CommandError, match="embedding is not possible(.|\n)*BOOTLOADER=none"):
        bootloader.install(t, request(), grub_settings(), disk_device="/dev/loop3",
                           root_uuid=UUID)
    assert fake_runner.commands()[-1].startswith(f"chroot {t.root} grub-install")
    assert not t.exists("/boot/grub/grub.cfg")


@pytest.mark.parametrize("kernel,grub,missing", [
    (False, True, "a kernel"), (True, False, r"GRUB \(grub-pc"),
])
def test_system_without_kernel_or_grub_is_refused_at_create(fake_runner, tmp_path,
                                                            kernel, grub, missing):
    t = make_tree(tmp_path / "root", kernel=kernel, grub=grub)
    with pytest.raises(bootloader.BootloaderError, match=f"lacks {missing}.*remove it"):
        bootloader.install(t, request(), grub_settings(), disk_device="/dev/loop3",
                           root_uuid=UUID)
    assert fake_runner.calls == []


def test_config_emptied_by_update_grub_in_a_hook_is_written_again(tmp_path, caplog):
    t = make_tree(tmp_path / "root")
    t.write_text("/boot/grub/grub.cfg", "### BEGIN /etc/grub.d/10_linux ###\n### END\n")
    assert bootloader.repair_config(t, request(), grub_settings(), UUID)
    assert t.read_text("/boot/grub/grub.cfg") == bootloader.grub_cfg_text(
        root_uuid=UUID, style="msdos", console=None, title="Debian GNU/Linux 13 (trixie)")
    assert "no entry booting Linux" in caplog.text


def test_config_a_hook_changed_but_kept_bootable_is_left_alone(tmp_path):
    t = make_tree(tmp_path / "root")
    site = "menuentry 'site' {\n\tlinux /vmlinuz root=/dev/vda1\n}\n"
    t.write_text("/boot/grub/grub.cfg", site)
    assert not bootloader.repair_config(t, request(), grub_settings(), UUID)
    assert t.read_text("/boot/grub/grub.cfg") == site
    assert not bootloader.repair_config(t, request(), Settings(), UUID)


# --- import: the node's GRUB, the instance as data -----------------------------------

CORE = b"core.img built by the node's grub-mkimage"
# What a real i386-pc directory holds: what grub-install copies, and what it does not.
NODE_COPIED = ("boot.img", "normal.mod", "linux.mod", "part_msdos.mod", "command.lst",
               "moddep.lst", "modinfo.sh", "efiemu32.o")
NODE_NOT_COPIED = ("kernel.img", "lzma_decompress.img", "diskboot.img", "config.h",
                   "grub-bios-setup")
DEBCONF = "/var/cache/debconf/config.dat"
OTHER_RECORDS = ("Name: debconf/frontend\nTemplate: debconf/frontend\nValue: Dialog\n"
                 "Owners: debconf\nFlags: seen\n\n"
                 "Name: tzdata/Areas\nTemplate: tzdata/Areas\nValue: Etc\n"
                 "Owners: tzdata\nFlags: seen\nVariables:\n zone = UTC\n\n")


@pytest.fixture
def node_grub(tmp_path, monkeypatch) -> bootloader.NodeGrub:
    """A stand-in for the node's grub-pc-bin and grub-mkimage."""
    modules = tmp_path / "node-grub/i386-pc"
    modules.mkdir(parents=True)
    for name in NODE_COPIED + NODE_NOT_COPIED:
        (modules / name).write_bytes(f"node {name}".encode())
    mkimage = tmp_path / "node-grub/grub-mkimage"
    mkimage.write_text("")
    for program in (mkimage, modules / "grub-bios-setup"):
        program.chmod(0o755)
    monkeypatch.setattr(bootloader, "NODE_GRUB_MODULES", str(modules))
    monkeypatch.setattr(bootloader, "NODE_GRUB_MKIMAGE", str(mkimage))
    monkeypatch.setattr(bootloader, "NODE_GRUB_BIOS_SETUP", str(modules / "grub-bios-setup"))
    grub = bootloader.node_grub()
    assert grub is not None
    return grub


class FakeMkimage:
    """grub-mkimage's part in the fake runner: writes core.img, keeps its config."""

    def __init__(self) -> None:
        self.config = ""

    def __call__(self, argv) -> None:
        options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
        with open(options["config"]) as f:
            self.config = f.read()
        with open(options["output"], "wb") as f:
            f.write(CORE)


def expect_node_grub(fake_runner, grub: bootloader.NodeGrub) -> FakeMkimage:
    mkimage = FakeMkimage()
    fake_runner.expect(grub.mkimage, action=mkimage)
    fake_runner.expect(grub.bios_setup)
    return mkimage


def import_install(t: Target, style: PartitionStyle = "msdos", **hv: str) -> bool:
    return bootloader.install_from_node(t, request(**hv), grub_settings(style),
                                        disk_device="/dev/loop3", root_uuid=UUID)


def with_debconf(t: Target, text: str) -> Target:
    os.makedirs(os.path.join(t.root, "var/cache/debconf"))
    with open(os.path.join(t.root, DEBCONF[1:]), "w") as f:
        f.write(text)
    return t


def tree_listing(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below ``path`` with its mode, mtime and content (files)."""
    found = {}
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        data = entry.read_bytes() if entry.is_file() and not entry.is_symlink() else b""
        found[str(entry.relative_to(path))] = (st.st_mode, st.st_mtime_ns, data)
    return found


@pytest.mark.parametrize("style,module", [("msdos", "part_msdos"), ("gpt", "part_gpt")])
def test_import_puts_the_node_grub_on_the_disk_and_runs_nothing_of_the_instance(
        fake_runner, node_grub, tmp_path, style, module):
    t = with_debconf(make_tree(tmp_path / "root"), OTHER_RECORDS)
    mkimage = expect_node_grub(fake_runner, node_grub)
    assert import_install(t, style, serial_console="True")
    platform = f"{t.root}/boot/grub/i386-pc"
    workdir = os.path.dirname(fake_runner.calls[0][3].partition("=")[2])
    mapdir = os.path.dirname(fake_runner.calls[1][1].partition("=")[2])
    assert fake_runner.commands() == [
        f"{node_grub.mkimage} --format=i386-pc --directory={node_grub.modules} "
        f"--config={workdir}/load.cfg --prefix=/boot/grub --output={workdir}/core.img "
        f"biosdisk {module} ext2 search_fs_uuid",
        f"{node_grub.bios_setup} --device-map={mapdir}/device.map --directory={platform} "
        f"(hd0)",
    ]
    # Node programs only, fed nothing; the private work directories are gone.
    assert not any("chroot" in c or c.startswith(t.root) for c in fake_runner.commands())
    assert fake_runner.stdins == [None, None]
    assert not os.path.exists(workdir) and not os.path.exists(mapdir)
    assert mkimage.config == f"search.fs_uuid {UUID} root\nset prefix=($root)/boot/grub\n"
    # The modules and core.img, as grub-install would leave them.
    assert sorted(os.listdir(platform)) == sorted(NODE_COPIED + ("core.img",))
    for name in NODE_COPIED:
        assert Path(platform, name).read_bytes() == f"node {name}".encode()
    assert Path(platform, "core.img").read_bytes() == CORE
    assert t.read_text("/boot/grub/grub.cfg") == bootloader.grub_cfg_text(
        root_uuid=UUID, style=style, console=SerialConsole("ttyS0"),
        title="Debian GNU/Linux 13 (trixie)")
    assert "console=ttyS0,115200" in t.read_text(bootloader.GRUB_DEFAULTS_DROPIN)
    assert t.read_text(DEBCONF) == OTHER_RECORDS + (
        "Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
        "Value: /dev/vda\nOwners: grub-pc\nFlags: seen\n\n")


def test_import_replaces_old_modules_and_planted_links_in_the_platform_directory(
        fake_runner, node_grub, tmp_path):
    t = make_tree(tmp_path / "root")
    platform = tmp_path / "root/boot/grub/i386-pc"
    platform.mkdir(parents=True)
    (platform / "old-only.mod").write_bytes(b"GRUB 2.02")
    (platform / "normal.mod").write_bytes(b"GRUB 2.02")
    (platform / "notes.txt").write_text("the tenant's\n")
    node_file = tmp_path / "node-secret"
    node_file.write_text("node\n")
    os.symlink(str(node_file), platform / "linux.mod")
    os.symlink("../../../../../../node-secret", platform / "core.img")
    expect_node_grub(fake_runner, node_grub)
    assert import_install(t)
    assert node_file.read_text() == "node\n"
    assert not (platform / "old-only.mod").exists()
    assert (platform / "notes.txt").read_text() == "the tenant's\n"
    for name in ("normal.mod", "linux.mod", "core.img"):
        assert not (platform / name).is_symlink()
    assert (platform / "linux.mod").read_bytes() == b"node linux.mod"
    assert (platform / "core.img").read_bytes() == CORE


@pytest.mark.parametrize("link", ["absolute", "relative", "platform"])
def test_import_with_grub_directories_linked_at_the_node_writes_inside_the_instance(
        fake_runner, node_grub, tmp_path, link):
    # Each link, joined naively to the instance's root, is the node's node-etc.
    node_dir = tmp_path / "node-etc"
    node_dir.mkdir()
    (node_dir / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    before = tree_listing(node_dir)
    t = make_tree(tmp_path / "root")
    if link == "absolute":
        os.symlink(str(node_dir), tmp_path / "root/boot/grub")
        grub_dir = tmp_path / f"root/{str(node_dir).lstrip('/')}"
        platform = grub_dir / "i386-pc"
    elif link == "relative":
        os.symlink("../../node-etc", tmp_path / "root/boot/grub")
        grub_dir = tmp_path / "root/node-etc"
        platform = grub_dir / "i386-pc"
    else:
        (tmp_path / "root/boot/grub").mkdir()
        os.symlink("../../../node-etc", tmp_path / "root/boot/grub/i386-pc")
        grub_dir = tmp_path / "root/boot/grub"
        platform = tmp_path / "root/node-etc"
    expect_node_grub(fake_runner, node_grub)
    assert import_install(t)
    assert tree_listing(node_dir) == before
    assert (grub_dir / "grub.cfg").is_file() and (platform / "core.img").is_file()
    assert fake_runner.calls[-1][-2:] == (f"--directory={platform}", "(hd0)")


def test_import_where_grub_directory_is_a_file_goes_on_without_grub(
        fake_runner, node_grub, tmp_path, caplog):
    t = make_tree(tmp_path / "root")
    (tmp_path / "root/boot/grub").write_text("not a directory\n")
    assert not import_install(t)
    assert fake_runner.calls == []
    assert (tmp_path / "root/boot/grub").read_text() == "not a directory\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "/boot/grub in the instance is a regular file" in warnings[0]
    assert "kernel_path" in warnings[0]


def test_import_on_a_node_without_grub_pc_bin_goes_on_with_one_warning(
        fake_runner, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(bootloader, "NODE_GRUB_MODULES", str(tmp_path / "no-grub"))
    t = make_tree(tmp_path / "root")
    assert bootloader.node_grub() is None
    assert not import_install(t)
    assert fake_runner.calls == []
    assert not t.exists("/boot/grub")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "Install grub-pc-bin on the node and import again" in warnings[0]
    assert "kernel_path" in warnings[0]


def test_imported_system_without_kernel_is_left_to_kernel_path(
        fake_runner, node_grub, tmp_path, caplog):
    t = make_tree(tmp_path / "root", kernel=False, grub=False)
    assert not import_install(t)
    assert fake_runner.calls == []
    assert "lacks a kernel" in caplog.text and "kernel_path" in caplog.text


def test_imported_system_without_its_own_grub_gets_the_node_one(
        fake_runner, node_grub, tmp_path):
    t = make_tree(tmp_path / "root", grub=False)
    expect_node_grub(fake_runner, node_grub)
    assert import_install(t)


def test_import_names_the_disk_to_grub_bios_setup_as_a_plain_drive_of_its_device_map(
        fake_runner, node_grub, tmp_path):
    # Given /dev/VG/LV itself, grub-bios-setup sees GRUB's LVM device and
    # refuses to write it ("diskfilter writes are not supported", on a node
    # VM): the disk is (hd0) of a device map naming the kernel's device.
    dm = tmp_path / "dev" / "dm-3"
    dm.parent.mkdir()
    dm.write_text("")
    lv = tmp_path / "dev" / "vg" / "instance-disk0"
    lv.parent.mkdir()
    lv.symlink_to("../dm-3")
    seen = []

    def bios_setup(argv):
        options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
        seen.append((argv[-1], Path(options["device-map"]).read_text()))

    expect_node_grub(fake_runner, node_grub)
    fake_runner.expect(node_grub.bios_setup, action=bios_setup)
    t = make_tree(tmp_path / "root")
    assert bootloader.install_from_node(t, request(), grub_settings("msdos"),
                                        disk_device=str(lv), root_uuid=UUID)
    assert seen == [("(hd0)", f"(hd0)\t{dm}\n")]


def test_failed_grub_bios_setup_fails_the_import_with_its_output(
        fake_runner, node_grub, tmp_path):
    t = make_tree(tmp_path / "root")
    expect_node_grub(fake_runner, node_grub)
    fake_runner.expect(node_grub.bios_setup, returncode=1,
                       stderr="error: embedding is not possible")
    with pytest.raises(CommandError, match="embedding is not possible(.|\n)*kernel_path"):
        import_install(t)


@pytest.mark.parametrize("where", ["/boot/grub/grub.cfg", "/etc/default"])
def test_grub_files_that_cannot_be_written_leave_the_disk_without_boot_code(
        fake_runner, node_grub, tmp_path, caplog, where):
    t = make_tree(tmp_path / "root")
    if where.endswith(".cfg"):
        os.makedirs(t.root + where)  # a directory where grub.cfg goes
    else:
        Path(t.root + where).write_text("a file where a directory belongs\n")
    mkimage = FakeMkimage()
    fake_runner.expect(node_grub.mkimage, action=mkimage)
    assert not import_install(t, serial_console="True")
    # grub-mkimage ran (on the node), grub-bios-setup did not.
    assert [c[0] for c in fake_runner.calls] == [node_grub.mkimage]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and where in warnings[0] and "kernel_path" in warnings[0]


def test_nothing_is_installed_at_import_without_grub(fake_runner, node_grub, tmp_path):
    t = make_tree(tmp_path / "root")
    assert not bootloader.install_from_node(t, request(), Settings(),
                                            disk_device="/dev/loop3", root_uuid=UUID)
    assert fake_runner.calls == [] and not t.exists("/boot/grub")


# --- grub-pc's debconf answer, edited as text ------------------------------------------

GRUB_RECORD = ("Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
               "Value: /dev/disk/by-id/ata-OLD_DISK\nOwners: grub-pc\n"
               "Flags: seen\nVariables:\n name = x\n\n")


def test_debconf_answer_replaces_the_old_one_and_keeps_every_other_record():
    text = OTHER_RECORDS + GRUB_RECORD + "Name: zz/last\nTemplate: zz/last\nValue: 1\n\n"
    assert bootloader.set_install_devices(text, "/dev/vda") == text.replace(
        "Value: /dev/disk/by-id/ata-OLD_DISK", "Value: /dev/vda")


def test_debconf_answer_gets_owner_and_seen_flag_like_debconf_set_selections():
    text = ("Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
            "Owners: other\n\n")
    assert bootloader.set_install_devices(text, "/dev/sda") == (
        "Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
        "Value: /dev/sda\nOwners: other, grub-pc\nFlags: seen\n\n")


def test_debconf_answer_is_added_to_an_empty_database():
    assert bootloader.set_install_devices("", "/dev/xvda") == (
        "Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
        "Value: /dev/xvda\nOwners: grub-pc\nFlags: seen\n\n")


def test_debconf_database_is_rewritten_with_its_mode(tmp_path):
    t = with_debconf(make_tree(tmp_path / "root"), OTHER_RECORDS + GRUB_RECORD)
    os.chmod(os.path.join(t.root, DEBCONF[1:]), 0o600)
    assert bootloader.record_install_devices(t, "/dev/vda")
    assert "Value: /dev/vda\n" in t.read_text(DEBCONF)
    assert os.stat(os.path.join(t.root, DEBCONF[1:])).st_mode & 0o7777 == 0o600


def test_missing_debconf_database_is_not_made(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    t = make_tree(tmp_path / "root")
    assert not bootloader.record_install_devices(t, "/dev/vda")
    assert not t.exists(DEBCONF)
    assert "no debconf database" in caplog.text


@pytest.mark.parametrize("kind", ["fifo", "symlink", "huge", "directory", "binary"])
def test_hostile_debconf_database_is_left_alone_with_a_warning(tmp_path, caplog, kind):
    t = make_tree(tmp_path / "root")
    path = tmp_path / "root/var/cache/debconf/config.dat"
    path.parent.mkdir(parents=True)
    node_file = tmp_path / "node-config"
    node_file.write_text(GRUB_RECORD)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink(str(node_file), path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(bootloader.DEBCONF_LIMIT + 1)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"Name: \xff\xfe\n\n")
    before = tree_listing(tmp_path / "root/var")
    assert not bootloader.record_install_devices(t, "/dev/vda")
    assert tree_listing(tmp_path / "root/var") == before
    assert node_file.read_text() == GRUB_RECORD
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and DEBCONF in warnings[0] and "left alone" in warnings[0]


@pytest.mark.parametrize("kind", ["fifo", "huge", "control"])
def test_hostile_os_release_gives_the_generic_title(tmp_path, kind):
    t = make_tree(tmp_path / "root")
    path = tmp_path / "root/etc/os-release"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        path.write_text('PRETTY_NAME="big"\n' + "#" * bootloader.OS_RELEASE_LIMIT)
    else:
        path.write_text('PRETTY_NAME="Debian\x1b[2J"\n')
    assert bootloader.os_title(t) == "Debian GNU/Linux"


@pytest.mark.parametrize("fstype,module", [("ext3", "ext2"), ("xfs", "xfs"),
                                           ("btrfs", "btrfs")])
def test_grub_reads_each_root_type_with_its_own_module(fake_runner, tmp_path, fstype,
                                                       module):
    t = make_tree(tmp_path / "root")
    fake_runner.expect("mount")
    fake_runner.expect("chroot")
    assert bootloader.install(t, request(), grub_settings("gpt"), disk_device="/dev/loop3",
                              root_uuid=UUID, fstype=fstype)
    assert fake_runner.calls[-1][-2:] == (f"--modules=part_gpt {module}", "/dev/loop3")
    cfg = t.read_text("/boot/grub/grub.cfg")
    assert cfg.count(f"insmod {module}\n") == 2  # before the search, and in the entry
    assert bootloader.core_modules("msdos", fstype) == (
        "biosdisk", "part_msdos", module, "search_fs_uuid")
    assert {"xfs", "btrfs", "ext2"} <= set(bootloader.EFI_MODULES)
