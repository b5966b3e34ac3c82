"""The instance's network, from Ganeti's NIC variables, for ifupdown or systemd-networkd.

Ganeti gives every NIC a MAC address (``NIC_N_MAC``) and, when the NIC is on
a Ganeti network, that network's subnets and gateways (``NIC_N_NETWORK_*``)
plus an IPv4 address from its pool (``NIC_N_IP``). What the instance gets:

* Names. A systemd ``.link`` file per NIC names the interface with that MAC
  ``nicN`` (N = Ganeti's NIC index). udev applies .link files
  (80-net-setup-link.rules) whichever network tool runs, and Debian's
  initramfs copies them, so ifupdown's and networkd's files can use the
  name. ifupdown cannot match a MAC itself: its ``rename`` stanza matches
  names, and ``hwaddress`` *sets* the MAC. ``ethN`` is avoided on purpose:
  systemd.link(5) warns that a name from the kernel's own namespace races
  with the kernel's assignment, and when the kernel numbers two NICs in the
  other order both renames fail, leaving NIC 0's settings on NIC 1.
* IPv4. A static address when ``NIC_N_IP`` is set and the NIC is on a Ganeti
  network (prefix length from ``_SUBNET``, gateway from ``_GATEWAY``);
  otherwise DHCP.
* IPv6. Ganeti assigns no IPv6 address to a NIC, only the network's
  ``_SUBNET6`` and ``_GATEWAY6``. By default (``ipv6=eui64``) the NIC gets
  the address derived from its MAC inside SUBNET6 (modified EUI-64, RFC 4291
  appendix A): the very address SLAAC would form on that prefix, so it
  agrees with what a router advertising the prefix expects, yet needs no
  router advertisement daemon, and it is stable across reinstalls because
  the MAC is Ganeti's. ``ipv6=slaac`` takes addresses from router
  advertisements instead, with the static GATEWAY6 as default route;
  ``ipv6=none`` leaves IPv6 to the kernel's defaults.
* One default route per address family: through the first NIC that has a
  gateway (a second ``gateway`` line makes ifupdown's ``ip route add`` fail
  with "File exists"; two networkd default routes of equal metric make the
  outgoing interface depend on luck).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .environment import Nic
from .errors import ConfigError
from .names import one_line
from .systemd_units import enable_unit, find_unit
from .target import Target, UnsafeFileError

log = logging.getLogger(__name__)

NETWORK_MODES = ("auto", "ifupdown", "networkd", "none")
IPV6_MODES = ("eui64", "slaac", "none")

INTERFACE_PREFIX = "nic"
SYSTEMD_NETWORK_DIR = "/etc/systemd/network"
INTERFACES = "/etc/network/interfaces"
# Before 99-default.link: udev applies only the first .link file that matches.
FILE_PREFIX = "10-ganeti-"
# PermanentMACAddress= appeared in systemd 245 (bullseye has 247, buster 241).
PERMANENT_MAC_SINCE = 245

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")


@dataclass(frozen=True)
class NicConfig:
    """One NIC as the instance configures it: validated, addresses parsed."""

    index: int
    mac: str  # lower case, colon separated
    network_name: str = ""
    address4: ipaddress.IPv4Interface | None = None  # None: DHCP
    gateway4: ipaddress.IPv4Address | None = None
    address6: ipaddress.IPv6Interface | None = None
    gateway6: ipaddress.IPv6Address | None = None
    slaac: bool = False  # IPv6 addresses from router advertisements

    @property
    def name(self) -> str:
        """The interface name in the instance (given by its .link file)."""
        return f"{INTERFACE_PREFIX}{self.index}"

    def describe(self) -> str:
        """One line for the comment above the NIC's settings.

        The network name is a tenant's (gnt-network add): checked for line
        breaks where Ganeti's variables are read, and escaped here as well,
        so that the comment stays one line whatever the name holds.
        """
        where = f", network {one_line(self.network_name)}" if self.network_name else ""
        return f"Ganeti NIC {self.index}: MAC {self.mac}{where}"


@dataclass(frozen=True)
class NetworkPlan:
    """How to configure the network: the mode (OS parameter) and the NICs."""

    mode: str = "none"
    nics: tuple[NicConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in NETWORK_MODES:
            raise ValueError(f"bad network mode {self.mode!r}")


@dataclass(frozen=True)
class NetworkResult:
    """What :func:`configure` did."""

    renderer: str  # "ifupdown", "networkd" or "none"
    files: tuple[str, ...] = ()
    host_address: str = ""  # the instance's static IPv4 address, for /etc/hosts


# --- reading Ganeti's variables -----------------------------------------------

def eui64_address(subnet: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The address SLAAC forms from ``mac`` on ``subnet`` (modified EUI-64).

    The interface identifier is the MAC with ff:fe in its middle and the
    universal/local bit flipped (RFC 4291 appendix A); ``subnet`` must be a
    /64 or shorter.
    """
    octets = bytes.fromhex(mac.replace(":", ""))
    ident = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return ipaddress.IPv6Address(int(subnet.network_address)
                                 | int.from_bytes(ident, "big"))


