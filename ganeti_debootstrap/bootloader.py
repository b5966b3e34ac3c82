"""GRUB on the instance's disk 0, so that it boots with an empty kernel_path.

BOOTLOADER=grub (or the OS parameter ``bootloader=grub``) adds a kernel and
grub-pc to the bootstrap's packages (:func:`resolve`), makes room before
the root partition for GRUB's core image (partitions.py: the gap after the
MBR, or a BIOS boot partition on gpt), and puts GRUB for BIOS on disk 0:

- create (:func:`install`) runs the freshly bootstrapped system's own
  grub-install and debconf in a chroot: that system is ours, made by this
  run from the Debian archive.
- import (:func:`install_from_node`) restores a tenant's backup: every byte
  of it is hostile, so nothing of it runs. The node's own GRUB
  (grub-pc-bin) builds core.img and writes it to the disk; the instance's
  GRUB files and grub-pc's debconf answer are written as data.

The configuration is written here, not by update-grub: on the node, the
root filesystem sits on a file-backed loop device, and grub-mkconfig's
10_linux silently skips the kernel then ("done", but no menu entry). Inside
the running instance, / is a real disk and update-grub works: the console
settings are also left in /etc/default/grub.d for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import fsutil, log, mounts, partitions, runner
from .environment import DEFAULT_SERIAL_SPEED, Request
from .errors import ConfigError, DefinitionError
from .settings import Settings
from .target import Target, TargetPathError, UnsafeFileError, kind_of

logger = logging.getLogger(__name__)

# GRUB for BIOS (grub-pc) exists for these architectures; the kernel
# package is Debian's metapackage that follows the current kernel.
KERNEL_PACKAGES = {"amd64": "linux-image-amd64", "i386": "linux-image-686-pae"}
GRUB_PACKAGE = "grub-pc"
GRUB_TARGET = "i386-pc"

# grub-install only puts the partition map module into core.img when it
# sees the root as a partition of the disk it installs on. Here the root
# is a loop device over a byte range of the disk (or a kpartx mapping),
# not a partition the kernel knows: without the module core.img cannot
# read the table, finds no /boot/grub and stops at "grub rescue>".
PARTITION_MODULES = {"msdos": "part_msdos", "gpt": "part_gpt"}
# GRUB's module reading each root filesystem type (its ext2 module reads
# ext2, ext3 and ext4).
FILESYSTEM_MODULES = {"ext2": "ext2", "ext3": "ext2", "ext4": "ext2",
                      "xfs": "xfs", "btrfs": "btrfs"}


def filesystem_module(fstype: str) -> str:
    """GRUB's module for a root of ``fstype`` (ext2 for an unknown one)."""
    return FILESYSTEM_MODULES.get(fstype, "ext2")

GRUB_CFG = "/boot/grub/grub.cfg"
# A drop-in rather than an edit of /etc/default/grub: that file belongs to
# grub-pc's maintainer scripts (ucf), which would ask about local changes.
GRUB_DEFAULTS_DROPIN = "/etc/default/grub.d/ganeti-instance-debootstrap.cfg"
# Debian's GRUB_TIMEOUT, so that the menu behaves the same after update-grub.
MENU_TIMEOUT_SECONDS = 5

# Debian keeps these links to the default kernel, in / (or in /boot with
# link_in_boot in kernel-img.conf), and moves them on kernel upgrades, so
# the configuration written here keeps booting the current kernel.
KERNEL_LINKS = (("/boot/vmlinuz", "/boot/initrd.img"), ("/vmlinuz", "/initrd.img"))

# The device the instance sees its disk 0 as, by Ganeti's KVM disk_type:
# grub-pc re-installs GRUB there when it is upgraded inside the instance.
KVM_SCSI_DISK_TYPES = ("ide", "scsi", "scsi-hd", "scsi-block", "scsi-generic")


class BootloaderError(DefinitionError):
    """GRUB could not be installed or configured in the instance."""


def kernel_package(arch: str) -> str:
    """The kernel package a grub-booted instance of ``arch`` gets."""
    try:
        return KERNEL_PACKAGES[arch]
    except KeyError:
        raise ConfigError(
            f"BOOTLOADER=grub installs GRUB for BIOS (grub-pc), which exists "
            f"for {' and '.join(KERNEL_PACKAGES)} only, not for ARCH={arch}. "
            f"Set BOOTLOADER=none (or the OS parameter bootloader=none) and "
            f"boot the instance with Ganeti's kernel_path.") from None


def packages(arch: str) -> tuple[str, ...]:
    """What the bootstrap adds for a grub-booted instance of ``arch``."""
    return (kernel_package(arch), GRUB_PACKAGE)


