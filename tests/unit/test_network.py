"""The instance's network from Ganeti's NIC variables, checked on synthetic trees."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import pytest

from ganeti_debootstrap import environment, instance_files, network, osparams, systemd_units
from ganeti_debootstrap.environment import Nic
from ganeti_debootstrap.errors import ConfigError
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.instance_files import Instance
from ganeti_debootstrap.network import NetworkPlan
from ganeti_debootstrap.target import Target
from tests.systemtree import make_tree, write

NAME = "web1.example.org"
ROOT = FsEntry("0a1b2c3d-1111-2222-3333-444455556666", "ext4")
MAC0 = "aa:00:00:12:34:56"
MAC1 = "aa:00:00:ab:cd:ef"
# Modified EUI-64 of MAC0: aa^02=a8, ff:fe in the middle (RFC 4291 app. A).
EUI64_0 = "a800:ff:fe12:3456"
# ... in 2001:db8:1::/64, as ipaddress prints it (one zero group is kept).
ADDR6_0 = str(ipaddress.IPv6Address(f"2001:db8:1::{EUI64_0}"))

STATIC = Nic(0, mac=MAC0, ip="192.0.2.10", network_name="net1",
             subnet="192.0.2.0/24", gateway="192.0.2.1")
DUAL = Nic(0, mac=MAC0, ip="192.0.2.10", network_name="net1",
           subnet="192.0.2.0/24", gateway="192.0.2.1",
           subnet6="2001:db8:1::/64", gateway6="2001:db8:1::1")
DHCP1 = Nic(1, mac=MAC1)


def nic(index: int = 0, **fields: str) -> Nic:
    return Nic(index, **{"mac": MAC0, **fields})


def read(t: Target, inner: str) -> str:
    return Path(t.root, inner.lstrip("/")).read_text()


def exists(t: Target, inner: str) -> bool:
    return os.path.lexists(Path(t.root, inner.lstrip("/")))


def networkd_tree(root: Path, *, ifupdown: bool = False, resolved: bool = False,
                  release: str = "trixie") -> Target:
    """A systemd tree with systemd-networkd's units (as trixie ships them)."""
    t = make_tree(root, release=release, packages=("ifupdown",) if ifupdown else ())
    units = root / "usr/lib/systemd/system"
    write(units / "systemd-networkd.service",
          "[Unit]\nDescription=Network Configuration\n\n[Service]\nType=notify\n\n"
          "[Install]\nWantedBy=multi-user.target\nAlso=systemd-networkd.socket\n"
          "Alias=dbus-org.freedesktop.network1.service\n\n"
          "# comment\nAlso=systemd-network-generator.service\n"
          "Also=systemd-networkd-wait-online.service\n")
    write(units / "systemd-networkd.socket", "[Install]\nWantedBy=sockets.target\n")
    write(units / "systemd-network-generator.service",
          "[Install]\nWantedBy=sysinit.target\n")
    write(units / "systemd-networkd-wait-online.service",
          "[Install]\nWantedBy=network-online.target\n")
    if resolved:
        write(units / "systemd-resolved.service",
              "[Install]\nWantedBy=multi-user.target\n"
              "Alias=dbus-org.freedesktop.resolve1.service\n")
    return t


# --- reading Ganeti's variables ---------------------------------------------------

def test_no_nics_give_no_configuration():
    assert network.nic_configs([]) == ()


def test_a_nic_on_no_network_uses_dhcp_and_is_named_by_its_index():
    (c,) = network.nic_configs([Nic(3, mac="AA:00:00:AB:CD:EF")])
    assert (c.name, c.mac, c.address4, c.address6) == ("nic3", MAC1, None, None)


def test_an_ip_without_a_ganeti_network_falls_back_to_dhcp(caplog):
    caplog.set_level(logging.INFO)
    (c,) = network.nic_configs([nic(ip="192.0.2.10")])
    assert c.address4 is None
    assert "no Ganeti network" in caplog.text


def test_static_ipv4_takes_prefix_and_gateway_from_the_network():
    (c,) = network.nic_configs([STATIC])
    assert c.address4 == ipaddress.IPv4Interface("192.0.2.10/24")
    assert c.gateway4 == ipaddress.IPv4Address("192.0.2.1")