_Address = TypeVar("_Address", ipaddress.IPv4Address, ipaddress.IPv6Address)
_ADDRESS_EXAMPLES: dict[type, tuple[int, str]] = {
    ipaddress.IPv4Address: (4, "192.0.2.10"), ipaddress.IPv6Address: (6, "2001:db8::1")}


class _Checker:
    """Collects every problem of every NIC, so that one error lists them all."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, variable: str, value: str, why: str) -> None:
        self.problems.append(f"{variable}={value!r} {why}")

    def mac(self, n: int, value: str) -> str | None:
        var = f"NIC_{n}_MAC"
        mac = value.strip().lower()
        if not mac:
            self.problems.append(f"{var} is missing (Ganeti gives every NIC a MAC "
                                 f"address)")
            return None
        if not _MAC.fullmatch(mac):
            self.bad(var, value, "is not a MAC address such as aa:00:00:12:34:56")
            return None
        if int(mac[:2], 16) & 1:
            self.bad(var, value, "is a multicast address, not a NIC's address")
            return None
        return mac

    def network4(self, n: int, value: str) -> ipaddress.IPv4Network | None:
        net = self._network(f"NIC_{n}_NETWORK_SUBNET", value, 4, "192.0.2.0/24")
        return net if isinstance(net, ipaddress.IPv4Network) else None

    def network6(self, n: int, value: str) -> ipaddress.IPv6Network | None:
        net = self._network(f"NIC_{n}_NETWORK_SUBNET6", value, 6, "2001:db8::/64")
        return net if isinstance(net, ipaddress.IPv6Network) else None

    def _network(self, var: str, value: str, version: int,
                 example: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """``value`` as an IP ``version`` network, or None (empty, or a problem noted)."""
        if not value:
            return None
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError:
            self.bad(var, value, f"is not a network such as {example}")
            return None
        if net.version != version:
            self.bad(var, value, f"is not an IPv{version} network")
            return None
        return net

    def address(self, var: str, value: str, kind: type[_Address]) -> _Address | None:
        """``value`` as an address of ``kind``, or None (a problem noted)."""
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            address = None
        if not isinstance(address, kind):
            version, example = _ADDRESS_EXAMPLES[kind]
            self.bad(var, value, f"is not an IPv{version} address such as {example}")
            return None
        return address

    def gateway(self, n: int, value: str, subnet: str,
                kind: type[_Address]) -> _Address | None:
        """NIC ``n``'s gateway ``value`` (of the network ``subnet``), or None."""
        suffix = "" if kind is ipaddress.IPv4Address else "6"
        var = f"NIC_{n}_NETWORK_GATEWAY{suffix}"
        gateway = self.address(var, value, kind) if value else None
        if value and not subnet:
            self.problems.append(f"{var}={value!r} is set without "
                                 f"NIC_{n}_NETWORK_SUBNET{suffix}")
        return gateway