def resolve(conf: Settings, param: str, arch: str) -> Settings:
    """``conf`` with the instance's boot loader decided and its packages added.

    The OS parameter ``param`` (empty: not given) wins over BOOTLOADER.
    With grub, the kernel and grub-pc join EXTRA_PKGS (and so the cache
    key); a style or alignment GRUB cannot boot from is refused here,
    before anything is bootstrapped or written.
    """
    loader = param or conf.bootloader
    if loader == "grub-efi":
        return _resolve_efi(conf, param, arch)
    if loader != "grub":
        return dataclasses.replace(conf, bootloader="none")
    asked = ("the OS parameter bootloader=grub" if param else
             f"BOOTLOADER=grub (set in {' or '.join(conf.sources) or 'the settings'})")
    if conf.partition_style not in PARTITION_MODULES:
        raise ConfigError(
            f"{asked} needs a partition table on disk 0, but PARTITION_STYLE="
            f"{conf.partition_style}: with the filesystem on the whole disk "
            f"there is no room for GRUB's boot code. Set PARTITION_STYLE=msdos "
            f"(or gpt) for this variant, or use bootloader=none and Ganeti's "
            f"kernel_path.")
    added = tuple(p for p in packages(arch) if p not in conf.extra_pkgs)
    partitions.check_boot_area(conf.partition_style, conf.partition_alignment)
    return dataclasses.replace(conf, bootloader="grub",
                               extra_pkgs=conf.extra_pkgs + added)


def _resolve_efi(conf: Settings, param: str, arch: str) -> Settings:
    """resolve() for grub-efi: gpt and amd64 only; the kernel joins EXTRA_PKGS.

    No GRUB package: the EFI image is built by the node's GRUB (see
    :func:`install_efi`), on create as on import.
    """
    asked = ("the OS parameter bootloader=grub-efi" if param else
             f"BOOTLOADER=grub-efi (set in {' or '.join(conf.sources) or 'the settings'})")
    if arch != EFI_ARCH:
        raise ConfigError(
            f"{asked} installs GRUB for x86_64 UEFI, which boots {EFI_ARCH} "
            f"instances only, not ARCH={arch}. Use bootloader=grub (BIOS) or "
            f"none and Ganeti's kernel_path.")
    if conf.partition_style != "gpt":
        raise ConfigError(
            f"{asked} needs a gpt partition table on disk 0 (for the EFI "
            f"system partition), but PARTITION_STYLE={conf.partition_style}. "
            f"Set PARTITION_STYLE=gpt for this variant, or use bootloader=grub "
            f"(BIOS).")
    kernel = kernel_package(arch)
    added = () if kernel in conf.extra_pkgs else (kernel,)
    return dataclasses.replace(conf, bootloader="grub-efi",
                               extra_pkgs=conf.extra_pkgs + added)


# --- what the instance sees ---------------------------------------------------

@dataclass(frozen=True)
class SerialConsole:
    """The instance's serial console: ``ttyS0`` (KVM, Xen HVM) or ``hvc0`` (Xen PV)."""

    device: str
    speed: str = DEFAULT_SERIAL_SPEED

    @property
    def is_uart(self) -> bool:
        """Whether GRUB can drive it (a PC serial port, not a Xen console)."""
        return re.fullmatch(r"ttyS\d+", self.device) is not None

    def kernel_args(self) -> str:
        """Kernel consoles: the screen and this one, this one last (/dev/console)."""
        line = f"{self.device},{self.speed}" if self.is_uart else self.device
        return f"console=tty0 console={line}"


def serial_console(request: Request) -> SerialConsole | None:
    """The serial console Ganeti gives the instance, with its speed, or None."""
    device = request.serial_console
    if device is None:
        return None
    return SerialConsole(device, request.serial_speed or DEFAULT_SERIAL_SPEED)


def instance_disk_name(request: Request) -> str:
    """The device the running instance sees its disk 0 as (for grub-pc upgrades).

    Ganeti's KVM gives virtio disks (vda) unless disk_type says otherwise;
    Xen's disks are xvda (HVM guests switch to the PV driver).
    """
    if request.hypervisor.startswith("xen"):
        return "/dev/xvda"
    if request.hv_params.get("disk_type", "") in KVM_SCSI_DISK_TYPES:
        return "/dev/sda"
    return "/dev/vda"


GRUB_INSTALL = "/usr/sbin/grub-install"

# Why a freshly bootstrapped system may lack GRUB or a kernel.
_WITHOUT_GRUB = (
    "A cache archive edited or made without them: remove it, and the next "
    "create bootstraps one with them.")


def kernel_paths(t: Target) -> tuple[str, str] | None:
    """The kernel and initrd links GRUB loads (paths inside the instance), or None.

    Only looked at, never run or read: in an imported instance it is data.
    """
    for kernel, initrd in KERNEL_LINKS:
        if t.exists(kernel) and t.exists(initrd):
            return kernel, initrd
    return None


def missing_for_grub(t: Target) -> str:
    """What the system at ``t`` lacks to boot with its own GRUB ('' if nothing)."""
    missing = []
    if not t.exists(GRUB_INSTALL):
        missing.append(f"GRUB ({GRUB_PACKAGE}, {GRUB_INSTALL})")
    if kernel_paths(t) is None:
        missing.append("a kernel (the /vmlinuz and /initrd.img links)")
    return " and ".join(missing)


# --- reading the instance's files as untrusted data -----------------------------

MIB = 1024 * 1024
OS_RELEASE_LIMIT = 64 * 1024
# debconf's config.dat is about 100 KiB on a server, 1-2 MiB on a desktop
# with many packages.
DEBCONF_LIMIT = 16 * MIB


