"""The OS parameters this definition declares (parameters.list) and their checks.

Ganeti passes each as ``OSP_<NAME>``; ``verify parameters`` runs before every
add, reinstall, import and ``gnt-instance modify -O``, so a bad value is
refused before any disk is touched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import access, cloudinit
from .apt_sources import APT_SOURCES_MODES
from .errors import ConfigError
from .filesystems import ROOT_TYPES
from .names import line_break_problem
from .network import IPV6_MODES, NETWORK_MODES
from .settings import BOOTLOADERS

MIB = 2**20

# OS parameter swap: a size as Ganeti writes disk sizes (gnt-instance add
# -s 10G): a whole number of MiB, or one with the unit M, G or T (binary;
# "MiB", "GB"... accepted too); 0 is none.
_SIZE = re.compile(r"([0-9]{1,12})(?:([MGTmgt])(?:i?[Bb])?)?")
_UNIT_MIB = {"": 1, "m": 1, "g": 2**10, "t": 2**20}
# The largest block device Linux addresses (8 EiB): a bigger swap can never
# fit, and the number stays bounded before anything is computed from it.
MAX_SWAP_MIB = 2**43
# data_disks: "none" leaves disks 1..n alone (as before), "format" gives
# each a filesystem of the type data_filesystem names (instance_disk.py).
DATA_DISK_MODES = ("none", "format")

def swap_mib(value: str) -> int:
    """The swap size ``value`` (OS parameter swap) in MiB; 0 for none.

    Raises ValueError (with the reason) for anything but a size.
    """
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(
            "is not a size: give a whole number with the unit M, G or T (512M, "
            "1G; a plain number counts MiB), or 0 for no swap")
    mib = int(match.group(1)) * _UNIT_MIB[(match.group(2) or "").lower()]
    if mib > MAX_SWAP_MIB:
        raise ValueError(f"is larger than any disk ({MAX_SWAP_MIB} MiB, 8 EiB): "
                         f"give the swap size in MiB, G or T (512M, 1G)")
    return mib


def swap_problem(value: str) -> str | None:
    """Why ``value`` is not a swap size (see :func:`swap_mib`), or None."""
    try:
        swap_mib(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Parameter:
    """One declared OS parameter with its accepted values.

    A free-form one has no ``choices`` but a ``check`` (why a value is
    refused, or None). A ``sensitive`` one (keys, hashes, user data) is
    never quoted in a message, whatever its value. ``needs`` refuses a
    value the system's packages (EXTRA_PKGS) cannot serve, before the disk
    is touched.
    """

    name: str
    description: str
    choices: tuple[str, ...]
    default: str
    check: Callable[[str], str | None] | None = None
    sensitive: bool = False
    needs: Callable[[str, tuple[str, ...]], None] | None = None


_PARAMETER = "parameter"


def parameter(description: str, choices: tuple[str, ...] = (), default: str = "",
              check: Callable[[str], str | None] | None = None, *,
              sensitive: bool = False,
              needs: Callable[[str, tuple[str, ...]], None] | None = None) -> Any:
    """A field of OSParams declaring the parameter of its name (see :class:`Parameter`)."""
    spec = Parameter("", description, choices, default, check, sensitive, needs)
    return field(default=default, metadata={_PARAMETER: spec})


@dataclass(frozen=True, repr=False)
class OSParams:
    """The validated OS parameters of one instance.

    Every parameter is declared once, here: the field is its name (OSP_<NAME>
    in Ganeti's environment), :func:`parameter` its description (the line
    of parameters.list), accepted values, default and checks.
    """

    # Empty (the default) leaves the choice to the FILESYSTEM setting.
    filesystem: str = parameter(
        "Root filesystem type: ext4, ext3, ext2, xfs or btrfs; default: the "
        "FILESYSTEM setting (ext4)", ROOT_TYPES, "")
    # Empty (the default) leaves the choice to the BOOTLOADER setting.
    bootloader: str = parameter(
        "Boot loader on disk 0: none (Ganeti boots the node's kernel, kernel_path), "
        "grub (BIOS) or grub-efi (UEFI; both boot with an empty kernel_path); "
        "default: the BOOTLOADER setting", BOOTLOADERS, "")
    network: str = parameter(
        "Network configuration from the instance's NICs: auto (default: ifupdown if "
        "installed, else systemd-networkd), ifupdown, networkd or none (loopback "
        "only)", NETWORK_MODES, "auto")
    ipv6: str = parameter(
        "IPv6 on NICs whose Ganeti network has an IPv6 subnet: eui64 (default: "
        "static address derived from the MAC), slaac (router advertisements) or none",
        IPV6_MODES, "eui64")
    apt_sources: str = parameter(
        "APT sources written into the instance: auto (default: deb822 where the "
        "release uses it, else one-line), deb822, one-line or keep (as bootstrapped)",
        APT_SOURCES_MODES, "auto")
    ssh_authorized_keys: str = parameter(
        "SSH public keys for root (or admin_user), separated by ';'; best passed as "
        "a private parameter (--os-parameters-private)",
        check=access.keys_problem, sensitive=True)
    password_hash: str = parameter(
        "crypt(3) hash (yescrypt $y$ or SHA-512 $6$) of the password for root (or "
        "admin_user), never plain text; pass it as a secret parameter "
        "(--os-parameters-secret)", check=access.password_hash_problem, sensitive=True)
    admin_user: str = parameter(
        "An administrative user made by create, in the group sudo, who gets the keys "
        "and the password hash instead of root (root's password is then locked); "
        "needs sudo in EXTRA_PKGS",
        check=access.admin_user_problem, needs=access.refuse_without_sudo)
    cloud_init: str = parameter(
        "cloud-init seed: no (default) or nocloud (a NoCloud seed with the instance's "
        "UUID, name, NICs and user_data; our network files step aside; needs "
        "cloud-init in EXTRA_PKGS)", cloudinit.CLOUD_INIT_MODES, "no",
        needs=cloudinit.refuse_without_cloud_init)
    user_data: str = parameter(
        "cloud-init user data for cloud_init=nocloud, base64-encoded: #cloud-config "
        "(valid YAML) or a #! script, at most 16 KiB; best passed as a private "
        "parameter", check=cloudinit.user_data_problem, sensitive=True)
    swap: str = parameter(
        "Swap space: a size (512M, 1G; a plain number counts MiB) for a swap "
        "partition at the end of disk 0 (a swap file /swapfile with "
        "PARTITION_STYLE=none); 0 (default): none", default="0", check=swap_problem)
    data_disks: str = parameter(
        "Disks 1 and up: none (default: left untouched) or format (a filesystem "
        "of type data_filesystem on each whole disk, mounted by UUID at "
        "/srv/disk1, /srv/disk2... with nofail)", DATA_DISK_MODES, "none")
    data_filesystem: str = parameter(
        "Filesystem type of the data disks (data_disks=format): one of those the "
        "parameter filesystem accepts; default: ext4", ROOT_TYPES, "ext4")

    @property
    def swap_bytes(self) -> int:
        """The swap asked for (OS parameter swap), in bytes; 0 for none."""
        return swap_mib(self.swap) * MIB

    def login(self) -> access.Access:
        """Who gets in, and how (see access.py)."""
        return access.Access(keys=tuple(access.split_keys(self.ssh_authorized_keys)),
                             password_hash=self.password_hash,
                             admin_user=self.admin_user)

    def __repr__(self) -> str:
        # A traceback or a debug line must not show a key or a hash.
        shown = {k: ("<not shown>" if v and k in SENSITIVE else v)
                 for k, v in vars(self).items()}
        return f"OSParams({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


# The table of every parameter, in the order of parameters.list.
PARAMETERS: tuple[Parameter, ...] = tuple(
    dataclasses.replace(f.metadata[_PARAMETER], name=f.name)
    for f in dataclasses.fields(OSParams))

SENSITIVE = frozenset(p.name for p in PARAMETERS if p.sensitive)


def parameters_list() -> str:
    """The text of parameters.list: one ``name description`` a line."""
    return "".join(f"{p.name} {p.description}\n" for p in PARAMETERS)


def validate(raw: Mapping[str, str]) -> OSParams:
    """Check every OSP_* value; one error lists every problem and the choices."""
    problems = []
    known = {p.name: p for p in PARAMETERS}
    values = {}
    for name, value in sorted(raw.items()):
        # A tenant sets these (gnt-instance modify -O): a line break is
        # refused first, by name, whatever the parameter, so that no value
        # holding one gets further (not even into a message of ours).
        why = line_break_problem(name)
        if why is not None:
            problems.append(f"the name of the OS parameter {name!r} {why}")
            continue
        why = line_break_problem(value)
        if why is not None:
            shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
            if name in SENSITIVE:
                shown = "(value not shown)"
            problems.append(
                f"OS parameter {name}={shown} (OSP_{name.upper()}) {why}; OS "
                f"parameters are single-line values (gnt-instance modify -O "
                f"{name}=VALUE INSTANCE)")
            continue
        param = known.get(name)
        if param is None:
            problems.append(
                f"OS parameter {name!r} (OSP_{name.upper()}) is not one this OS "
                f"definition declares; known: {', '.join(sorted(known))}")
            continue
        if value == "":
            values[name] = param.default
        elif param.check is not None:
            why = param.check(value)
            if why is None:
                values[name] = value
            elif param.sensitive:
                problems.append(f"OS parameter {name} (value not shown) {why}")
            else:
                problems.append(f"OS parameter {name}={value!r} {why}")
        elif value not in param.choices:
            problems.append(
                f"OS parameter {name}={value!r} is not accepted; choose one of "
                f"{', '.join(param.choices)} (e.g. gnt-instance modify -O "
                f"{name}={param.default or param.choices[0]} INSTANCE)")
        else:
            values[name] = value
    if problems:
        raise ConfigError("Invalid OS parameters:\n  " + "\n  ".join(problems))
    return OSParams(**values)


def check_packages(params: OSParams, extra_pkgs: tuple[str, ...]) -> None:
    """Refuse parameters whose value needs a package the system will lack.

    Run by create once EXTRA_PKGS is final (a boot loader's packages added),
    before the disk is touched.
    """
    for spec in PARAMETERS:
        if spec.needs is not None:
            spec.needs(getattr(params, spec.name), extra_pkgs)