def _ipv4(check: _Checker, nic: Nic) -> tuple[ipaddress.IPv4Interface | None,
                                                ipaddress.IPv4Address | None]:
    n = nic.index
    subnet = check.network4(n, nic.subnet)
    address = (check.address(f"NIC_{n}_IP", nic.ip, ipaddress.IPv4Address)
               if nic.ip else None)
    gateway = check.gateway(n, nic.gateway, nic.subnet, ipaddress.IPv4Address)
    if subnet is None:
        if address is not None:
            # Without a Ganeti network (e.g. a routed NIC) the prefix length
            # is unknown: DHCP, as the shell edition's users configured it.
            log.info("NIC %d has the address %s but is on no Ganeti network "
                     "(no NIC_%d_NETWORK_SUBNET); it is configured by DHCP.",
                     n, address, n)
        return None, None
    if address is not None:
        if address not in subnet:
            check.bad(f"NIC_{n}_IP", nic.ip, f"is not inside the NIC's network "
                      f"{subnet} (NIC_{n}_NETWORK_SUBNET)")
            address = None
        elif subnet.prefixlen < 31 and address in (subnet.network_address,
                                                   subnet.broadcast_address):
            check.bad(f"NIC_{n}_IP", nic.ip, f"is the network or broadcast "
                      f"address of {subnet}, not a host's")
            address = None
    if gateway is not None:
        if gateway not in subnet:
            check.bad(f"NIC_{n}_NETWORK_GATEWAY", nic.gateway,
                      f"is not inside the network {subnet} "
                      f"(NIC_{n}_NETWORK_SUBNET)")
            gateway = None
        elif gateway == address:
            check.bad(f"NIC_{n}_NETWORK_GATEWAY", nic.gateway,
                      f"is the NIC's own address (NIC_{n}_IP)")
            gateway = None
    if address is None:
        return None, None
    return ipaddress.IPv4Interface(f"{address}/{subnet.prefixlen}"), gateway


def _ipv6(check: _Checker, nic: Nic, mac: str | None,
          mode: str) -> tuple[ipaddress.IPv6Interface | None,
                              ipaddress.IPv6Address | None, bool]:
    n = nic.index
    subnet = check.network6(n, nic.subnet6)
    gateway = check.gateway(n, nic.gateway6, nic.subnet6, ipaddress.IPv6Address)
    if subnet is None or mode == "none":
        return None, None, False
    # A router's link-local address is a common and valid IPv6 gateway.
    if gateway is not None and gateway not in subnet and gateway not in _LINK_LOCAL6:
        check.bad(f"NIC_{n}_NETWORK_GATEWAY6", nic.gateway6,
                  f"is neither inside the network {subnet} "
                  f"(NIC_{n}_NETWORK_SUBNET6) nor a link-local address")
        gateway = None
    if mode == "slaac":
        return None, gateway, True
    if subnet.prefixlen > 64:
        check.bad(f"NIC_{n}_NETWORK_SUBNET6", nic.subnet6,
                  "is longer than /64, which leaves no room for the address "
                  "derived from the MAC (OS parameter ipv6=eui64); use "
                  "ipv6=slaac or ipv6=none, or a /64 network")
        return None, None, False
    if mac is None:
        return None, None, False
    address = eui64_address(subnet, mac)
    if gateway == address:
        check.bad(f"NIC_{n}_NETWORK_GATEWAY6", nic.gateway6,
                  f"is the NIC's own address derived from NIC_{n}_MAC")
        gateway = None
    return ipaddress.IPv6Interface(f"{address}/{subnet.prefixlen}"), gateway, False