def test_static_ipv4_without_gateway_has_no_route():
    (c,) = network.nic_configs([nic(ip="10.1.2.3", subnet="10.0.0.0/8")])
    assert c.address4 == ipaddress.IPv4Interface("10.1.2.3/8")
    assert c.gateway4 is None


def test_ipv6_address_is_derived_from_the_mac_inside_subnet6():
    (c,) = network.nic_configs([DUAL])
    assert c.address6 == ipaddress.IPv6Interface(f"{ADDR6_0}/64")
    assert c.gateway6 == ipaddress.IPv6Address("2001:db8:1::1")
    assert not c.slaac


def test_eui64_of_a_well_known_mac():
    # QEMU's default MAC and the address Linux forms from it on fe80::/64.
    address = network.eui64_address(ipaddress.IPv6Network("fe80::/64"),
                                    "52:54:00:12:34:56")
    assert address == ipaddress.IPv6Address("fe80::5054:ff:fe12:3456")


def test_eui64_in_a_shorter_prefix_stays_inside_it():
    (c,) = network.nic_configs([nic(subnet6="2001:db8:100::/48")])
    assert c.address6 is not None
    assert c.address6.ip in ipaddress.IPv6Network("2001:db8:100::/48")
    assert c.address6.ip == ipaddress.IPv6Address(f"2001:db8:100::{EUI64_0}")
    assert c.address6.network.prefixlen == 48


def test_slaac_mode_keeps_the_gateway_but_no_static_address():
    (c,) = network.nic_configs([DUAL], ipv6="slaac")
    assert c.address6 is None and c.slaac
    assert c.gateway6 == ipaddress.IPv6Address("2001:db8:1::1")


def test_ipv6_none_ignores_subnet6():
    (c,) = network.nic_configs([DUAL], ipv6="none")
    assert (c.address6, c.gateway6, c.slaac) == (None, None, False)


def test_link_local_gateway6_is_accepted():
    (c,) = network.nic_configs([nic(subnet6="2001:db8:1::/64", gateway6="fe80::1")])
    assert c.gateway6 == ipaddress.IPv6Address("fe80::1")


def test_only_the_first_nic_with_a_gateway_keeps_it():
    second = Nic(1, mac=MAC1, ip="198.51.100.5", subnet="198.51.100.0/24",
                 gateway="198.51.100.1", subnet6="2001:db8:2::/64",
                 gateway6="2001:db8:2::1")
    first, other = network.nic_configs([DUAL, second])
    assert first.gateway4 is not None and first.gateway6 is not None
    assert other.gateway4 is None and other.gateway6 is None
    assert other.address4 == ipaddress.IPv4Interface("198.51.100.5/24")


def test_a_later_nic_supplies_the_gateway_when_the_first_has_none():
    first = Nic(0, mac=MAC0)
    second = Nic(1, mac=MAC1, ip="198.51.100.5", subnet="198.51.100.0/24",
                 gateway="198.51.100.1")
    assert network.nic_configs([first, second])[1].gateway4 is not None


