"""What create writes into the instance: its name, disks, network, console, identity.

Every file goes through :class:`~ganeti_debootstrap.target.Target`, so a
symlink planted in the tree (``etc/hostname -> /etc/hostname``) is replaced,
never followed onto the node. Each piece is a small function that the unit
tests drive on a synthetic tree; :func:`configure` runs them in order for
create, and import reuses :func:`rewrite_fstab`, :func:`reset_identity` and
:func:`remove_persistent_net_rules`. The NICs' configuration and the APT
sources have their own modules (network.py, apt_sources.py), run from here.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import access, apt_sources, cloudinit, filesystems, network, runner, systemd_units
from .environment import DEFAULT_SERIAL_SPEED, Request
from .errors import DefinitionError
from .filesystems import FsEntry
from .names import short_hostname
from .osparams import OSParams
from .settings import Settings
from .target import Target, UnsafeFileError

log = logging.getLogger(__name__)


class InstanceFilesError(DefinitionError):
    """The installed tree lacks something create must configure."""


@dataclass(frozen=True)
class Instance:
    """What the instance's own files are made from (built from the Request)."""

    name: str  # as Ganeti passes it: usually the FQDN
    serial_console: str | None = None  # "ttyS0", "hvc0" or None
    serial_speed: str = ""  # INSTANCE_HV_serial_speed (KVM), for inittab
    # The NICs and how to configure them; by default nothing beyond the
    # shell edition's loopback-only /etc/network/interfaces.
    network_plan: network.NetworkPlan = field(default_factory=network.NetworkPlan)
    # None: the APT sources stay as the bootstrap wrote them.
    apt: apt_sources.SourcesPlan | None = None
    # The OS parameters' keys, password hash and administrative user.
    login: access.Access = field(default_factory=access.Access)
    # cloud_init=nocloud: the seed (cloud-init then owns the network).
    cloud_seed: cloudinit.Seed | None = None

    def __post_init__(self) -> None:
        # The device name becomes part of paths and of /etc/inittab.
        if self.serial_console is not None and not re.fullmatch(
                r"[A-Za-z0-9]+", self.serial_console):
            raise ValueError(f"bad serial console device {self.serial_console!r}")

    @classmethod
    def from_request(cls, request: Request, params: OSParams | None = None,
                     conf: Settings | None = None) -> Instance:
        """The instance Ganeti describes; raises ConfigError for bad NIC variables.

        Without ``params`` the network is left as the shell edition left
        it; without ``conf`` so are the APT sources.
        """
        plan = network.NetworkPlan()
        seed = None
        if params is not None and params.network != "none":
            plan = network.NetworkPlan(params.network,
                                       network.nic_configs(request.nics, params.ipv6))
        if params is not None and params.cloud_init == "nocloud":
            # The same NICs and addresses, but in cloud-init's seed: our own
            # network files step aside (loopback only).
            seed = cloudinit.Seed(
                cloudinit.instance_id(request.ganeti_env.get("INSTANCE_UUID", ""),
                                      request.instance_name),
                request.instance_name, plan.nics,
                cloudinit.decode_user_data(params.user_data) if params.user_data else "",
                network=params.network != "none")
            plan = network.NetworkPlan()
        apt = None
        if conf is not None:
            mode = params.apt_sources if params is not None else "auto"
            apt = apt_sources.SourcesPlan.from_settings(conf, mode)
        return cls(name=request.instance_name,
                   serial_console=request.serial_console,
                   serial_speed=request.serial_speed,
                   network_plan=plan, apt=apt,
                   login=params.login() if params is not None else access.Access(),
                   cloud_seed=seed)


@dataclass(frozen=True)
class NodeFiles:
    """The node's files that the instance gets a copy of (tests point elsewhere)."""

    resolv_conf: str = "/etc/resolv.conf"
    # Where systemd-resolved lists the real servers when resolv.conf on the
    # node is its 127.0.0.53 stub, which is useless inside the instance.
    resolved_upstream: str = "/run/systemd/resolve/resolv.conf"


@dataclass(frozen=True)
class Configured:
    """What :func:`configure` did that the create log should show."""

    ssh_fingerprints: tuple[str, ...] = ()
    serial_console: str = ""  # "systemd", "inittab" or "" (none set up)
    network: str = "none"  # what the NICs were configured for (network.configure)
    apt_sources: tuple[str, ...] = ()  # the APT files written or removed


