"""BOOTLOADER=grub-efi: layout with an EFI system partition, the node's GRUB image."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ganeti_debootstrap import bootloader, instance_files, osparams, partitions, settings
from ganeti_debootstrap.environment import Request
from ganeti_debootstrap.errors import ConfigError
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.settings import Settings
from ganeti_debootstrap.target import Target

MIB = 1024 * 1024
DISK = 600 * MIB
SECTORS = DISK // 512
UUID = "0b9ba4b5-8d0e-4f55-b6c1-1b1f0f7c2a11"
ESP = "/dev/loop7"
EFI_IMAGE = b"MZ node-built EFI image"


def request(**hv: str) -> Request:
    return Request(script="create", api_version=20, instance_name="vm1.example.org",
                   hypervisor="kvm", hv_params=hv)


def efi_settings() -> Settings:
    return Settings(bootloader="grub-efi", partition_style="gpt")


# --- settings, OS parameter, packages -------------------------------------------

def test_grub_efi_is_a_bootloader_setting_and_os_parameter_value():
    assert settings.validate({"BOOTLOADER": "grub-efi"}, ["defaults"], 20).bootloader \
        == "grub-efi"
    assert osparams.validate({"bootloader": "grub-efi"}).bootloader == "grub-efi"


def test_grub_efi_adds_only_the_kernel_to_the_bootstrap():
    conf = bootloader.resolve(Settings(partition_style="gpt", extra_pkgs=("less",)),
                              "grub-efi", "amd64")
    assert conf.bootloader == "grub-efi"
    assert conf.extra_pkgs == ("less", "linux-image-amd64")


def test_grub_efi_needs_gpt_and_names_the_setting():
    conf = Settings(bootloader="grub-efi", partition_style="msdos", sources=("/etc/x",))
    with pytest.raises(ConfigError, match="BOOTLOADER=grub-efi.*/etc/x.*PARTITION_STYLE=msdos"):
        bootloader.resolve(conf, "", "amd64")


@pytest.mark.parametrize("arch", ["i386", "arm64"])
def test_grub_efi_is_for_amd64_only(arch):
    with pytest.raises(ConfigError, match=f"bootloader=grub-efi.*ARCH={arch}"):
        bootloader.resolve(Settings(partition_style="gpt"), "grub-efi", arch)


# --- the layout -------------------------------------------------------------------

def test_esp_comes_first_on_disk_and_the_root_after_it():
    layout = partitions.plan("gpt", 2048, DISK, esp=True)
    assert (layout.esp_start_sector, layout.esp_size_sectors) == (2048, 64 * 2048)
    assert layout.start_sector == 2048 + 64 * 2048
    assert layout.start_sector + layout.size_sectors == SECTORS - 33
    assert layout.boot_size_sectors == 0
    assert layout.esp_offset_bytes == MIB and layout.esp_size_bytes == 64 * MIB


def test_esp_is_listed_second_so_the_root_stays_partition_1():
    layout = partitions.plan("gpt", 2048, DISK, esp=True)
    lines = partitions.sfdisk_script(layout, "amd64").splitlines()
    assert lines[-2] == (f"start={2048 + 131072}, size={SECTORS - 33 - 2048 - 131072}, "
                         "type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")
    assert lines[-1] == "start=2048, size=131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def test_esp_only_on_gpt():
    with pytest.raises(ValueError):
        partitions.plan("msdos", 2048, DISK, esp=True)


# --- fstab --------------------------------------------------------------------------

def test_fstab_mounts_the_esp_by_uuid_root_only_and_drops_an_old_entry():
    old = "UUID=AAAA-BBBB\t/boot/efi\tvfat\tumask=0077\t0\t1\ntmpfs /tmp tmpfs defaults 0 0\n"
    text = instance_files.fstab_text(old, FsEntry(UUID, "ext4"), None,
                                     FsEntry("1234-ABCD", "vfat"))
    lines = text.splitlines()
    assert "UUID=1234-ABCD\t/boot/efi\tvfat\tumask=0077\t0\t1" in lines
    assert "AAAA-BBBB" not in text
    assert "tmpfs /tmp tmpfs defaults 0 0" in lines


def test_fstab_without_esp_drops_a_stale_esp_entry():
    old = "UUID=AAAA-BBBB /boot/efi vfat umask=0077 0 1\n"
    text = instance_files.fstab_text(old, FsEntry(UUID, "ext4"), None)
    assert "/boot/efi" not in text


# --- installing: the node's GRUB, mtools onto the ESP --------------------------------

@pytest.fixture
def node_efi(tmp_path, monkeypatch) -> str:
    """A stand-in for the node's grub-efi-amd64-bin and grub-mkimage."""
    modules = tmp_path / "node-grub/x86_64-efi"
    modules.mkdir(parents=True)
    for name in bootloader.EFI_MODULES:
        (modules / f"{name}.mod").write_bytes(b"mod")
    (modules / "kernel.img").write_bytes(b"kernel")
    mkimage = tmp_path / "node-grub/grub-mkimage"
    mkimage.write_text("")
    mkimage.chmod(0o755)
    monkeypatch.setattr(bootloader, "NODE_GRUB_EFI_MODULES", str(modules))
    monkeypatch.setattr(bootloader, "NODE_GRUB_MKIMAGE", str(mkimage))
    assert bootloader.node_grub_efi() == str(modules)
    return str(mkimage)