@pytest.mark.parametrize("fields,variable", [
    ({"mac": "aa:00:00:12:34"}, "NIC_0_MAC='aa:00:00:12:34'"),
    ({"mac": "aa-00-00-12-34-56"}, "NIC_0_MAC='aa-00-00-12-34-56'"),
    ({"mac": "01:00:5e:00:00:01"}, "NIC_0_MAC='01:00:5e:00:00:01' is a multicast"),
    ({"mac": ""}, "NIC_0_MAC is missing"),
    ({"ip": "192.0.2.300", "subnet": "192.0.2.0/24"}, "NIC_0_IP='192.0.2.300'"),
    ({"ip": "198.51.100.7", "subnet": "192.0.2.0/24"},
     "NIC_0_IP='198.51.100.7' is not inside the NIC's network 192.0.2.0/24"),
    ({"ip": "192.0.2.255", "subnet": "192.0.2.0/24"}, "broadcast"),
    ({"ip": "192.0.2.10", "subnet": "192.0.2.1/24"}, "NIC_0_NETWORK_SUBNET='192.0.2.1/24'"),
    ({"ip": "192.0.2.10", "subnet": "2001:db8::/64"}, "is not an IPv4 network"),
    ({"ip": "192.0.2.10", "subnet": "192.0.2.0/24", "gateway": "198.51.100.1"},
     "NIC_0_NETWORK_GATEWAY='198.51.100.1' is not inside"),
    ({"ip": "192.0.2.10", "subnet": "192.0.2.0/24", "gateway": "192.0.2.10"},
     "NIC_0_NETWORK_GATEWAY='192.0.2.10' is the NIC's own address"),
    ({"gateway": "192.0.2.1"}, "NIC_0_NETWORK_GATEWAY='192.0.2.1' is set without"),
    ({"subnet6": "2001:db8::1/64"}, "NIC_0_NETWORK_SUBNET6='2001:db8::1/64'"),
    ({"subnet6": "2001:db8::/64", "gateway6": "2001:db9::1"},
     "NIC_0_NETWORK_GATEWAY6='2001:db9::1' is neither inside"),
    ({"subnet6": "2001:db8::/64", "gateway6": "192.0.2.1"},
     "NIC_0_NETWORK_GATEWAY6='192.0.2.1' is not an IPv6 address"),
    ({"subnet6": "2001:db8::/80"}, "NIC_0_NETWORK_SUBNET6='2001:db8::/80' is longer than /64"),
])
def test_a_bad_value_is_refused_naming_the_variable(fields, variable):
    with pytest.raises(ConfigError) as err:
        network.nic_configs([nic(**fields)])
    assert variable in str(err.value)
    assert "gnt-instance modify" in str(err.value) and "network=none" in str(err.value)


def test_a_longer_than_64_subnet6_is_fine_with_slaac():
    (c,) = network.nic_configs([nic(subnet6="2001:db8::/80")], ipv6="slaac")
    assert c.slaac and c.address6 is None


def test_two_nics_with_one_mac_are_refused():
    with pytest.raises(ConfigError, match="NIC_1_MAC=.*also NIC 0's"):
        network.nic_configs([nic(0), nic(1)])


def test_every_bad_nic_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        network.nic_configs([nic(0, mac="zz"), Nic(1, mac=MAC1, ip="x", subnet="10.0.0.0/8")])
    assert "NIC_0_MAC" in str(err.value) and "NIC_1_IP" in str(err.value)


# --- rendering: ifupdown ------------------------------------------------------------

def test_ifupdown_without_nics_is_the_loopback_only():
    assert network.interfaces_text(()) == network.LOOPBACK_INTERFACES
    assert network.LOOPBACK_INTERFACES.endswith("auto lo\niface lo inet loopback\n")


def test_ifupdown_dhcp_nic():
    text = network.interfaces_text(network.nic_configs([DHCP1]))
    assert text.endswith("allow-hotplug nic1\niface nic1 inet dhcp\n")
    assert "inet6" not in text


def test_ifupdown_static_ipv4_with_gateway():
    text = network.interfaces_text(network.nic_configs([STATIC]))
    assert text.endswith("allow-hotplug nic0\niface nic0 inet static\n"
                         "\taddress 192.0.2.10/24\n\tgateway 192.0.2.1\n")


def test_ifupdown_static_ipv4_without_gateway():
    text = network.interfaces_text(network.nic_configs(
        [nic(ip="192.0.2.10", subnet="192.0.2.0/24")]))
    assert text.endswith("iface nic0 inet static\n\taddress 192.0.2.10/24\n")
    assert "gateway" not in text


def test_ifupdown_ipv4_and_ipv6():
    text = network.interfaces_text(network.nic_configs([DUAL]))
    assert text.endswith("iface nic0 inet6 static\n"
                         f"\taddress {ADDR6_0}/64\n"
                         "\tgateway 2001:db8:1::1\n")


def test_ifupdown_two_nics_mixed_each_named_once():
    text = network.interfaces_text(network.nic_configs([DUAL, DHCP1]))
    assert text.count("allow-hotplug nic0\n") == 1
    assert text.count("allow-hotplug nic1\n") == 1
    assert text.index("nic0") < text.index("nic1")
    assert "iface nic1 inet dhcp\n" in text
    assert f"# Ganeti NIC 0: MAC {MAC0}, network net1\n" in text