def os_title(t: Target) -> str:
    """The system's PRETTY_NAME from os-release, for the menu entry."""
    try:
        text = t.read_text("/etc/os-release", limit=OS_RELEASE_LIMIT)
    except FileNotFoundError:
        text = ""
    except UnsafeFileError as e:
        logger.warning("/etc/os-release in the instance %s: it is left alone and the "
                       "boot menu entry gets a generic title.", e.reason)
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        # A title GRUB shows on the console: no control characters.
        if key.strip() == "PRETTY_NAME" and value and value.isprintable() \
                and len(value) <= 100:
            return value
    return "Debian GNU/Linux"


def _grub_quote(text: str) -> str:
    """``text`` as one word in GRUB's shell-like syntax."""
    return "'" + text.replace("'", "'\\''") + "'"


# --- configuration files --------------------------------------------------------

def grub_cfg_text(*, root_uuid: str, style: str, console: SerialConsole | None,
                  kernel: str = "/vmlinuz", initrd: str = "/initrd.img",
                  title: str = "Debian GNU/Linux", fstype: str = "ext4") -> str:
    """/boot/grub/grub.cfg booting ``kernel`` from the root filesystem ``root_uuid``."""
    modules = f"insmod {PARTITION_MODULES[style]}\ninsmod {filesystem_module(fstype)}\n"
    search = f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
    terminal = ""
    args = f"root=UUID={root_uuid} ro"
    if console is not None:
        args += " " + console.kernel_args()
        if console.is_uart:
            unit = console.device[len("ttyS"):]
            terminal = (f"serial --unit={unit} --speed={console.speed}\n"
                        "terminal_input serial console\n"
                        "terminal_output serial console\n")
    return ("# Written by ganeti-instance-debootstrap when the instance was "
            "created.\n"
            "# update-grub inside the instance replaces it, from /etc/default/grub\n"
            "# and /etc/default/grub.d/.\n"
            f"{terminal}"
            f"set default=0\nset timeout={MENU_TIMEOUT_SECONDS}\n"
            f"{modules}{search}\n"
            f"menuentry {_grub_quote(title)} {{\n"
            + "".join(f"\t{line}\n" for line in (modules + search).splitlines())
            + f"\tlinux {kernel} {args}\n"
            f"\tinitrd {initrd}\n"
            "}\n")