def nic_configs(nics: Sequence[Nic], ipv6: str = "eui64") -> tuple[NicConfig, ...]:
    """Check Ganeti's NIC variables and work out each NIC's addresses.

    Raises ConfigError naming every bad variable. Only the first NIC with a
    gateway of a family keeps it (see the module docstring).
    """
    if ipv6 not in IPV6_MODES:
        raise ValueError(f"bad ipv6 mode {ipv6!r}")
    check = _Checker()
    configs = []
    seen: dict[str, int] = {}
    for nic in nics:
        mac = check.mac(nic.index, nic.mac)
        if mac is not None and mac in seen:
            check.bad(f"NIC_{nic.index}_MAC", nic.mac,
                      f"is also NIC {seen[mac]}'s (NIC_{seen[mac]}_MAC)")
        elif mac is not None:
            seen[mac] = nic.index
        address4, gateway4 = _ipv4(check, nic)
        address6, gateway6, slaac = _ipv6(check, nic, mac, ipv6)
        configs.append(NicConfig(index=nic.index, mac=mac or "",
                                 network_name=nic.network_name,
                                 address4=address4, gateway4=gateway4,
                                 address6=address6, gateway6=gateway6, slaac=slaac))
    if check.problems:
        # The advice first: Ganeti shows the log's last lines, and the last
        # one must name the variable that is wrong.
        raise ConfigError(
            "Invalid NIC settings from Ganeti: fix the instance's NIC (gnt-instance "
            "modify --net N:...) or its network (gnt-network info), or set the OS "
            "parameter network=none to leave the instance's network unconfigured."
            "\n  " + "\n  ".join(check.problems))
    return _one_default_route(configs)


def _unless_taken(index: int, gateway: _Address | None, taken: bool) -> _Address | None:
    """NIC ``index``'s ``gateway``; None when an earlier NIC has the route (``taken``)."""
    if gateway is not None and taken:
        log.info("NIC %d's IPv%d gateway %s is not used: the default route "
                 "goes through the first NIC with a gateway.", index, gateway.version,
                 gateway)
        return None
    return gateway


def _one_default_route(configs: list[NicConfig]) -> tuple[NicConfig, ...]:
    out = []
    have4 = have6 = False
    for c in configs:
        gateway4 = _unless_taken(c.index, c.gateway4, have4)
        gateway6 = _unless_taken(c.index, c.gateway6, have6)
        have4 = have4 or gateway4 is not None
        have6 = have6 or gateway6 is not None
        out.append(NicConfig(c.index, c.mac, c.network_name, c.address4, gateway4,
                             c.address6, gateway6, c.slaac))
    return tuple(out)


def host_address(nics: Sequence[NicConfig]) -> str:
    """The first static IPv4 address, as /etc/hosts names the instance; or ""."""
    for nic in nics:
        if nic.address4 is not None:
            return str(nic.address4.ip)
    return ""


# --- systemd-udevd: names -------------------------------------------------------

def link_path(nic: NicConfig) -> str:
    return f"{SYSTEMD_NETWORK_DIR}/{FILE_PREFIX}{nic.name}.link"


def link_text(nic: NicConfig, permanent_mac: bool = True) -> str:
    """The .link file naming the interface with the NIC's MAC ``nicN``.

    PermanentMACAddress= (systemd 245+) matches the address the device was
    made with, so a VLAN or bridge that borrows the MAC is not renamed too;
    older udev only knows MACAddress=.
    """
    key = "PermanentMACAddress" if permanent_mac else "MACAddress"
    return (f"# {nic.describe()}.\n"
            "# Written by ganeti-instance-debootstrap when the instance was made.\n"
            "[Match]\n"
            f"{key}={nic.mac}\n"
            "\n"
            "[Link]\n"
            f"Name={nic.name}\n")


# --- ifupdown -------------------------------------------------------------------

LOOPBACK_INTERFACES = (
    "# This file describes the network interfaces available on your system\n"
    "# and how to activate them. For more information, see interfaces(5).\n"
    "\n"
    "source /etc/network/interfaces.d/*\n"
    "\n"
    "# The loopback network interface\n"
    "auto lo\n"
    "iface lo inet loopback\n")