def test_ifupdown_slaac_adds_the_gateway_as_a_route():
    text = network.interfaces_text(network.nic_configs([DUAL], ipv6="slaac"))
    assert ("iface nic0 inet6 auto\n"
            "\tup ip -6 route add default via 2001:db8:1::1 dev nic0 || true\n") in text


# --- rendering: systemd -------------------------------------------------------------

def test_link_file_names_the_nic_by_its_permanent_mac():
    (c,) = network.nic_configs([STATIC])
    text = network.link_text(c)
    assert f"[Match]\nPermanentMACAddress={MAC0}\n\n[Link]\nName=nic0\n" in text
    assert network.link_path(c) == "/etc/systemd/network/10-ganeti-nic0.link"


def test_link_file_for_old_udev_matches_the_current_mac():
    (c,) = network.nic_configs([STATIC])
    assert f"[Match]\nMACAddress={MAC0}\n" in network.link_text(c, permanent_mac=False)


@pytest.mark.parametrize("versions,expected", [
    ({"udev": "257.13-1~deb13u1"}, 257), ({"udev": "1:241-7"}, 241),
    ({"systemd": "252.38-1"}, 252), ({}, None)])
def test_systemd_version_comes_from_the_udev_package(versions, expected):
    assert network.systemd_version(versions) == expected


def test_networkd_dhcp_nic():
    (c,) = network.nic_configs([DHCP1])
    assert network.network_text(c).endswith("[Match]\nName=nic1\n\n[Network]\nDHCP=yes\n")


def test_networkd_static_ipv4_with_gateway():
    (c,) = network.nic_configs([STATIC])
    assert network.network_text(c).endswith(
        "[Network]\nAddress=192.0.2.10/24\nGateway=192.0.2.1\n")


def test_networkd_static_ipv4_without_gateway():
    (c,) = network.nic_configs([nic(ip="192.0.2.10", subnet="192.0.2.0/24")])
    assert network.network_text(c).endswith("[Network]\nAddress=192.0.2.10/24\n")


def test_networkd_ipv4_and_ipv6():
    (c,) = network.nic_configs([DUAL])
    assert network.network_text(c).endswith(
        "[Network]\nAddress=192.0.2.10/24\nGateway=192.0.2.1\n"
        f"Address={ADDR6_0}/64\nGateway=2001:db8:1::1\nIPv6AcceptRA=no\n")


def test_networkd_dhcp_ipv4_with_static_ipv6_asks_dhcp_for_ipv4_only():
    (c,) = network.nic_configs([nic(subnet6="2001:db8:1::/64")])
    text = network.network_text(c)
    assert "DHCP=ipv4\n" in text and f"Address={ADDR6_0}/64\n" in text
    # No gateway6: a router's advertisement may still give the route.
    assert "IPv6AcceptRA" not in text


def test_networkd_slaac_accepts_router_advertisements():
    (c,) = network.nic_configs([DUAL], ipv6="slaac")
    text = network.network_text(c)
    assert "IPv6AcceptRA=yes\n" in text and "Gateway=2001:db8:1::1\n" in text
    assert "Address=2001" not in text


# --- enabling units -------------------------------------------------------------------

def test_install_section_collects_repeated_keys_and_ignores_other_sections():
    text = ("[Unit]\nWantedBy=nothing.target\n[Install]\nWantedBy=a.target b.target\n"
            "; comment\nAlso=x.service\nAlso=y.service\nAlias=z.service\n")
    assert systemd_units.install_section(text) == {
        "WantedBy": ["a.target", "b.target"], "Also": ["x.service", "y.service"],
        "Alias": ["z.service"]}