def grub_defaults_text(console: SerialConsole) -> str:
    """The /etc/default/grub.d drop-in giving update-grub the instance's console."""
    text = ("# Written by ganeti-instance-debootstrap: the instance's console, "
            "for update-grub.\n"
            f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {console.kernel_args()}"\n')
    if console.is_uart:
        unit = console.device[len("ttyS"):]
        text += ('GRUB_TERMINAL="serial console"\n'
                 f'GRUB_SERIAL_COMMAND="serial --unit={unit} --speed={console.speed}"\n')
    return text


def check_config(text: str) -> None:
    """Refuse a GRUB configuration without an entry booting Linux.

    update-grub's output always has some menuentry (on a node booted by
    UEFI, "UEFI Firmware Settings"): what counts is one loading a kernel.
    """
    if not (re.search(r"(?m)^\s*menuentry\s", text)
            and re.search(r"(?m)^\s*linux\s+/", text)):
        raise BootloaderError(
            f"{GRUB_CFG} in the instance has no menu entry booting Linux: "
            f"GRUB would stop at its menu or prompt. This is a bug in "
            f"ganeti-instance-debootstrap; boot the instance with kernel_path "
            f"meanwhile (bootloader=none).")


# --- installing -------------------------------------------------------------------

def grub_install_argv(root: str, disk_device: str, style: str,
                      fstype: str = "ext4") -> list[str]:
    """grub-install, run in the instance at ``root``, for BIOS boot from ``disk_device``."""
    modules = f"{PARTITION_MODULES[style]} {filesystem_module(fstype)}"
    return ["chroot", root, "grub-install", f"--target={GRUB_TARGET}",
            f"--modules={modules}", disk_device]


def debconf_install_devices(device: str) -> bytes:
    """The debconf answer telling grub-pc upgrades which disk to install on."""
    return f"{GRUB_PACKAGE} {GRUB_PACKAGE}/install_devices multiselect {device}\n".encode()


def install(t: Target, request: Request, conf: Settings, *, disk_device: str,
            root_uuid: str, esp_device: str = "", fstype: str = "ext4") -> bool:
    """create: install and configure GRUB on ``disk_device`` when ``conf`` says grub.

    Runs the freshly bootstrapped system's own grub-install in a chroot
    with /proc, /sys and the node's /dev (where ``disk_device`` is)
    mounted: that system is ours, and its GRUB matches its grub-pc
    package. Writes grub.cfg and the console drop-in, and grub-pc's
    debconf answer for later upgrades. A system without GRUB or kernel is
    an error. Returns whether GRUB was installed.

    grub-efi: :func:`install_efi` (the node's GRUB, as on import), any
    failure an error. ``fstype``: the root's type (GRUB's module for it).
    """
    if conf.bootloader == "grub-efi":
        return install_efi(t, request, conf, esp_device=esp_device,
                           root_uuid=root_uuid, strict=True, fstype=fstype)
    if conf.bootloader != "grub":
        return False
    missing = missing_for_grub(t)
    if missing:
        raise BootloaderError(f"bootloader=grub, but the system on the disk "
                              f"lacks {missing}. {_WITHOUT_GRUB}")
    with log.phase("boot loader"):
        console = serial_console(request)
        if console is not None:
            t.write_text(GRUB_DEFAULTS_DROPIN, grub_defaults_text(console))
        inside = instance_disk_name(request)
        # Under Ganeti's umask 077, /boot/grub and debconf's database
        # would become private.
        with mounts.api_filesystems(t.root), fsutil.umask(fsutil.PACKAGE_UMASK):
            runner.run(["chroot", t.root, "debconf-set-selections"],
                       stdin=debconf_install_devices(inside))
            runner.run(grub_install_argv(t.root, disk_device, conf.partition_style,
                                         fstype),
                       hint=f"Installing GRUB on {disk_device} failed; "
                            f"BOOTLOADER=none boots the instance with Ganeti's "
                            f"kernel_path instead.")
        kernel = write_config(t, request, conf, root_uuid, fstype)
        logger.info("GRUB installed on %s (%s in the instance), booting %s",
                    disk_device, inside, kernel)
    return True


def write_config(t: Target, request: Request, conf: Settings, root_uuid: str,
                 fstype: str = "ext4") -> str:
    """Write and check grub.cfg for the instance at ``t``; return the kernel it boots."""
    kernel, initrd = kernel_paths(t) or KERNEL_LINKS[-1]
    text = grub_cfg_text(
        root_uuid=root_uuid, style=conf.partition_style,
        console=serial_console(request), kernel=kernel, initrd=initrd,
        title=os_title(t), fstype=fstype)
    check_config(text)
    t.write_text(GRUB_CFG, text)
    return kernel


# --- import: the node's GRUB, the instance's files as data --------------------------
#
# Why core.img is built here instead of running the node's grub-install on
# the instance's tree (grub-install --boot-directory=<root>/boot): grub-install
# writes into the tree itself (the platform directory, grubenv, fonts,
# locale, device.map) and follows whatever symlinks the tenant left there:
# /boot/grub -> /etc (or ../../../../etc) would make it write into the
# node's /etc, and the list of directories to check first changes with
# GRUB's versions. Here only two node programs run, and neither writes a
# file of the instance: grub-mkimage writes core.img into a private
# directory of the node; grub-bios-setup reads boot.img and core.img back
# from the instance's platform directory (just written there by us) and
# writes them onto the disk device only. Every file the instance gets (modules, core.img,
# grub.cfg, debconf's database) is written through Target, which resolves
# each path inside the root and replaces a final symlink instead of
# following it: with /boot/grub -> /etc, GRUB lands in the instance's /etc
# (where GRUB at boot finds it too, following the same link).

NODE_GRUB_PACKAGE = "grub-pc-bin"
# grub-pc-bin's modules and setup program, and grub-common's grub-mkimage
# (a dependency of grub-pc-bin).
NODE_GRUB_MODULES = "/usr/lib/grub/i386-pc"
NODE_GRUB_MKIMAGE = "/usr/bin/grub-mkimage"
NODE_GRUB_BIOS_SETUP = "/usr/lib/grub/i386-pc/grub-bios-setup"
GRUB_DIR = "/boot/grub"
GRUB_PLATFORM_DIR = f"{GRUB_DIR}/{GRUB_TARGET}"
# What grub-install copies into /boot/grub/i386-pc besides core.img: the
# modules core.img loads from there (normal, linux, serial, ...) and their
# lists, and the boot sector image. Like grub-install, modules the node's
# GRUB does not have are removed first: a module of another GRUB version
# does not load into this core.img. (boot.img and core.img are replaced.)
_PLATFORM_FILES = ("*.mod", "*.lst", "boot.img", "modinfo.sh", "efiemu*.o")
_STALE_PLATFORM_FILES = ("*.mod", "*.lst", "modinfo.sh", "efiemu*.o")
CORE_IMG = "core.img"
DEBCONF_CONFIG = "/var/cache/debconf/config.dat"
INSTALL_DEVICES_QUESTION = f"{GRUB_PACKAGE}/install_devices"


@dataclass(frozen=True)
class NodeGrub:
    """The node's GRUB for BIOS: its module directory and the two programs run."""

    modules: str
    mkimage: str
    bios_setup: str


def node_grub() -> NodeGrub | None:
    """The node's GRUB for BIOS, or None where grub-pc-bin is not installed."""
    grub = NodeGrub(NODE_GRUB_MODULES, NODE_GRUB_MKIMAGE, NODE_GRUB_BIOS_SETUP)
    files = [os.path.join(grub.modules, name) for name in ("boot.img", "kernel.img",
                                                            "moddep.lst")]
    programs = (grub.mkimage, grub.bios_setup)
    if all(os.path.isfile(f) for f in files) and all(os.access(p, os.X_OK) for p in programs):
        return grub
    return None


def core_modules(style: str, fstype: str = "ext4") -> tuple[str, ...]:
    """What core.img holds to find /boot/grub by itself.

    The BIOS disk driver, the partition map (without it core.img cannot
    read the table and stops at "grub rescue>"), the filesystem, and the
    search by UUID its embedded configuration runs.
    """
    return ("biosdisk", PARTITION_MODULES[style], filesystem_module(fstype), "search_fs_uuid")


def core_config_text(root_uuid: str) -> str:
    """core.img's embedded configuration: the root by UUID, GRUB's files in it.

    By UUID, as grub-install does, so that it does not depend on which
    BIOS disk the instance's disk 0 is.
    """
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root){GRUB_DIR}\n"