def _ifupdown_stanzas(nic: NicConfig) -> str:
    # allow-hotplug, as Debian's installer writes: ifup runs when udev has
    # named the device (80-ifupdown.rules runs after the .link rename), and
    # a DHCP server that does not answer does not hold up the boot.
    lines = [f"# {nic.describe()}", f"allow-hotplug {nic.name}"]
    if nic.address4 is None:
        lines.append(f"iface {nic.name} inet dhcp")
    else:
        lines += [f"iface {nic.name} inet static", f"\taddress {nic.address4}"]
        if nic.gateway4 is not None:
            lines.append(f"\tgateway {nic.gateway4}")
    if nic.address6 is not None:
        lines += [f"iface {nic.name} inet6 static", f"\taddress {nic.address6}"]
        if nic.gateway6 is not None:
            lines.append(f"\tgateway {nic.gateway6}")
    elif nic.slaac:
        lines.append(f"iface {nic.name} inet6 auto")
        if nic.gateway6 is not None:
            # The inet6 auto method has no gateway option. The router's own
            # advertisement may have added this route already ("File
            # exists"), which is fine.
            lines.append(f"\tup ip -6 route add default via {nic.gateway6} "
                         f"dev {nic.name} || true")
    return "\n".join(lines) + "\n"


def interfaces_text(nics: Sequence[NicConfig]) -> str:
    """/etc/network/interfaces: the loopback, then one block per NIC."""
    return LOOPBACK_INTERFACES + "".join("\n" + _ifupdown_stanzas(n) for n in nics)


# --- systemd-networkd -----------------------------------------------------------

def network_path(nic: NicConfig) -> str:
    return f"{SYSTEMD_NETWORK_DIR}/{FILE_PREFIX}{nic.name}.network"


def network_text(nic: NicConfig) -> str:
    """The systemd-networkd .network file of one NIC.

    It matches the name the .link file gives, not the MAC: a VLAN or bridge
    on top of the NIC shares its MAC and must not get its addresses.
    """
    settings = []
    if nic.address4 is None:
        # DHCPv6 only when a static IPv6 address is not configured anyway.
        settings.append("DHCP=ipv4" if nic.address6 is not None else "DHCP=yes")
    else:
        settings.append(f"Address={nic.address4}")
        if nic.gateway4 is not None:
            settings.append(f"Gateway={nic.gateway4}")
    if nic.address6 is not None:
        settings.append(f"Address={nic.address6}")
    if nic.gateway6 is not None:
        settings.append(f"Gateway={nic.gateway6}")
    if nic.slaac:
        settings.append("IPv6AcceptRA=yes")
    elif nic.address6 is not None and nic.gateway6 is not None:
        # Fully static, as ifupdown's inet6 static with a gateway (it sets
        # accept_ra 0): a stray advertisement adds no address or route.
        settings.append("IPv6AcceptRA=no")
    return (f"# {nic.describe()}.\n"
            "# Written by ganeti-instance-debootstrap when the instance was made.\n"
            "[Match]\n"
            f"Name={nic.name}\n"
            "\n"
            "[Network]\n"
            + "".join(s + "\n" for s in settings))


# --- putting it together ----------------------------------------------------------

def systemd_version(versions: Mapping[str, str]) -> int | None:
    """The major version of the tree's udev (or systemd) package, if known."""
    for package in ("udev", "systemd"):
        version = versions.get(package, "")
        upstream = version.split(":", 1)[-1]
        match = re.match(r"\d+", upstream)
        if match:
            return int(match.group())
    return None


def has_networkd(t: Target) -> bool:
    """Whether the tree has systemd-networkd (and boots systemd to start it)."""
    init = os.path.basename(t.path("/sbin/init"))
    return init == "systemd" and find_unit(t, "systemd-networkd.service") is not None


def choose_renderer(mode: str, t: Target, has_ifupdown: bool) -> str:
    """The tool the files are written for: "ifupdown", "networkd" or "none"."""
    if mode != "auto":
        return mode
    if has_ifupdown:
        return "ifupdown"
    if has_networkd(t):
        return "networkd"
    return "none"