# --- names ------------------------------------------------------------------

def write_hostname(t: Target, name: str) -> None:
    """/etc/hostname holds the instance name as given (the shell edition's way)."""
    t.write_text("/etc/hostname", f"{name}\n")


def write_mailname(t: Target, name: str) -> None:
    """/etc/mailname holds the instance name (mail origin for MTAs)."""
    t.write_text("/etc/mailname", f"{name}\n")


def hosts_text(name: str, address: str = "") -> str:
    """/etc/hosts naming the instance, as Debian's installer writes it.

    With a static ``address`` the name maps to it; without one, to
    127.0.1.1, so that ``hostname --fqdn`` works without DNS either way.
    The node's own list of cluster hosts is deliberately not copied (it
    names the node, and leaks the cluster's layout).
    """
    short = short_hostname(name)
    names = name if short == name else f"{name}\t{short}"
    return ("127.0.0.1\tlocalhost\n"
            f"{address or '127.0.1.1'}\t{names}\n"
            "\n"
            "# The following lines are desirable for IPv6 capable hosts\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\n"
            "ff02::2\tip6-allrouters\n")


def write_hosts(t: Target, name: str, address: str = "") -> None:
    """Write /etc/hosts naming the instance (see :func:`hosts_text`)."""
    t.write_text("/etc/hosts", hosts_text(name, address))


# --- DNS --------------------------------------------------------------------

def usable_resolv_conf(text: str) -> bool:
    """Whether ``text`` names at least one name server reachable from an instance.

    A loopback server (systemd-resolved's 127.0.0.53 stub, a local dnsmasq)
    answers on the node only.
    """
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            if not address.is_loopback:
                return True
    return False


def _read_node_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def copy_resolv_conf(t: Target, node_files: NodeFiles) -> str | None:
    """Copy the node's resolver configuration; return the node file used, or None.

    The node's file may be a symlink (systemd-resolved, resolvconf): its
    content is copied. The instance's own may be a symlink too: it becomes
    a regular file. Without a usable file on the node the instance's is
    left as it is.
    """
    for source in (node_files.resolv_conf, node_files.resolved_upstream):
        text = _read_node_file(source)
        if text is not None and usable_resolv_conf(text):
            t.write_text("/etc/resolv.conf", text)
            return source
    log.warning("The node has no resolv.conf naming a non-loopback name "
                "server (%s, %s); the instance's /etc/resolv.conf is left as "
                "installed.", node_files.resolv_conf, node_files.resolved_upstream)
    return None


# --- filesystems ------------------------------------------------------------

FSTAB_HEADER = ("# /etc/fstab: static file system information.\n"
                "#\n"
                "# <file system> <mount point>   <type>  <options>       <dump>  <pass>\n")

# Where the EFI system partition (BOOTLOADER=grub-efi) is mounted; umask
# 0077: its files (boot loaders) are root's alone, as Debian's installer
# mounts it.
ESP_MOUNTPOINT = "/boot/efi"
ESP_OPTIONS = "umask=0077"

# Sources naming a device rather than a swap file on the root filesystem.
_DEVICE_SOURCES = ("UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/")

# The data disks (OS parameter data_disks=format): disk N is mounted at
# /srv/diskN. nofail: a data disk missing or damaged at boot must not stop
# the instance from booting (its administrator gets in to see why).
DATA_MOUNT_PREFIX = "/srv/disk"
DATA_OPTIONS = "defaults,nofail"
# fsck at boot (pass 2) where the filesystem has a boot-time check; xfs's
# fsck.xfs and btrfs's do nothing, and fstab(5) asks for 0 there.
_FSCK_PASS: dict[str, int] = {"ext2": 2, "ext3": 2, "ext4": 2}

# The swap file with PARTITION_STYLE=none and the OS parameter swap.
SWAP_FILE = "/swapfile"


@dataclass(frozen=True)
class DataMount:
    """A data disk's filesystem and where the instance mounts it."""

    index: int  # Ganeti's disk index: 1, 2...
    fs: FsEntry

    @property
    def mount_point(self) -> str:
        return f"{DATA_MOUNT_PREFIX}{self.index}"

    def fstab_line(self) -> str:
        return (f"UUID={self.fs.uuid}\t{self.mount_point}\t{self.fs.fstype}\t"
                f"{DATA_OPTIONS}\t0\t{_FSCK_PASS.get(self.fs.fstype, 0)}")