def test_enabling_networkd_makes_the_links_systemctl_would(tmp_path):
    t = networkd_tree(tmp_path / "root")
    links = systemd_units.enable_unit(t, "systemd-networkd.service")
    unit = "/usr/lib/systemd/system/"
    expected = {
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service":
            unit + "systemd-networkd.service",
        "etc/systemd/system/dbus-org.freedesktop.network1.service":
            unit + "systemd-networkd.service",
        "etc/systemd/system/sockets.target.wants/systemd-networkd.socket":
            unit + "systemd-networkd.socket",
        "etc/systemd/system/sysinit.target.wants/systemd-network-generator.service":
            unit + "systemd-network-generator.service",
        "etc/systemd/system/network-online.target.wants/"
        "systemd-networkd-wait-online.service":
            unit + "systemd-networkd-wait-online.service"}
    assert sorted(link.lstrip("/") for link in links) == sorted(expected)
    for link, target in expected.items():
        assert os.readlink(Path(t.root, link)) == target
    mode = os.stat(Path(t.root, "etc/systemd/system/sockets.target.wants")).st_mode
    assert mode & 0o777 == 0o755


def test_enabling_a_missing_unit_does_nothing(tmp_path):
    t = make_tree(tmp_path / "root")
    assert systemd_units.enable_unit(t, "systemd-networkd.service") == []


def test_a_template_unit_gets_no_wants_link(tmp_path):
    t = make_tree(tmp_path / "root")
    write(Path(t.root, "usr/lib/systemd/system/foo@.service"),
          "[Install]\nWantedBy=multi-user.target\n")
    assert systemd_units.enable_unit(t, "foo@.service") == []


def test_units_on_a_split_usr_tree_are_found_under_lib(tmp_path):
    t = make_tree(tmp_path / "root", release="split")
    write(Path(t.root, "lib/systemd/system/x.service"), "[Install]\nWantedBy=a.target\n")
    assert systemd_units.find_unit(t, "x.service") == "/lib/systemd/system/x.service"


# --- writing into the tree ------------------------------------------------------------

def test_auto_writes_ifupdown_files_when_ifupdown_is_installed(tmp_path):
    t = networkd_tree(tmp_path / "root", ifupdown=True)
    plan = NetworkPlan("auto", network.nic_configs([DUAL, DHCP1]))
    done = network.configure(t, plan, has_ifupdown=True, packages=frozenset({"udev"}),
                             versions={"udev": "257.13-1"})
    assert done.renderer == "ifupdown"
    assert read(t, "/etc/network/interfaces") == network.interfaces_text(plan.nics)
    for c in plan.nics:
        assert read(t, network.link_path(c)) == network.link_text(c)
        assert not exists(t, network.network_path(c))
    assert not exists(t, "etc/systemd/system/multi-user.target.wants/systemd-networkd.service")
    assert done.host_address == "192.0.2.10"


def test_auto_uses_networkd_without_ifupdown(tmp_path):
    t = networkd_tree(tmp_path / "root")
    plan = NetworkPlan("auto", network.nic_configs([DUAL, DHCP1]))
    done = network.configure(t, plan, has_ifupdown=False, packages=frozenset({"udev"}),
                             versions={"udev": "257.13-1"})
    assert done.renderer == "networkd"
    for c in plan.nics:
        assert read(t, network.network_path(c)) == network.network_text(c)
        assert read(t, network.link_path(c)) == network.link_text(c)
    assert exists(t, "etc/systemd/system/multi-user.target.wants/systemd-networkd.service")
    assert not exists(t, "etc/network/interfaces")
    # systemd-resolved is not installed here, so it is not enabled.
    assert not exists(t, "etc/systemd/system/dbus-org.freedesktop.resolve1.service")


def test_networkd_enables_resolved_only_when_installed(tmp_path):
    t = networkd_tree(tmp_path / "root", resolved=True)
    plan = NetworkPlan("networkd", network.nic_configs([DHCP1]))
    network.configure(t, plan, has_ifupdown=False)
    assert os.readlink(Path(t.root, "etc/systemd/system/dbus-org.freedesktop.resolve1"
                                    ".service")) == \
        "/usr/lib/systemd/system/systemd-resolved.service"


def test_forced_networkd_leaves_ifupdown_the_loopback(tmp_path):
    t = networkd_tree(tmp_path / "root", ifupdown=True)
    plan = NetworkPlan("networkd", network.nic_configs([STATIC]))
    done = network.configure(t, plan, has_ifupdown=True)
    assert done.renderer == "networkd"
    assert read(t, "/etc/network/interfaces") == network.LOOPBACK_INTERFACES
    assert exists(t, "/etc/systemd/network/10-ganeti-nic0.network")