def mkimage_argv(grub: NodeGrub, style: str, config: str, output: str,
                 fstype: str = "ext4") -> list[str]:
    """grub-mkimage building core.img for BIOS from the node's modules."""
    return [grub.mkimage, f"--format={GRUB_TARGET}", f"--directory={grub.modules}",
            f"--config={config}", f"--prefix={GRUB_DIR}", f"--output={output}",
            *core_modules(style, fstype)]


# The GRUB drive the disk is named as to grub-bios-setup, through our device map.
DEVICE_MAP_DRIVE = "(hd0)"


def device_map_text(disk_device: str) -> str:
    """A device.map naming ``disk_device`` GRUB's drive (hd0), a plain disk.

    Given an OS device, grub-bios-setup looks through it: an LVM logical
    volume (the disks of Ganeti's plain template) becomes GRUB's own LVM device
    ("lvm/vg-lv"), which it cannot write ("diskfilter writes are not
    supported"; found on a node VM). A drive of the device map is opened
    as the block device it names, whatever is below it. The path as the
    kernel names it (GRUB reads it up to the first blank).
    """
    return f"{DEVICE_MAP_DRIVE}\t{os.path.realpath(disk_device)}\n"


def bios_setup_argv(grub: NodeGrub, platform_dir: str, device_map: str) -> list[str]:
    """grub-bios-setup writing boot.img and core.img (read from ``platform_dir``).

    The disk is the drive of ``device_map`` (:func:`device_map_text`); the
    node's own device.map (its own disks) has nothing to say about it.
    It also takes "the root device" from the filesystem ``platform_dir`` is
    on, which must be one GRUB can open: the instance's (not a temporary
    directory of the node, whose root may be LVM, md or a whole disk).
    Without --force it refuses to fall back to block lists (which would
    write into core.img there): core.img is embedded in the gap after the
    MBR or in the BIOS boot partition.
    """
    return [grub.bios_setup, f"--device-map={device_map}", f"--directory={platform_dir}",
            DEVICE_MAP_DRIVE]


@contextlib.contextmanager
def _device_map(disk_device: str) -> Iterator[str]:
    """The device map of :func:`device_map_text`, in a private directory of the node."""
    with tempfile.TemporaryDirectory(prefix="gidb-grub-map-") as work:
        path = os.path.join(work, "device.map")
        with open(path, "w", encoding="utf-8") as f:
            f.write(device_map_text(disk_device))
        yield path


class _GrubSkipped(Exception):
    """GRUB's files cannot be written into the instance (why, as text)."""


def _write_instance_config(t: Target, request: Request, conf: Settings,
                           root_uuid: str, fstype: str) -> str:
    """grub.cfg and the console drop-in, written as files (import); the kernel booted."""
    kernel = write_config(t, request, conf, root_uuid, fstype)
    console = serial_console(request)
    if console is not None:
        t.write_text(GRUB_DEFAULTS_DROPIN, grub_defaults_text(console))
    return kernel


def _unwritable(t: Target, e: Exception) -> str:
    """Why GRUB's files could not go into the instance, as a clause."""
    if not isinstance(e, OSError):
        return str(e)
    # os.replace(temporary, file) names the file second.
    name = e.filename2 or e.filename
    return (f"{_inner(t, os.fsdecode(name)) if name else 'a file'} in the "
            f"instance cannot be written ({e.strerror})")


def _inner(t: Target, path: str) -> str:
    """The instance's name of the node path ``path`` inside its root."""
    relative = os.path.relpath(path, t.root)
    if relative == ".." or relative.startswith("../"):
        return path  # a node path (the private work directory)
    return "/" if relative == "." else "/" + relative


def _real_directory(t: Target, inner: str) -> str:
    """The node path of directory ``inner``, made a real directory inside the root.

    Symlinks on the way are followed inside the instance (Target); a
    component that exists but is no directory stops it (_GrubSkipped).
    """
    try:
        path = t.path(inner)
    except TargetPathError as e:
        raise _GrubSkipped(str(e)) from None
    current = os.path.normpath(t.root)
    for part in os.path.relpath(path, current).split(os.sep):
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            with fsutil.umask(fsutil.PACKAGE_UMASK):
                os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(mode):
            raise _GrubSkipped(f"{_inner(t, current)} in the instance is "
                               f"{kind_of(mode)}, where GRUB's directory {inner} belongs")
    return path


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _copy_platform_files(t: Target, grub: NodeGrub, platform_dir: str, core: bytes) -> None:
    """Put the node's modules and ``core`` into the instance's /boot/grub/i386-pc."""
    names = sorted(n for n in os.listdir(grub.modules) if _matches(n, _PLATFORM_FILES))
    for name in sorted(os.listdir(platform_dir)):
        path = os.path.join(platform_dir, name)
        if (name not in names and _matches(name, _STALE_PLATFORM_FILES)
                and not stat.S_ISDIR(os.lstat(path).st_mode)):
            os.unlink(path)
    for name in names:
        with open(os.path.join(grub.modules, name), "rb") as f:
            data = f.read()
        t.write_bytes(f"{GRUB_PLATFORM_DIR}/{name}", data)
    t.write_bytes(f"{GRUB_PLATFORM_DIR}/{CORE_IMG}", core)