def _write_links(t: Target, nics: Sequence[NicConfig], versions: Mapping[str, str],
                 packages: frozenset[str]) -> list[str]:
    if "udev" not in packages and not any(
            t.exists(f"{d}/systemd-udevd") for d in ("/lib/systemd", "/usr/lib/systemd")):
        log.warning("The instance has no udev: its interfaces keep the kernel's "
                    "names (eth0, ...) and the configuration written for %s "
                    "does not apply until udev is installed.",
                    ", ".join(n.name for n in nics))
    version = systemd_version(versions)
    permanent = version is None or version >= PERMANENT_MAC_SINCE
    for nic in nics:
        t.write_text(link_path(nic), link_text(nic, permanent))
    return [link_path(n) for n in nics]


def configure(t: Target, plan: NetworkPlan, *, has_ifupdown: bool,
              packages: frozenset[str] = frozenset(),
              versions: Mapping[str, str] | None = None) -> NetworkResult:
    """Write the instance's network configuration for the tool it uses.

    ``none`` keeps the shell edition's behaviour: /etc/network/interfaces
    with the loopback only when ifupdown is installed, nothing else.
    """
    versions = versions or {}
    renderer = choose_renderer(plan.mode, t, has_ifupdown)
    files: list[str] = []
    if renderer == "none":
        if plan.mode == "auto" and plan.nics:
            log.warning("The instance has neither ifupdown nor systemd-networkd; "
                        "its NICs are not configured. Add one of them to "
                        "EXTRA_PKGS, or configure the network in a hook.")
        if has_ifupdown:
            t.write_text(INTERFACES, LOOPBACK_INTERFACES)
            files.append(INTERFACES)
        return NetworkResult("none", tuple(files))
    if plan.nics:
        files += _write_links(t, plan.nics, versions, packages)
    if renderer == "ifupdown":
        if not has_ifupdown:
            log.warning("network=ifupdown, but ifupdown is not installed in the "
                        "instance: add it to EXTRA_PKGS or install it in a hook.")
        t.write_text(INTERFACES, interfaces_text(plan.nics))
        files.append(INTERFACES)
    else:
        if has_ifupdown:
            # Only the loopback for ifupdown: the NICs are networkd's.
            t.write_text(INTERFACES, LOOPBACK_INTERFACES)
            files.append(INTERFACES)
        for nic in plan.nics:
            t.write_text(network_path(nic), network_text(nic))
            files.append(network_path(nic))
        if plan.nics:
            # Not without NICs: systemd-networkd-wait-online would hold
            # network-online.target for its whole timeout.
            files += _enable_networkd(t)
    return NetworkResult(renderer, tuple(files), host_address(plan.nics))


def _enable_networkd(t: Target) -> list[str]:
    links = enable_unit(t, "systemd-networkd.service")
    if not links:
        log.warning("network=networkd, but the instance has no "
                    "systemd-networkd.service: the .network files apply once it "
                    "is installed and enabled.")
        return []
    # Name resolution for DHCP-given servers goes through resolved; enable it
    # only where the release ships it (its own package from bookworm on).
    links += enable_unit(t, "systemd-resolved.service")
    return links


# --- sites' own network hooks ------------------------------------------------

def interfaces_snapshot(t: Target) -> str | None:
    """The instance's /etc/network/interfaces now (None: there is none)."""
    try:
        return t.read_text(INTERFACES)
    except (FileNotFoundError, UnsafeFileError):
        return None


def yield_to_hooks(t: Target, before: str | None) -> list[str]:
    """Step back when a hook rewrote /etc/network/interfaces; return what was removed.

    Sites have long configured the network in hooks, typically writing
    ``eth0`` stanzas. Our .link files would rename that interface to
    ``nic0`` and break such a hook's configuration, so when a hook replaced
    the file we wrote, the interface naming is left to the site as well.
    """
    if before is None or interfaces_snapshot(t) == before:
        return []
    removed = []
    directory = t.path(SYSTEMD_NETWORK_DIR)
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.startswith(FILE_PREFIX) and name.endswith(".link"):
                inner = f"{SYSTEMD_NETWORK_DIR}/{name}"
                if t.remove(inner):
                    removed.append(inner)
    if removed:
        log.info("A hook rewrote %s: leaving the interface names to it too "
                 "(removed %s)", INTERFACES, ", ".join(removed))
    return removed