def test_networkd_is_not_enabled_without_nics(tmp_path):
    t = networkd_tree(tmp_path / "root")
    done = network.configure(t, NetworkPlan("auto"), has_ifupdown=False)
    assert done.renderer == "networkd" and done.files == ()
    assert not exists(t, "etc/systemd/system/multi-user.target.wants")


def test_old_udev_gets_mac_address_matches(tmp_path):
    t = make_tree(tmp_path / "root")
    plan = NetworkPlan("ifupdown", network.nic_configs([STATIC]))
    network.configure(t, plan, has_ifupdown=True, packages=frozenset({"udev"}),
                      versions={"udev": "241-7~deb10u10"})
    assert f"\nMACAddress={MAC0}\n" in read(t, "/etc/systemd/network/10-ganeti-nic0.link")


def test_none_keeps_the_shell_editions_loopback_only_file(tmp_path):
    t = networkd_tree(tmp_path / "root", ifupdown=True)
    done = network.configure(t, NetworkPlan("none"), has_ifupdown=True)
    assert done == network.NetworkResult("none", ("/etc/network/interfaces",))
    assert read(t, "/etc/network/interfaces") == network.LOOPBACK_INTERFACES
    assert not exists(t, "etc/systemd/network/10-ganeti-nic0.link")


def test_auto_without_ifupdown_or_networkd_configures_nothing_and_says_so(tmp_path, caplog):
    t = make_tree(tmp_path / "root", init="none", packages=())
    plan = NetworkPlan("auto", network.nic_configs([STATIC]))
    done = network.configure(t, plan, has_ifupdown=False)
    assert done == network.NetworkResult("none")
    assert "neither ifupdown nor systemd-networkd" in caplog.text
    assert not exists(t, "etc/systemd/network")


def test_a_tree_without_udev_is_warned_about(tmp_path, caplog):
    t = make_tree(tmp_path / "root")
    plan = NetworkPlan("ifupdown", network.nic_configs([STATIC]))
    network.configure(t, plan, has_ifupdown=True, packages=frozenset({"ifupdown"}))
    assert "no udev" in caplog.text


def test_forced_ifupdown_without_ifupdown_writes_the_file_and_warns(tmp_path, caplog):
    t = make_tree(tmp_path / "root", packages=("udev",))
    plan = NetworkPlan("ifupdown", network.nic_configs([STATIC]))
    network.configure(t, plan, has_ifupdown=False, packages=frozenset({"udev"}))
    assert "iface nic0 inet static" in read(t, "/etc/network/interfaces")
    assert "ifupdown is not installed" in caplog.text


def test_a_planted_symlink_in_etc_systemd_network_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    t = make_tree(tmp_path / "root")
    os.makedirs(Path(t.root, "etc/systemd"), exist_ok=True)
    os.symlink(str(outside), Path(t.root, "etc/systemd/network"))
    network.configure(t, NetworkPlan("ifupdown", network.nic_configs([STATIC])),
                      has_ifupdown=True)
    assert list(outside.iterdir()) == []


# --- /etc/hosts and the whole of configure ------------------------------------------------

def test_hosts_names_the_static_address_instead_of_127_0_1_1():
    text = instance_files.hosts_text(NAME, "192.0.2.10")
    assert "192.0.2.10\tweb1.example.org\tweb1\n" in text
    assert "127.0.1.1" not in text
    assert "127.0.0.1\tlocalhost\n" in text


def test_hosts_without_a_static_address_keeps_127_0_1_1():
    assert "127.0.1.1\tweb1.example.org\tweb1\n" in instance_files.hosts_text(NAME, "")


def test_configure_puts_the_first_static_address_in_hosts(tmp_path, node):
    t = make_tree(tmp_path / "root", packages=("ifupdown", "udev"))
    second = Nic(1, mac=MAC1, ip="198.51.100.5", subnet="198.51.100.0/24")
    plan = NetworkPlan("auto", network.nic_configs([Nic(0, mac=MAC0), second]))
    done = instance_files.configure(t, Instance(NAME, network_plan=plan), root=ROOT,
                                    node_files=node)
    assert done.network == "ifupdown"
    assert read(t, "/etc/hosts") == instance_files.hosts_text(NAME, "198.51.100.5")
    assert "iface nic1 inet static" in read(t, "/etc/network/interfaces")