def _build_core(grub: NodeGrub, style: str, root_uuid: str, fstype: str) -> bytes:
    """core.img for the root ``root_uuid``, built in a private directory of the node."""
    return _built_image(
        "gidb-grub-", CORE_IMG, root_uuid,
        lambda config, output: mkimage_argv(grub, style, config, output, fstype),
        hint=f"The node's GRUB ({NODE_GRUB_PACKAGE}) could not build its "
             f"core image; check that {NODE_GRUB_PACKAGE} is fully "
             f"installed, or import with bootloader=none and boot the "
             f"instance with Ganeti's kernel_path.")


def _built_image(prefix: str, name: str, root_uuid: str,
                 argv: Callable[[str, str], list[str]], *, hint: str) -> bytes:
    """The GRUB image ``name`` that ``argv(config, output)`` builds, embedding the
    configuration that finds the root ``root_uuid``; built in a private
    directory of the node (named with ``prefix``), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        config = os.path.join(work, "load.cfg")
        with open(config, "w", encoding="ascii") as f:
            f.write(core_config_text(root_uuid))
        output = os.path.join(work, name)
        runner.run(argv(config, output), hint=hint)
        with open(output, "rb") as f:
            return f.read()


def set_install_devices(text: str, device: str) -> str:
    """debconf's config.dat ``text`` with grub-pc/install_devices set to ``device``.

    What ``debconf-set-selections`` does with "grub-pc
    grub-pc/install_devices multiselect DEVICE": the question's Value
    replaced (or its record added), grub-pc among its owners, flagged as
    seen so that upgrades do not ask again. Every other record stays as it
    was (records are separated by blank lines, fields are "Key: value"
    lines, continuation lines start with a space).
    """
    body = text.strip("\n")
    records = [r.split("\n") for r in re.split(r"\n{2,}", body)] if body else []
    name_line = f"Name: {INSTALL_DEVICES_QUESTION}"
    ours = [lines for lines in records if name_line in lines]
    if not ours:
        records.append([name_line, f"Template: {INSTALL_DEVICES_QUESTION}"])
        ours = records[-1:]
    for lines in ours:
        _set_field(lines, "Value", device, after="Template")
        owners = _field_list(lines, "Owners")
        _set_field(lines, "Owners", ", ".join(
            owners + [GRUB_PACKAGE] * (GRUB_PACKAGE not in owners)), after="Value")
        flags = _field_list(lines, "Flags")
        _set_field(lines, "Flags", ", ".join(flags + ["seen"] * ("seen" not in flags)),
                   after="Owners")
    return "".join("\n".join(lines) + "\n\n" for lines in records)


def _field_at(lines: list[str], key: str) -> int | None:
    """The index of field ``key``'s line in a debconf record, or None."""
    for i, line in enumerate(lines):
        if not line.startswith((" ", "\t")) and line.partition(":")[0] == key:
            return i
    return None


def _field_list(lines: list[str], key: str) -> list[str]:
    """The comma-separated values of field ``key`` of a debconf record."""
    at = _field_at(lines, key)
    if at is None:
        return []
    return [v.strip() for v in lines[at].partition(":")[2].split(",") if v.strip()]


def _set_field(lines: list[str], key: str, value: str, *, after: str) -> None:
    """Replace field ``key`` of a record, or add it after field ``after`` (or last)."""
    at = _field_at(lines, key)
    if at is not None:
        lines[at] = f"{key}: {value}"
        return
    before = _field_at(lines, after)
    lines.insert(len(lines) if before is None else before + 1, f"{key}: {value}")


def record_install_devices(t: Target, device: str) -> bool:
    """Set grub-pc's install_devices answer in the instance's debconf database.

    Edited as text, never by running debconf: a database that is not a
    regular file of sane size (a symlink, a FIFO, a huge file) is left
    alone with a warning. Returns whether it was written.
    """
    try:
        text = t.read_text(DEBCONF_CONFIG, limit=DEBCONF_LIMIT, follow_last=False)
        mode = stat.S_IMODE(os.lstat(t.path_nofollow(DEBCONF_CONFIG)).st_mode)
    except FileNotFoundError:
        logger.info("The instance has no debconf database (%s): grub-pc's "
                    "install_devices answer is not recorded.", DEBCONF_CONFIG)
        return False
    except UnsafeFileError as e:
        logger.warning("debconf's database %s in the instance %s: it is left alone, "
                       "and upgrading grub-pc inside the instance will ask which disk "
                       "to install GRUB on.", DEBCONF_CONFIG, e.reason)
        return False
    except TargetPathError as e:
        logger.warning("debconf's database %s in the instance cannot be reached (%s): "
                       "it is left alone, and upgrading grub-pc inside the instance "
                       "will ask which disk to install GRUB on.", DEBCONF_CONFIG, e)
        return False
    t.write_text(DEBCONF_CONFIG, set_install_devices(text, device), mode=mode)
    return True


