"""GRUB for grub-booted instances: packages, disk layout, configuration, install."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ganeti_debootstrap import blockdev, bootloader, osparams, partitions, settings
from ganeti_debootstrap.bootloader import SerialConsole
from ganeti_debootstrap.environment import Request
from ganeti_debootstrap.errors import CommandError, ConfigError, DiskError
from ganeti_debootstrap.settings import Settings
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


@pytest.mark.parametrize("style,alignment,smallest", [("msdos", 64, 136), ("gpt", 100, 168)])
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


def grub_settings(style: str = "msdos") -> Settings:
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


def test_imported_system_without_grub_is_left_to_kernel_path(fake_runner, tmp_path, caplog):
    t = make_tree(tmp_path / "root", grub=False)
    assert not bootloader.install(t, request(), grub_settings(), disk_device="/dev/loop3",
                                  root_uuid=UUID, required=False)
    assert fake_runner.calls == []
    assert "kernel_path" in caplog.text


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