def test_configure_with_network_none_keeps_127_0_1_1(tmp_path, node):
    t = make_tree(tmp_path / "root", packages=("ifupdown", "udev"))
    done = instance_files.configure(t, Instance(NAME), root=ROOT, node_files=node)
    assert done.network == "none"
    assert read(t, "/etc/hosts") == instance_files.hosts_text(NAME)


# --- from Ganeti's environment and the OS parameters ------------------------------------

def request(**env: str) -> environment.Request:
    return environment.parse("create", [], {
        "OS_API_VERSION": "20", "INSTANCE_NAME": NAME, "DISK_COUNT": "1",
        "DISK_0_PATH": "/dev/xenvg/disk0", **env})


NIC_ENV = {"NIC_COUNT": "2", "NIC_0_MAC": MAC0, "NIC_0_IP": "192.0.2.10",
           "NIC_0_NETWORK_NAME": "net1", "NIC_0_NETWORK_SUBNET": "192.0.2.0/24",
           "NIC_0_NETWORK_GATEWAY": "192.0.2.1",
           "NIC_0_NETWORK_SUBNET6": "2001:db8:1::/64",
           "NIC_0_NETWORK_GATEWAY6": "2001:db8:1::1", "NIC_1_MAC": MAC1}


def test_instance_takes_its_nics_from_ganetis_variables():
    instance = Instance.from_request(request(**NIC_ENV), osparams.validate({}))
    plan = instance.network_plan
    assert plan.mode == "auto"
    assert [c.name for c in plan.nics] == ["nic0", "nic1"]
    assert str(plan.nics[0].address6) == f"{ADDR6_0}/64"


def test_a_bad_nic_variable_is_refused_when_planning():
    env = {**NIC_ENV, "NIC_1_MAC": "not-a-mac"}
    with pytest.raises(ConfigError, match="NIC_1_MAC='not-a-mac'"):
        Instance.from_request(request(**env), osparams.validate({}))


def test_network_none_does_not_look_at_the_nics():
    env = {**NIC_ENV, "NIC_1_MAC": "not-a-mac"}
    params = osparams.validate({"network": "none"})
    assert Instance.from_request(request(**env), params).network_plan == NetworkPlan()


def test_without_os_parameters_the_network_is_left_alone():
    assert Instance.from_request(request(**NIC_ENV)).network_plan == NetworkPlan()


@pytest.mark.parametrize("name,values,default", [
    ("network", ("auto", "ifupdown", "networkd", "none"), "auto"),
    ("ipv6", ("eui64", "slaac", "none"), "eui64")])
def test_network_parameters_accept_their_choices_and_default(name, values, default):
    assert getattr(osparams.validate({}), name) == default
    assert getattr(osparams.validate({name: ""}), name) == default
    for value in values:
        assert getattr(osparams.validate({name: value}), name) == value
    with pytest.raises(ConfigError, match=f"{name}='dhcp' is not accepted"):
        osparams.validate({name: "dhcp"})


@pytest.mark.parametrize("name", ["net1\npre-up touch /pwned", "net1\rpre-up x",
                                  "net1\u2028pre-up x", "net1\x85x", "net1\x00\x1b[2J"])
def test_a_network_name_stays_in_its_comment_whatever_it_holds(name):
    # Refused where Ganeti's variables are read; the writer is safe anyway.
    config = network.NicConfig(0, MAC0, network_name=name)
    for text in (network.interfaces_text([config]), network.link_text(config),
                 network.network_text(config)):
        comments = [ln for ln in text.splitlines() if "Ganeti NIC 0" in ln]
        assert len(comments) == 1 and comments[0].startswith("# ")
        assert not any(ln.lstrip().startswith("pre-up") for ln in text.splitlines())
        assert len(text.splitlines()) == len(text.split("\n")) - 1