def install_from_node(t: Target, request: Request, conf: Settings, *, disk_device: str,
                      root_uuid: str, esp_device: str = "", fstype: str = "ext4") -> bool:
    """import: put the node's GRUB on ``disk_device`` for the restored system at ``t``.

    Nothing of the instance runs: core.img is built by the node's
    grub-mkimage and written to the disk by its grub-bios-setup; the
    modules, grub.cfg, the console drop-in and grub-pc's debconf answer are
    written into the instance through Target. Without a kernel in the
    instance, without GRUB for BIOS on the node, or where GRUB's files
    cannot be written into the instance, the import goes on without a boot
    loader (nothing written to the disk's boot area) and one warning says
    how to boot it. Returns whether GRUB was installed. grub-efi:
    :func:`install_efi`, with the same warnings.
    """
    if conf.bootloader == "grub-efi":
        return install_efi(t, request, conf, esp_device=esp_device,
                           root_uuid=root_uuid, strict=False, fstype=fstype)
    if conf.bootloader != "grub":
        return False
    if kernel_paths(t) is None:
        logger.warning("bootloader=grub, but the imported system lacks a kernel (the "
                       "/vmlinuz and /initrd.img links): no boot loader is installed; "
                       "boot the instance with Ganeti's kernel_path.")
        return False
    grub = node_grub()
    if grub is None:
        logger.warning("bootloader=grub, but this node has no GRUB for BIOS (%s, "
                       "which provides %s): the instance is imported without a boot "
                       "loader. Install %s on the node and import again, or boot the "
                       "instance with Ganeti's kernel_path.", NODE_GRUB_PACKAGE,
                       NODE_GRUB_MODULES, NODE_GRUB_PACKAGE)
        return False
    with log.phase("boot loader"):
        # Every file first, the disk's boot area last: a tenant's tree that
        # GRUB's files cannot go into leaves a disk without boot code, not
        # boot code without its files.
        try:
            platform_dir = _real_directory(t, GRUB_PLATFORM_DIR)
            core = _build_core(grub, conf.partition_style, root_uuid, fstype)
            _copy_platform_files(t, grub, platform_dir, core)
            kernel = _write_instance_config(t, request, conf, root_uuid, fstype)
        except (_GrubSkipped, TargetPathError, OSError) as e:
            why = _unwritable(t, e)
            logger.warning("bootloader=grub, but %s: the instance is imported without "
                           "a boot loader; boot it with Ganeti's kernel_path, or fix "
                           "that path in the instance, export and import it again.", why)
            return False
        with _device_map(disk_device) as device_map:
            runner.run(bios_setup_argv(grub, platform_dir, device_map),
                       hint=f"Installing the node's GRUB on {disk_device} failed; "
                            f"import with bootloader=none and boot the instance with "
                            f"Ganeti's kernel_path instead.")
        inside = instance_disk_name(request)
        record_install_devices(t, inside)
        logger.info("GRUB (the node's) installed on %s (%s in the instance), "
                    "booting %s", disk_device, inside, kernel)
    return True


def repair_config(t: Target, request: Request, conf: Settings, root_uuid: str,
                  fstype: str = "ext4") -> bool:
    """Write grub.cfg again if the hooks left it without a boot entry; True if so.

    A hook installing a kernel in the instance runs update-grub (the
    kernel's postinst hook does), which writes no entry while the root is
    on the node's loop device: the instance would stop at GRUB's prompt.
    """
    if conf.bootloader not in ("grub", "grub-efi") or not t.exists(GRUB_CFG):
        return False
    try:
        check_config(t.read_text(GRUB_CFG))
        return False
    except (BootloaderError, UnsafeFileError):
        # No entry, or something no grub.cfg is (huge, a FIFO...): ours
        # replaces it (a directory there is refused by write_text).
        pass
    logger.warning("After the hooks, %s had no entry booting Linux (update-grub "
                   "does not find the kernel while the root is on the node's "
                   "loop device); it is written again. To change GRUB's "
                   "settings, edit /etc/default/grub.d in the hooks: they take "
                   "effect at the instance's first update-grub.", GRUB_CFG)
    write_config(t, request, conf, root_uuid, fstype)
    return True



# --- UEFI: the node's GRUB for x86_64 EFI, on create and import ------------------
#
# The firmware boots EFI/BOOT/BOOTX64.EFI of the EFI system partition (the
# removable-media path: no NVRAM entry needed, so a fresh OVMF varstore
# boots it). That image is built by the node's grub-mkimage, for create as
# for import: one path, and on import nothing of the instance runs. Every
# module it needs is inside it (no module directory in the instance to
# keep in step with the node's GRUB); its embedded configuration finds the
# root by UUID and hands over to normal, which reads our grub.cfg there.
# The ESP is a fresh FAT made by format_disk, written with mtools through
# the loop device over it: never mounted, no FAT driver in the node's
# kernel needed.

EFI_ARCH = "amd64"
NODE_GRUB_EFI_PACKAGE = "grub-efi-amd64-bin"
NODE_GRUB_EFI_MODULES = "/usr/lib/grub/x86_64-efi"
GRUB_EFI_TARGET = "x86_64-efi"
EFI_BOOT_DIR = "::/EFI/BOOT"
EFI_BOOT_IMAGE = "BOOTX64.EFI"
# The ESP's mount point in the instance (its fstab entry: instance_files).
ESP_MOUNTPOINT = "/boot/efi"
# The image's modules: the partition map and filesystems (the root's, and
# FAT for the ESP), the search by UUID of the embedded configuration and
# grub.cfg's, the menu (normal) and what grub.cfg uses (linux, serial,
# terminal_*), EFI's framebuffer for the kernel's screen.
EFI_MODULES = ("part_gpt", "part_msdos", "fat", "ext2", "xfs", "btrfs", "search_fs_uuid",
               "search",
               "normal", "configfile", "echo", "test", "linux", "boot", "serial",
               "terminal", "efi_gop", "efi_uga", "all_video", "gzio", "reboot", "halt")