def _conflicts(line: str, mount_points: frozenset[str] = frozenset(),
               swap_file: str = "") -> bool:
    """Whether an fstab line is about the root, /boot/efi or a swap device (ours replace it).

    /boot/efi too when the new disk has no EFI system partition: an entry
    for one that no longer exists would stop the instance's boot. Also
    any line for one of our ``mount_points`` (data disks) or our
    ``swap_file``.
    """
    stripped = line.strip()
    if "UNCONFIGURED FSTAB" in stripped:  # debootstrap's placeholder
        return True
    if not stripped or stripped.startswith("#"):
        return False
    fields = stripped.split()
    if len(fields) >= 2 and fields[1] in ("/", ESP_MOUNTPOINT, *mount_points):
        return True
    if swap_file and fields[0] == swap_file:
        return True
    return (len(fields) >= 3 and fields[2] == "swap"
            and fields[0].startswith(_DEVICE_SOURCES))


def fstab_text(existing: str, root: FsEntry, swap: FsEntry | None,
               esp: FsEntry | None = None, *, swap_file: str = "",
               data: tuple[DataMount, ...] = ()) -> str:
    """``existing`` with its root and swap-device lines replaced by ours, by UUID.

    With ``esp``, a /boot/efi line for it (an old /boot/efi line goes).
    ``swap_file``: a swap line for that file (by path, the only name a
    file has); ``data``: a line for each data disk, by UUID, ``nofail``.

    Other entries (and comments) an administrator preseeded in the cache
    stay, after ours; debootstrap's placeholder goes.
    """
    header_lines = set(FSTAB_HEADER.splitlines())
    ours = frozenset(d.mount_point for d in data)
    kept = [ln for ln in existing.splitlines()
            if not _conflicts(ln, ours, swap_file) and ln not in header_lines]
    while kept and not kept[0].strip():
        kept.pop(0)
    while kept and not kept[-1].strip():
        kept.pop()
    options, fsck_pass = filesystems.fstab_fields(root.fstype)
    lines = [f"UUID={root.uuid}\t/\t{root.fstype}\t{options}\t0\t{fsck_pass}"]
    if swap is not None:
        lines.append(f"UUID={swap.uuid}\tnone\tswap\tsw\t0\t0")
    if swap_file:
        lines.append(f"{swap_file}\tnone\tswap\tsw\t0\t0")
    if esp is not None:
        lines.append(f"UUID={esp.uuid}\t{ESP_MOUNTPOINT}\t{esp.fstype}\t"
                     f"{ESP_OPTIONS}\t0\t1")
    lines += [d.fstab_line() for d in data]
    text = FSTAB_HEADER + "\n".join(lines) + "\n"
    if kept:
        text += "\n" + "\n".join(kept) + "\n"
    return text


FSTAB_ADVICE = ("It cannot be pointed at the instance's new disks, so the "
                "instance would not boot. Make it a regular text file in the "
                "system it came from (the exported instance, or the cache), "
                "then export and import again (or create again).")


def rewrite_fstab(t: Target, *, root: FsEntry, swap: FsEntry | None = None,
                  esp: FsEntry | None = None, swap_file: str = "",
                  data: tuple[DataMount, ...] = ()) -> None:
    """Point the tree's /etc/fstab at ``root``, ``swap``, ``esp``, the
    ``swap_file`` and the ``data`` disks (:func:`fstab_text`)."""
    try:
        existing = t.read_text("/etc/fstab", advice=FSTAB_ADVICE)
    except FileNotFoundError:
        existing = ""
    t.write_text("/etc/fstab", fstab_text(existing, root, swap, esp,
                                          swap_file=swap_file, data=data))


def make_data_mount_points(t: Target, data: tuple[DataMount, ...]) -> None:
    """Make the data disks' mount points (/srv/diskN, 0755) in the instance."""
    for mount in data:
        t.make_directories(mount.mount_point)


# --- swap file ------------------------------------------------------------------

# Root filesystems whose fallocate(2) gives a swap file the kernel accepts
# (swapon takes their allocated, unwritten extents). On ext2/ext3 (no
# extents, no fallocate) the file is written with zeros, as dd would.
_SWAP_FALLOCATE = frozenset({"ext4", "xfs"})
# What the root filesystem must keep free beside the swap file, so that
# the instance still boots, logs and installs packages.
SWAP_FILE_RESERVE_BYTES = 64 * 2**20
_ZEROS = bytes(2**20)


