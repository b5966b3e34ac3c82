"""GRUB on the instance's disk 0, so that it boots with an empty kernel_path.

BOOTLOADER=grub (or the OS parameter ``bootloader=grub``) adds a kernel and
grub-pc to the bootstrap's packages (:func:`resolve`), makes room before
the root partition for GRUB's core image (partitions.py: the gap after the
MBR, or a BIOS boot partition on gpt), and once create has written the
instance's files installs GRUB for BIOS onto disk 0 from inside the
instance, with the instance's own GRUB (:func:`install`).

The configuration is written here, not by update-grub: on the node, the
root filesystem sits on a file-backed loop device, and grub-mkconfig's
10_linux silently skips the kernel then ("done", but no menu entry). Inside
the running instance, / is a real disk and update-grub works: the console
settings are also left in /etc/default/grub.d for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from . import log, mounts, partitions, runner
from .environment import Request
from .errors import ConfigError, DefinitionError
from .settings import Settings, is_number
from .target import Target, UnsafeFileError

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
# GRUB's ext2 module reads ext2, ext3 and ext4.
FILESYSTEM_MODULE = "ext2"

GRUB_CFG = "/boot/grub/grub.cfg"
# A drop-in rather than an edit of /etc/default/grub: that file belongs to
# grub-pc's maintainer scripts (ucf), which would ask about local changes.
GRUB_DEFAULTS_DROPIN = "/etc/default/grub.d/ganeti-instance-debootstrap.cfg"
# Debian's GRUB_TIMEOUT, so that the menu behaves the same after update-grub.
MENU_TIMEOUT_SECONDS = 5
DEFAULT_SERIAL_SPEED = "115200"

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
    speed = request.hv_params.get("serial_speed", "")
    return SerialConsole(device, speed if is_number(speed) else DEFAULT_SERIAL_SPEED)


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

# Why a system may lack GRUB or a kernel, for create and for import.
_WITHOUT_GRUB = (
    "A cache archive edited or made without them: remove it, and the next "
    "create bootstraps one with them. An imported backup of an instance "
    "made with bootloader=none: import it with bootloader=none and boot it "
    "with kernel_path, or install grub-pc and a kernel in it and export "
    "it again.")


def kernel_paths(t: Target) -> tuple[str, str] | None:
    """The kernel and initrd links GRUB loads (paths inside the instance), or None."""
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


def os_title(t: Target) -> str:
    """The system's PRETTY_NAME from os-release, for the menu entry."""
    try:
        text = t.read_text("/etc/os-release")
    except (FileNotFoundError, UnsafeFileError):
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "PRETTY_NAME" and value.strip():
            return value.strip().strip("'\"")
    return "Debian GNU/Linux"


def _grub_quote(text: str) -> str:
    """``text`` as one word in GRUB's shell-like syntax."""
    return "'" + text.replace("'", "'\\''") + "'"


# --- configuration files --------------------------------------------------------

def grub_cfg_text(*, root_uuid: str, style: str, console: SerialConsole | None,
                  kernel: str = "/vmlinuz", initrd: str = "/initrd.img",
                  title: str = "Debian GNU/Linux") -> str:
    """/boot/grub/grub.cfg booting ``kernel`` from the root filesystem ``root_uuid``."""
    modules = f"insmod {PARTITION_MODULES[style]}\ninsmod {FILESYSTEM_MODULE}\n"
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

@contextlib.contextmanager
def _package_umask() -> Iterator[None]:
    """The umask package tools run with, instead of Ganeti's 077.

    Under 077, /boot/grub and debconf's database would become private.
    """
    saved = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(saved)


def grub_install_argv(root: str, disk_device: str, style: str) -> list[str]:
    """grub-install, run in the instance at ``root``, for BIOS boot from ``disk_device``."""
    modules = f"{PARTITION_MODULES[style]} {FILESYSTEM_MODULE}"
    return ["chroot", root, "grub-install", f"--target={GRUB_TARGET}",
            f"--modules={modules}", disk_device]


def debconf_install_devices(device: str) -> bytes:
    """The debconf answer telling grub-pc upgrades which disk to install on."""
    return f"{GRUB_PACKAGE} {GRUB_PACKAGE}/install_devices multiselect {device}\n".encode()


def install(t: Target, request: Request, conf: Settings, *, disk_device: str,
            root_uuid: str, required: bool = True) -> bool:
    """Install and configure GRUB on ``disk_device`` when ``conf`` says grub.

    Runs the instance's own grub-install in a chroot with /proc, /sys and
    the node's /dev (where ``disk_device`` is) mounted; writes grub.cfg and
    the console drop-in, and grub-pc's debconf answer for later upgrades.
    A system without GRUB or kernel is an error if ``required``, else
    (import) a warning. Returns whether GRUB was installed.
    """
    if conf.bootloader != "grub":
        return False
    missing = missing_for_grub(t)
    if missing and required:
        raise BootloaderError(f"bootloader=grub, but the system on the disk "
                              f"lacks {missing}. {_WITHOUT_GRUB}")
    if missing:
        logger.warning("bootloader=grub, but the system on the disk lacks %s: "
                       "no boot loader is installed, boot the instance with "
                       "Ganeti's kernel_path.", missing)
        return False
    with log.phase("boot loader"):
        console = serial_console(request)
        if console is not None:
            t.write_text(GRUB_DEFAULTS_DROPIN, grub_defaults_text(console))
        inside = instance_disk_name(request)
        with mounts.api_filesystems(t.root), _package_umask():
            runner.run(["chroot", t.root, "debconf-set-selections"],
                       stdin=debconf_install_devices(inside))
            runner.run(grub_install_argv(t.root, disk_device, conf.partition_style),
                       hint=f"Installing GRUB on {disk_device} failed; "
                            f"BOOTLOADER=none boots the instance with Ganeti's "
                            f"kernel_path instead.")
        kernel = write_config(t, request, conf, root_uuid)
        logger.info("GRUB installed on %s (%s in the instance), booting %s",
                    disk_device, inside, kernel)
    return True


def write_config(t: Target, request: Request, conf: Settings, root_uuid: str) -> str:
    """Write and check grub.cfg for the instance at ``t``; return the kernel it boots."""
    kernel, initrd = kernel_paths(t) or KERNEL_LINKS[-1]
    t.write_text(GRUB_CFG, grub_cfg_text(
        root_uuid=root_uuid, style=conf.partition_style,
        console=serial_console(request), kernel=kernel, initrd=initrd,
        title=os_title(t)))
    check_config(t.read_text(GRUB_CFG))
    return kernel


def repair_config(t: Target, request: Request, conf: Settings, root_uuid: str) -> bool:
    """Write grub.cfg again if the hooks left it without a boot entry; True if so.

    A hook installing a kernel in the instance runs update-grub (the
    kernel's postinst hook does), which writes no entry while the root is
    on the node's loop device: the instance would stop at GRUB's prompt.
    """
    if conf.bootloader != "grub" or not t.exists(GRUB_CFG):
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
    write_config(t, request, conf, root_uuid)
    return True