# mtools on a loop device: no geometry checks (it is no floppy).
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def node_grub_efi() -> str | None:
    """The node's x86_64-efi module directory, or None without grub-efi-amd64-bin."""
    files = [os.path.join(NODE_GRUB_EFI_MODULES, f"{m}.mod") for m in EFI_MODULES]
    files.append(os.path.join(NODE_GRUB_EFI_MODULES, "kernel.img"))
    if all(os.path.isfile(f) for f in files) and os.access(NODE_GRUB_MKIMAGE, os.X_OK):
        return NODE_GRUB_EFI_MODULES
    return None


def efi_mkimage_argv(modules_dir: str, config: str, output: str) -> list[str]:
    """grub-mkimage building the x86_64 EFI image from the node's modules."""
    return [NODE_GRUB_MKIMAGE, f"--format={GRUB_EFI_TARGET}", f"--directory={modules_dir}",
            f"--config={config}", f"--prefix={GRUB_DIR}", f"--output={output}",
            *EFI_MODULES]


def esp_commands(esp_device: str, image: str) -> list[list[str]]:
    """mtools commands putting ``image`` at EFI/BOOT/BOOTX64.EFI on the ESP."""
    return [["mmd", "-i", esp_device, "::/EFI", EFI_BOOT_DIR],
            ["mcopy", "-i", esp_device, "-o", image, f"{EFI_BOOT_DIR}/{EFI_BOOT_IMAGE}"]]


def _build_efi_image(modules_dir: str, root_uuid: str) -> bytes:
    """BOOTX64.EFI for the root ``root_uuid``, built in a private directory of the node."""
    return _built_image(
        "gidb-grub-efi-", EFI_BOOT_IMAGE, root_uuid,
        lambda config, output: efi_mkimage_argv(modules_dir, config, output),
        hint=f"The node's GRUB ({NODE_GRUB_EFI_PACKAGE}) could not build "
             f"its EFI image; check that {NODE_GRUB_EFI_PACKAGE} is fully "
             f"installed.")


def _write_esp(esp_device: str, image: bytes) -> None:
    """Write ``image`` as EFI/BOOT/BOOTX64.EFI onto the fresh ESP ``esp_device``."""
    with tempfile.TemporaryDirectory(prefix="gidb-esp-") as work:
        path = os.path.join(work, EFI_BOOT_IMAGE)
        with open(path, "wb") as f:
            f.write(image)
        for argv in esp_commands(esp_device, path):
            runner.run(argv, env=MTOOLS_ENV,
                       hint="Writing GRUB's EFI image onto the EFI system partition "
                            "failed; check that mtools is installed on the node.")


def install_efi(t: Target, request: Request, conf: Settings, *, esp_device: str,
                root_uuid: str, strict: bool, fstype: str = "ext4") -> bool:
    """GRUB for x86_64 UEFI: grub.cfg in the instance, the node-built image on the ESP.

    Nothing of the instance runs (create and import alike). ``strict``
    (create): a missing kernel or node GRUB is an error; otherwise
    (import) a warning, and the instance is imported without a boot loader
    (its ESP stays empty). Returns whether GRUB was installed.
    """
    if not esp_device:
        raise ValueError("grub-efi needs the EFI system partition's device")

    def refuse(message: str) -> bool:
        if strict:
            raise BootloaderError(message)
        logger.warning("%s The instance is imported without a boot loader; boot "
                       "it with Ganeti's kernel_path.", message)
        return False

    if kernel_paths(t) is None:
        return refuse("bootloader=grub-efi, but the system on the disk lacks a kernel "
                      "(the /vmlinuz and /initrd.img links).")
    modules_dir = node_grub_efi()
    if modules_dir is None:
        return refuse(f"bootloader=grub-efi, but this node has no GRUB for x86_64 "
                      f"UEFI ({NODE_GRUB_EFI_PACKAGE}, which provides "
                      f"{NODE_GRUB_EFI_MODULES}). Install {NODE_GRUB_EFI_PACKAGE} "
                      f"(and mtools, dosfstools) on the node.")
    with log.phase("boot loader"):
        # The instance's files first, the ESP last (as for BIOS).
        try:
            _real_directory(t, ESP_MOUNTPOINT)
            kernel = _write_instance_config(t, request, conf, root_uuid, fstype)
        except (_GrubSkipped, TargetPathError, OSError) as e:
            why = _unwritable(t, e)
            return refuse(f"bootloader=grub-efi, but {why}.")
        image = _build_efi_image(modules_dir, root_uuid)
        _write_esp(esp_device, image)
        logger.info("GRUB for UEFI (the node's) installed as EFI/BOOT/%s on %s, "
                    "booting %s", EFI_BOOT_IMAGE, esp_device, kernel)
    return True