def _write_zeros(fd: int, size: int) -> None:
    left = size
    while left > 0:
        left -= os.write(fd, _ZEROS[:min(left, len(_ZEROS))])


def make_swap_file(t: Target, size: int, fstype: str) -> str:
    """Make the swap file /swapfile of ``size`` bytes (0600, no holes, mkswap).

    Refuses (InstanceFilesError) when the root filesystem would keep less
    than SWAP_FILE_RESERVE_BYTES free beside it. Returns its path in the
    instance, for fstab.
    """
    st = os.statvfs(t.path("/"))
    free = st.f_bavail * st.f_frsize
    if free < size + SWAP_FILE_RESERVE_BYTES:
        mib = 2**20
        raise InstanceFilesError(
            f"The root filesystem has {free // mib} MiB free once the system is "
            f"installed: too little for the swap file of {size // mib} MiB (OS "
            f"parameter swap) with {SWAP_FILE_RESERVE_BYTES // mib} MiB to spare. "
            f"Give less swap (-O swap=SIZE, or swap=0 for none) or a larger disk 0.")
    # An old one (a cache made from an instance) goes; ours is made anew.
    t.remove(SWAP_FILE)
    path = t.path_nofollow(SWAP_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise InstanceFilesError(
            f"The swap file {SWAP_FILE} cannot be made in the instance "
            f"({exc.strerror}): something that is not a file is in its place. "
            f"Remove it from the system the instance comes from (the cache), or "
            f"set swap=0.") from None
    try:
        # Whatever the umask: swap holds other processes' memory.
        os.fchmod(fd, 0o600)
        # Never sparse: swapon refuses a file with holes.
        if fstype in _SWAP_FALLOCATE:
            os.posix_fallocate(fd, 0, size)
        else:
            _write_zeros(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    filesystems.make_swap(path)
    return SWAP_FILE


# --- root password ----------------------------------------------------------

def clear_root_password(t: Target) -> None:
    """Empty root's password in /etc/shadow, keeping its mode, owner and other fields.

    This is the shell edition's documented behaviour: the administrator
    logs in on the console and sets one (Debian's PAM accepts an empty
    password there, ``nullok``).
    """
    try:
        st = os.stat(t.path("/etc/shadow"))
        text = t.read_text("/etc/shadow")
    except FileNotFoundError:
        raise InstanceFilesError(
            "The installed system has no /etc/shadow, so root's password "
            "cannot be cleared. The bootstrap cache is probably damaged: "
            "remove it so that the next create bootstraps afresh.") from None
    lines = text.split("\n")
    found = False
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            fields[1] = ""
            lines[i] = ":".join(fields)
            found = True
            break
    if not found:
        raise InstanceFilesError(
            "/etc/shadow in the installed system has no line for root, so "
            "root's password cannot be cleared. The bootstrap cache is "
            "probably damaged: remove it so that the next create bootstraps "
            "afresh.")
    t.write_text("/etc/shadow", "\n".join(lines), mode=stat.S_IMODE(st.st_mode))
    # shadow is root:shadow 0640 on Debian; the new file must be too.
    os.chown(t.path_nofollow("/etc/shadow"), st.st_uid, st.st_gid,
             follow_symlinks=False)


# --- packages ---------------------------------------------------------------

DPKG_STATUS = "/var/lib/dpkg/status"


def installed_package_versions(t: Target) -> dict[str, str]:
    """Installed package -> version, from dpkg's status file (empty if none)."""
    # Imported here, not at the top: python3-debian takes about 60 ms to
    # import, and only create's configuration reads dpkg's status.
    from debian import deb822

    try:
        f = open(t.path(DPKG_STATUS), encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    versions = {}
    with f:
        for para in deb822.Packages.iter_paragraphs(
                f, fields=["Package", "Status", "Version"], use_apt_pkg=False):
            # "install ok installed", "hold ok installed"; not "config-files".
            if para.get("Status", "").split()[-1:] == ["installed"]:
                versions[para["Package"]] = para.get("Version", "")
    return versions


def installed_packages(t: Target) -> frozenset[str]:
    """Names of the packages dpkg's status file lists as installed (empty if none)."""
    return frozenset(installed_package_versions(t))


# --- network ----------------------------------------------------------------

IFUPDOWN_PACKAGES = ("ifupdown", "ifupdown2", "ifupdown-ng")

INTERFACES_TEXT = network.LOOPBACK_INTERFACES


def uses_ifupdown(t: Target, packages: frozenset[str]) -> bool:
    """Whether the tree configures its network with /etc/network/interfaces."""
    return (any(p in packages for p in IFUPDOWN_PACKAGES)
            or t.exists("/sbin/ifup"))


def write_interfaces(t: Target) -> None:
    """/etc/network/interfaces with the loopback only (hooks add the rest)."""
    t.write_text("/etc/network/interfaces", INTERFACES_TEXT)


# --- serial console ---------------------------------------------------------

SERIAL_GETTY_UNIT = "serial-getty@.service"
GETTY_WANTS = f"{systemd_units.ETC_UNITS}/getty.target.wants"
SYSTEMD_FILE_LIST = "/var/lib/dpkg/info/systemd.list"
INITTAB = "/etc/inittab"
# agetty tries these in turn when the line's speed is not given: the
# speed GRUB and the kernel default to first.
DEFAULT_SERIAL_SPEEDS = f"{DEFAULT_SERIAL_SPEED},38400,9600"


def runs_systemd(t: Target) -> bool:
    """Whether the tree boots systemd (its /sbin/init is systemd)."""
    return os.path.basename(t.path("/sbin/init")) == "systemd"


def serial_getty_unit(t: Target) -> str | None:
    """Where the tree's systemd ships serial-getty@.service, as systemctl would link it.

    On merged-/usr trees both /lib and /usr/lib paths reach the file; the
    one systemd's package lists is the one systemctl uses (/lib up to
    bookworm, /usr/lib from trixie on).
    """
    try:
        listed = set(t.read_text(SYSTEMD_FILE_LIST).splitlines())
    except (FileNotFoundError, UnsafeFileError):
        listed = set()
    return systemd_units.find_unit(t, SERIAL_GETTY_UNIT, listed)


def enable_serial_getty(t: Target, device: str, unit: str) -> str:
    """Enable serial-getty@DEVICE the way ``systemctl enable`` would; return the link.

    systemd-getty-generator already starts a getty on a serial kernel
    console (``console=ttyS0``) and on hvc0; enabling the same unit name
    here changes nothing then (one unit, one getty) and gives a login
    prompt when the kernel command line names no serial console.
    """
    link = f"{GETTY_WANTS}/serial-getty@{device}.service"
    t.make_directories(GETTY_WANTS)
    dest = t.path_nofollow(link)
    if os.path.islink(dest) or os.path.isfile(dest):
        os.unlink(dest)
    os.symlink(unit, dest)
    return link


def inittab_getty_line(device: str, speed: str, used_ids: set[str]) -> str:
    """An inittab line respawning a getty on ``device`` with a free id."""
    match = re.fullmatch(r"([A-Za-z]+?)(\d*)", device)
    number = match.group(2) if match else ""
    candidates = [f"T{number}" if device.startswith("ttyS") else f"hv{number}"]
    candidates += [f"gs{i}" for i in range(10)]
    ident = next(c for c in candidates if c not in used_ids and len(c) <= 4)
    return (f"{ident}:2345:respawn:/sbin/getty -L {speed or DEFAULT_SERIAL_SPEEDS} "
            f"{device} vt100")


def add_inittab_getty(t: Target, device: str, speed: str = "") -> bool:
    """Add a getty on ``device`` to /etc/inittab unless one is there; True if added."""
    text = t.read_text(INITTAB)
    used: set[str] = set()
    for line in text.splitlines():
        if line.lstrip().startswith("#") or ":" not in line:
            continue
        fields = line.split(":", 3)
        used.add(fields[0])
        if len(fields) == 4 and device in fields[3].split():
            return False
    if text and not text.endswith("\n"):
        text += "\n"
    text += inittab_getty_line(device, speed, used) + "\n"
    t.write_text(INITTAB, text, mode=stat.S_IMODE(os.stat(t.path(INITTAB)).st_mode))
    return True


def enable_serial_console(t: Target, device: str, speed: str = "") -> str:
    """Give ``device`` a login getty; return how ("systemd", "inittab" or "").

    systemd trees get the unit enabled, sysvinit trees an inittab line;
    never both.
    """
    if runs_systemd(t):
        unit = serial_getty_unit(t)
        if unit is None:
            log.warning("The instance runs systemd but has no "
                        "serial-getty@.service; no getty on %s.", device)
            return ""
        log.debug("serial console %s: %s enabled", device,
                  enable_serial_getty(t, device, unit))
        return "systemd"
    if os.path.isfile(t.path(INITTAB)):
        added = add_inittab_getty(t, device, speed)
        log.debug("serial console %s: %s", device,
                  "getty added to /etc/inittab" if added else "inittab has one")
        return "inittab"
    log.warning("The instance has neither systemd nor /etc/inittab (a "
                "minbase install?); no getty on its serial console %s.", device)
    return ""


# --- leftovers from the bootstrap ---------------------------------------------

APT_ARCHIVES = "/var/cache/apt/archives"
PERSISTENT_NET_RULES = ("/etc/udev/rules.d/70-persistent-net.rules",
                        "/etc/udev/rules.d/z25_persistent-net.rules")


def _entries(t: Target, inner: str) -> Iterator[str]:
    directory = t.path(inner)
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            yield f"{inner}/{name}"


def remove_downloaded_packages(t: Target) -> list[str]:
    """Remove downloaded .deb files and partial downloads; return what went."""
    removed = [p for p in _entries(t, APT_ARCHIVES)
               if p.endswith(".deb") and t.remove(p)]
    # apt recreates partial/ itself, but keep the directory as apt left it.
    removed += [p for p in _entries(t, f"{APT_ARCHIVES}/partial") if t.remove(p)]
    return removed


def remove_persistent_net_rules(t: Target) -> list[str]:
    """Remove udev's remembered interface names (they name the node's NICs)."""
    return [p for p in PERSISTENT_NET_RULES if t.remove(p)]


# --- identity -----------------------------------------------------------------

MACHINE_ID = "/etc/machine-id"
DBUS_MACHINE_ID = "/var/lib/dbus/machine-id"
# Seeds and secrets that must differ between instances made from one cache.
SEED_FILES = ("/var/lib/systemd/random-seed", "/var/lib/urandom/random-seed",
              "/var/lib/systemd/credential.secret")


def reset_identity(t: Target) -> list[str]:
    """Make the tree's machine ID and random seeds its own; return what changed.

    An empty /etc/machine-id makes systemd generate an ID at boot and
    commit it, without first-boot presets (machine-id(5), "First Boot
    Semantics"). dbus's copy goes if it is a file (systemd would reuse it
    as the ID); a symlink to /etc/machine-id stays.
    """
    changed = []
    if t.exists(MACHINE_ID):
        mode = 0o444
        real = t.path(MACHINE_ID)
        if os.path.isfile(real):
            mode = stat.S_IMODE(os.stat(real).st_mode)
        t.write_text(MACHINE_ID, "", mode=mode)
        changed.append(MACHINE_ID)
    if not os.path.islink(t.path_nofollow(DBUS_MACHINE_ID)) and t.remove(DBUS_MACHINE_ID):
        changed.append(DBUS_MACHINE_ID)
    changed += [p for p in SEED_FILES if t.remove(p)]
    return changed


SSH_DIR = "/etc/ssh"
SSH_KEY_TYPES = ("rsa", "ecdsa", "ed25519")
_HOST_KEY = re.compile(r"ssh_host_(\w+)_key(\.pub|-cert\.pub)?")


def _ssh_strings(blob: bytes) -> list[bytes]:
    """The length-prefixed strings of an SSH public key blob (RFC 4251)."""
    out = []
    pos = 0
    while pos + 4 <= len(blob):
        size = int.from_bytes(blob[pos:pos + 4], "big")
        out.append(blob[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


def fingerprint(pub_line: str) -> str:
    """A public key line as ``ssh-keygen -l`` shows it: bits, SHA256, comment, type."""
    fields = pub_line.split(None, 2)
    blob = base64.b64decode(fields[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    parts = _ssh_strings(blob)
    kind = parts[0].decode()
    if kind == "ssh-rsa":
        bits, label = int.from_bytes(parts[2], "big").bit_length(), "RSA"
    elif kind.startswith("ecdsa-sha2-nistp"):
        bits, label = int(kind.rsplit("nistp", 1)[1]), "ECDSA"
    elif kind == "ssh-ed25519":
        bits, label = 256, "ED25519"
    else:
        bits, label = 0, kind
    comment = fields[2].strip() if len(fields) > 2 else "no comment"
    return f"{bits} SHA256:{digest} {comment} ({label})"


def regenerate_ssh_host_keys(t: Target, comment: str,
                             packages: frozenset[str] | None = None) -> tuple[str, ...]:
    """Replace the tree's SSH host keys by new ones; return their fingerprints.

    Only when openssh-server is installed: every instance from one cache
    would otherwise share the keys. ssh-keygen runs on the node, writing
    into the tree; DSA keys are not made again (OpenSSH dropped them).
    """
    if packages is None:
        packages = installed_packages(t)
    if "openssh-server" not in packages and not t.exists("/usr/sbin/sshd"):
        return ()
    found = []
    for inner in _entries(t, SSH_DIR):
        match = _HOST_KEY.fullmatch(os.path.basename(inner))
        if match and t.remove(inner) and not match.group(2):
            found.append(match.group(1))
    types = [k for k in SSH_KEY_TYPES if k in found] or list(SSH_KEY_TYPES)
    t.make_directories(SSH_DIR)
    prints = []
    for kind in types:
        inner = f"{SSH_DIR}/ssh_host_{kind}_key"
        path = t.path_nofollow(inner)
        runner.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment,
                    "-f", path])
        # Under Ganeti's umask 077 the public half would be 0600.
        os.chmod(path, 0o600)
        os.chmod(path + ".pub", 0o644)
        prints.append(fingerprint(t.read_text(inner + ".pub")))
    return tuple(prints)


# --- everything, in order -----------------------------------------------------

def configure(t: Target, instance: Instance, *, root: FsEntry,
              swap: FsEntry | None = None, esp: FsEntry | None = None,
              swap_file: str = "", data: tuple[DataMount, ...] = (),
              node_files: NodeFiles = NodeFiles()) -> Configured:
    """Write the instance's own files into the freshly installed tree at ``t``.

    ``swap_file`` (made by :func:`make_swap_file`) and the ``data`` disks
    get their fstab lines, the data disks their mount points.
    """
    versions = installed_package_versions(t)
    packages = frozenset(versions)
    seed = instance.cloud_seed
    if seed is not None:
        cloudinit.require_installed(packages)
    net = network.configure(t, instance.network_plan,
                            has_ifupdown=uses_ifupdown(t, packages),
                            packages=packages, versions=versions)
    if instance.network_plan.nics:
        log.info("Network of %d NIC(s) configured for %s", len(instance.network_plan.nics),
                 net.renderer)
    log.debug("network files: %s", ", ".join(net.files) or "none")
    write_hostname(t, instance.name)
    write_mailname(t, instance.name)
    host_address = net.host_address
    if seed is not None:
        files = cloudinit.write_seed(t, seed)
        log.info("cloud-init seed written for instance-id %s (%d NIC(s)); cloud-init "
                 "configures the network", seed.instance_id, len(seed.nics))
        log.debug("cloud-init files: %s", ", ".join(files))
        host_address = network.host_address(seed.nics)
    write_hosts(t, instance.name, host_address)
    copy_resolv_conf(t, node_files)
    rewrite_fstab(t, root=root, swap=swap, esp=esp, swap_file=swap_file, data=data)
    make_data_mount_points(t, data)
    if instance.login.given:
        log.info("Access: %s", access.configure(t, instance.login, packages))
    else:
        clear_root_password(t)
    apt_files: list[str] = []
    if instance.apt is not None:
        apt_files = apt_sources.configure(t, instance.apt)
        log.debug("APT sources: %s", ", ".join(apt_files) or "left as they were")
    console = ""
    if instance.serial_console:
        console = enable_serial_console(t, instance.serial_console,
                                        instance.serial_speed)
    removed = remove_downloaded_packages(t) + remove_persistent_net_rules(t)
    removed += reset_identity(t)
    log.debug("removed or reset in the instance: %s", ", ".join(removed) or "nothing")
    prints = regenerate_ssh_host_keys(t, f"root@{instance.name}", packages)
    for line in prints:
        log.info("SSH host key %s", line)
    return Configured(ssh_fingerprints=prints, serial_console=console,
                      network=net.renderer, apt_sources=tuple(apt_files))