def make_tree(root: Path, *, kernel: bool = True) -> Target:
    (root / "boot").mkdir(parents=True)
    (root / "etc").mkdir()
    if kernel:
        (root / "boot/vmlinuz-6.1.0-amd64").write_text("")
        (root / "boot/initrd.img-6.1.0-amd64").write_text("")
        os.symlink("boot/vmlinuz-6.1.0-amd64", root / "vmlinuz")
        os.symlink("boot/initrd.img-6.1.0-amd64", root / "initrd.img")
    return Target(str(root))


class Recorded:
    """grub-mkimage's and mcopy's parts in the fake runner."""

    def __init__(self) -> None:
        self.config = ""
        self.copied = b""

    def mkimage(self, argv) -> None:
        options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
        with open(options["config"]) as f:
            self.config = f.read()
        with open(options["output"], "wb") as f:
            f.write(EFI_IMAGE)

    def mcopy(self, argv) -> None:
        with open(argv[-2], "rb") as f:
            self.copied = f.read()


def expect_efi(fake_runner, mkimage: str) -> Recorded:
    rec = Recorded()
    fake_runner.expect(mkimage, action=rec.mkimage)
    fake_runner.expect("mmd")
    fake_runner.expect("mcopy", action=rec.mcopy)
    return rec


@pytest.mark.parametrize("script", ["create", "import"])
def test_node_grub_builds_bootx64_onto_the_esp_and_nothing_of_the_instance_runs(
        fake_runner, node_efi, tmp_path, script):
    t = make_tree(tmp_path / "root")
    rec = expect_efi(fake_runner, node_efi)
    install = bootloader.install if script == "create" else bootloader.install_from_node
    assert install(t, request(serial_console="True"), efi_settings(),
                   disk_device="/dev/loop3", root_uuid=UUID, esp_device=ESP)
    modules = bootloader.NODE_GRUB_EFI_MODULES
    commands = fake_runner.commands()
    mkimage = fake_runner.calls[0]
    assert mkimage[:3] == (node_efi, "--format=x86_64-efi", f"--directory={modules}")
    assert mkimage[3].startswith("--config=") and mkimage[4] == "--prefix=/boot/grub"
    assert mkimage[5].startswith("--output=") and mkimage[6:] == bootloader.EFI_MODULES
    for module in ("part_gpt", "fat", "ext2", "search_fs_uuid", "normal", "linux", "serial"):
        assert module in fake_runner.calls[0]
    assert commands[1:] == [
        f"mmd -i {ESP} ::/EFI ::/EFI/BOOT",
        f"mcopy -i {ESP} -o {fake_runner.calls[2][4]} ::/EFI/BOOT/BOOTX64.EFI"]
    assert fake_runner.envs[1] == fake_runner.envs[2] == {"MTOOLS_SKIP_CHECK": "1"}
    assert rec.config == f"search.fs_uuid {UUID} root\nset prefix=($root)/boot/grub\n"
    assert rec.copied == EFI_IMAGE
    # The work files are gone, the instance has grub.cfg and /boot/efi.
    assert not os.path.exists(fake_runner.calls[2][4])
    cfg = t.read_text("/boot/grub/grub.cfg")
    assert "insmod part_gpt" in cfg and f"--set=root {UUID}" in cfg
    assert "serial --unit=0 --speed=115200" in cfg
    assert os.path.isdir(t.path("/boot/efi"))


def test_create_without_kernel_is_an_error_and_runs_nothing(fake_runner, node_efi, tmp_path):
    t = make_tree(tmp_path / "root", kernel=False)
    with pytest.raises(bootloader.BootloaderError, match="lacks a kernel"):
        bootloader.install(t, request(), efi_settings(), disk_device="/dev/loop3",
                           root_uuid=UUID, esp_device=ESP)
    assert fake_runner.calls == []


def test_import_without_kernel_warns_and_leaves_the_esp_empty(
        fake_runner, node_efi, tmp_path, caplog):
    t = make_tree(tmp_path / "root", kernel=False)
    with caplog.at_level(logging.WARNING):
        assert not bootloader.install_from_node(t, request(), efi_settings(),
                                                disk_device="/dev/loop3", root_uuid=UUID,
                                                esp_device=ESP)
    assert fake_runner.calls == []
    assert "kernel_path" in caplog.text
    assert not t.exists("/boot/grub/grub.cfg")


def test_import_on_a_node_without_grub_efi_warns_naming_the_package(
        fake_runner, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(bootloader, "NODE_GRUB_EFI_MODULES", str(tmp_path / "none"))
    t = make_tree(tmp_path / "root")
    with caplog.at_level(logging.WARNING):
        assert not bootloader.install_from_node(t, request(), efi_settings(),
                                                disk_device="/dev/loop3", root_uuid=UUID,
                                                esp_device=ESP)
    assert fake_runner.calls == []
    assert "grub-efi-amd64-bin" in caplog.text


def test_import_with_boot_efi_a_file_in_the_instance_warns_and_writes_no_esp(
        fake_runner, node_efi, tmp_path, caplog):
    t = make_tree(tmp_path / "root")
    Path(t.root, "boot/efi").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert not bootloader.install_from_node(t, request(), efi_settings(),
                                                disk_device="/dev/loop3", root_uuid=UUID,
                                                esp_device=ESP)
    assert fake_runner.calls == []
    assert "/boot/efi" in caplog.text


def test_create_with_boot_efi_not_a_directory_is_an_error_naming_it(
        fake_runner, node_efi, tmp_path):
    t = make_tree(tmp_path / "root")
    Path(t.root, "boot/efi").write_text("not a directory")
    with pytest.raises(bootloader.BootloaderError, match="/boot/efi in the instance is"):
        bootloader.install(t, request(), efi_settings(), disk_device="/dev/loop3",
                           root_uuid=UUID, esp_device=ESP)
    assert fake_runner.calls == []
