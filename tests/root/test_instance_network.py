"""create, as Ganeti runs it, configures the NICs and APT sources of a trixie instance.

The session's cached trixie tree has ifupdown (priority important) and
systemd-networkd (in the systemd package), so ``network=auto`` picks
ifupdown there and ``network=networkd`` checks the other renderer.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess


from tests.root.scripts import create_env, mounted_root, read, run_script

NAME = "net1.example.org"
MAC0 = "aa:00:00:12:34:56"
MAC1 = "aa:00:00:ab:cd:ef"
# NIC 0's IPv6 address: its MAC as modified EUI-64 (aa^02=a8, ff:fe inserted).
ADDR6 = str(ipaddress.IPv6Address("2001:db8:1::a800:ff:fe12:3456"))

NIC_ENV = {
    "NIC_COUNT": "2",
    "NIC_0_MAC": MAC0, "NIC_0_IP": "192.0.2.10", "NIC_0_MODE": "bridged",
    "NIC_0_LINK": "br0", "NIC_0_NETWORK_NAME": "net1",
    "NIC_0_NETWORK_SUBNET": "192.0.2.0/24", "NIC_0_NETWORK_GATEWAY": "192.0.2.1",
    "NIC_0_NETWORK_SUBNET6": "2001:db8:1::/64", "NIC_0_NETWORK_GATEWAY6": "2001:db8:1::1",
    "NIC_1_MAC": MAC1, "NIC_1_MODE": "bridged", "NIC_1_LINK": "br1",
}
LINK0 = "etc/systemd/network/10-ganeti-nic0.link"
LINK1 = "etc/systemd/network/10-ganeti-nic1.link"
NETWORKD_WANTS = "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"


def exists(root: str, inner: str) -> bool:
    return os.path.lexists(os.path.join(root, inner.lstrip("/")))


def check_links(root: str) -> None:
    # trixie's udev (257) knows PermanentMACAddress=.
    assert f"[Match]\nPermanentMACAddress={MAC0}\n\n[Link]\nName=nic0\n" in read(root, LINK0)
    assert f"[Match]\nPermanentMACAddress={MAC1}\n\n[Link]\nName=nic1\n" in read(root, LINK1)


def test_static_and_dhcp_nics_get_ifupdown_files_where_ifupdown_is_installed(tree, disk):
    run_script(tree, "create", create_env(NAME, disk, **NIC_ENV))
    with mounted_root(disk) as root:
        interfaces = read(root, "/etc/network/interfaces")
        assert ("allow-hotplug nic0\n"
                "iface nic0 inet static\n"
                "\taddress 192.0.2.10/24\n"
                "\tgateway 192.0.2.1\n"
                "iface nic0 inet6 static\n"
                f"\taddress {ADDR6}/64\n"
                "\tgateway 2001:db8:1::1\n") in interfaces
        assert "allow-hotplug nic1\niface nic1 inet dhcp\n" in interfaces
        assert "auto lo\niface lo inet loopback\n" in interfaces
        check_links(root)
        assert not exists(root, "etc/systemd/network/10-ganeti-nic0.network")
        assert not exists(root, NETWORKD_WANTS)
        hosts = read(root, "/etc/hosts")
        assert "192.0.2.10\tnet1.example.org\tnet1\n" in hosts
        assert "127.0.1.1" not in hosts
        # The instance's own ifupdown parses the file as intended.
        query = subprocess.run(["chroot", root, "ifquery", "-i", "/etc/network/interfaces",
                                "nic0"], capture_output=True, text=True)
        assert query.returncode == 0, query.stderr
        assert "address: 192.0.2.10\n" in query.stdout
        assert f"address: {ADDR6}\n" in query.stdout
        hotplug = subprocess.run(["chroot", root, "ifquery", "-i",
                                  "/etc/network/interfaces", "--list", "--allow=hotplug"],
                                 capture_output=True, text=True)
        assert hotplug.stdout.split() == ["nic0", "nic1"]


def test_networkd_renderer_writes_network_files_and_enables_networkd(tree, disk):
    run_script(tree, "create", create_env(NAME, disk, OSP_NETWORK="networkd", **NIC_ENV))
    with mounted_root(disk) as root:
        check_links(root)
        nic0 = read(root, "etc/systemd/network/10-ganeti-nic0.network")
        assert nic0.endswith("[Match]\nName=nic0\n\n[Network]\n"
                             "Address=192.0.2.10/24\nGateway=192.0.2.1\n"
                             f"Address={ADDR6}/64\nGateway=2001:db8:1::1\n"
                             "IPv6AcceptRA=no\n")
        assert read(root, "etc/systemd/network/10-ganeti-nic1.network").endswith(
            "[Match]\nName=nic1\n\n[Network]\nDHCP=yes\n")
        # Enabled as systemctl enable would: every link reaches the unit file.
        for link in (NETWORKD_WANTS,
                     "etc/systemd/system/dbus-org.freedesktop.network1.service",
                     "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
                     "etc/systemd/system/network-online.target.wants/"
                     "systemd-networkd-wait-online.service"):
            target = os.readlink(os.path.join(root, link))
            assert target.startswith("/usr/lib/systemd/system/")
            assert os.path.isfile(os.path.join(root, target.lstrip("/"))), link
        # ifupdown stays installed but brings up the loopback only.
        assert "nic" not in read(root, "/etc/network/interfaces")
        assert "192.0.2.10\tnet1.example.org" in read(root, "/etc/hosts")


def test_network_none_keeps_the_shell_editions_loopback_only_setup(tree, disk):
    run_script(tree, "create", create_env(NAME, disk, OSP_NETWORK="none", **NIC_ENV))
    with mounted_root(disk) as root:
        assert "nic" not in read(root, "/etc/network/interfaces")
        assert not exists(root, LINK0)
        assert not exists(root, NETWORKD_WANTS)
        assert "127.0.1.1\tnet1.example.org\tnet1\n" in read(root, "/etc/hosts")


def test_a_bad_nic_variable_fails_before_the_disk_is_touched(tree, disk):
    env = create_env(NAME, disk, **{**NIC_ENV, "NIC_0_NETWORK_GATEWAY": "198.51.100.1"})
    res = run_script(tree, "create", env, check=False)
    assert res.returncode != 0
    tail = "\n".join(res.stderr.decode().strip().splitlines()[-4:])
    assert "NIC_0_NETWORK_GATEWAY='198.51.100.1'" in tail
    with open(disk, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)


def test_trixie_instance_gets_deb822_sources_with_updates_and_security(tree, disk):
    run_script(tree, "create", create_env(NAME, disk))
    with mounted_root(disk, read_only=False) as root:
        sources = read(root, "/etc/apt/sources.list.d/debian.sources")
        assert ("Types: deb\nURIs: http://deb.debian.org/debian\n"
                "Suites: trixie trixie-updates\nComponents: main\n"
                "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n") in sources
        assert ("URIs: http://security.debian.org/debian-security\n"
                "Suites: trixie-security\n") in sources
        assert not [ln for ln in read(root, "/etc/apt/sources.list").splitlines()
                    if ln.strip() and not ln.startswith("#")]
        # The instance's own apt reads them (--print-uris downloads nothing).
        uris = subprocess.run(["chroot", root, "apt-get", "--print-uris", "update"],
                              capture_output=True, text=True)
        assert uris.returncode == 0, uris.stderr
        for suite in ("dists/trixie/InRelease", "dists/trixie-updates/InRelease",
                      "debian-security/dists/trixie-security/InRelease"):
            assert suite in uris.stdout
        apt_conf = os.path.join(root, "etc/apt/apt.conf.d")
        for name in os.listdir(apt_conf):
            with open(os.path.join(apt_conf, name)) as f:
                assert "proxy" not in f.read().lower(), name


def test_apt_sources_keep_leaves_the_bootstraps_sources_list(tree, disk):
    run_script(tree, "create", create_env(NAME, disk, OSP_APT_SOURCES="keep"))
    with mounted_root(disk) as root:
        assert not exists(root, "/etc/apt/sources.list.d/debian.sources")
        assert "deb http" in read(root, "/etc/apt/sources.list")


def test_a_hook_that_writes_its_own_interfaces_keeps_the_kernel_names(tree, disk):
    # The shell edition's sites configure eth0 in a hook: our nicN names
    # must not break that, so the .link files go when a hook takes over.
    tree.hook("50-eth0", 'printf "auto lo\\niface lo inet loopback\\n'
                         'auto eth0\\niface eth0 inet dhcp\\n" '
                         '> "$TARGET/etc/network/interfaces"\n')
    run_script(tree, "create", create_env("hooknet", disk, NIC_COUNT="1",
                                          NIC_0_MAC="aa:00:00:44:55:66"))
    with mounted_root(disk) as root:
        assert "eth0" in read(root, "/etc/network/interfaces")
        links = os.listdir(os.path.join(root, "etc/systemd/network"))
        assert not [f for f in links if f.endswith(".link")]


def test_without_hooks_the_link_files_stay(tree, disk):
    run_script(tree, "create", create_env("ownnet", disk, NIC_COUNT="1",
                                          NIC_0_MAC="aa:00:00:44:55:67"))
    with mounted_root(disk) as root:
        assert os.path.exists(os.path.join(root, "etc/systemd/network/10-ganeti-nic0.link"))
