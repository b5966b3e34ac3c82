"""What create writes into the instance, checked on synthetic trees in tmp_path."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from ganeti_debootstrap import environment, instance_files, runner
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.instance_files import Instance, NodeFiles
from ganeti_debootstrap.target import Target
from tests.systemtree import ROOT_UUID, SHADOW, make_tree, read, status_paragraph, write

SWAP_UUID = "99887766-aaaa-bbbb-cccc-ddddeeeeffff"
NAME = "web1.example.org"


@pytest.fixture
def tree(tmp_path: Path) -> Target:
    return make_tree(tmp_path / "root")


# --- names ------------------------------------------------------------------

def test_hostname_and_mailname_hold_the_instance_name_as_given(tree):
    instance_files.write_hostname(tree, NAME)
    instance_files.write_mailname(tree, NAME)
    assert read(tree, "/etc/hostname") == "web1.example.org\n"
    assert read(tree, "/etc/mailname") == "web1.example.org\n"


def test_hosts_maps_the_instance_to_127_0_1_1_with_ipv6_lines(tree):
    instance_files.write_hosts(tree, NAME)
    assert read(tree, "/etc/hosts") == (
        "127.0.0.1\tlocalhost\n"
        "127.0.1.1\tweb1.example.org\tweb1\n"
        "\n"
        "# The following lines are desirable for IPv6 capable hosts\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n")


def test_hosts_lists_a_short_name_once():
    assert "127.0.1.1\tweb1\n" in instance_files.hosts_text("web1")


def test_hosts_file_can_be_renamed_by_rename(tree):
    from ganeti_debootstrap.rename import rename_hosts
    text = rename_hosts(instance_files.hosts_text(NAME), NAME, "db2.example.org")
    assert "127.0.1.1\tdb2.example.org db2\n" in text
    assert "web1" not in text


def test_hostname_symlink_to_a_node_file_is_replaced_not_followed(tmp_path):
    t = make_tree(tmp_path / "root")
    outside = write(tmp_path / "hostname-of-node", "node1\n")
    os.unlink(Path(t.root, "etc/hostname"))
    os.symlink(str(outside), Path(t.root, "etc/hostname"))
    instance_files.write_hostname(t, NAME)
    assert outside.read_text() == "node1\n"
    assert not os.path.islink(Path(t.root, "etc/hostname"))
    assert read(t, "/etc/hostname") == f"{NAME}\n"


def test_every_file_written_stays_inside_the_tree_when_etc_points_outside(tmp_path, node):
    t = make_tree(tmp_path / "root")
    outside = tmp_path / "node-etc"
    # An absolute link is resolved inside the instance, as the instance sees
    # it: the files are written where that path lands inside the tree.
    inside = Path(t.root, str(outside).lstrip("/"))
    shutil.copytree(Path(t.root, "etc"), outside, symlinks=True)
    shutil.copytree(Path(t.root, "etc"), inside, symlinks=True)
    shutil.rmtree(Path(t.root, "etc"))
    os.symlink(str(outside), Path(t.root, "etc"))
    before = {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    instance_files.configure(t, Instance(NAME), root=FsEntry(ROOT_UUID, "ext4"),
                             node_files=node)
    after = {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert after == before
    assert (inside / "hostname").read_text() == f"{NAME}\n"


# --- DNS --------------------------------------------------------------------

def test_resolv_conf_content_is_copied_through_a_node_symlink(tmp_path, tree):
    real = write(tmp_path / "node/run/resolvconf/resolv.conf", "nameserver 198.51.100.1\n")
    link = tmp_path / "resolv.conf.link"
    os.symlink(real, link)
    used = instance_files.copy_resolv_conf(tree, NodeFiles(str(link), "/nonexistent"))
    assert used == str(link)
    assert read(tree, "/etc/resolv.conf") == "nameserver 198.51.100.1\n"
    assert not os.path.islink(Path(tree.root, "etc/resolv.conf"))


def test_instance_resolv_conf_symlink_becomes_a_file(tree, node):
    stub = write(Path(tree.root, "run/systemd/resolve/stub-resolv.conf"),
                 "nameserver 127.0.0.53\n")
    os.symlink("../run/systemd/resolve/stub-resolv.conf", Path(tree.root, "etc/resolv.conf"))
    instance_files.copy_resolv_conf(tree, node)
    assert not os.path.islink(Path(tree.root, "etc/resolv.conf"))
    assert read(tree, "/etc/resolv.conf") == "search example.org\nnameserver 192.0.2.53\n"
    assert stub.read_text() == "nameserver 127.0.0.53\n"


def test_resolved_stub_on_the_node_gives_its_upstream_servers(tmp_path, tree):
    stub = write(tmp_path / "stub", "nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    upstream = write(tmp_path / "upstream", "nameserver 2001:db8::53\n")
    used = instance_files.copy_resolv_conf(tree, NodeFiles(str(stub), str(upstream)))
    assert used == str(upstream)
    assert read(tree, "/etc/resolv.conf") == "nameserver 2001:db8::53\n"


@pytest.mark.parametrize("node_text", [None, "", "nameserver 127.0.0.1\nnameserver ::1\n",
                                       "# no servers\nsearch example.org\n"])
def test_instance_resolv_conf_is_left_alone_without_a_usable_node_file(
        tmp_path, tree, node_text, caplog):
    write(Path(tree.root, "etc/resolv.conf"), "nameserver 203.0.113.9\n")
    conf = tmp_path / "resolv.conf"
    if node_text is not None:
        conf.write_text(node_text)
    with caplog.at_level(logging.WARNING):
        used = instance_files.copy_resolv_conf(tree, NodeFiles(str(conf), "/nonexistent"))
    assert used is None
    assert read(tree, "/etc/resolv.conf") == "nameserver 203.0.113.9\n"
    assert "left as installed" in caplog.text


# --- fstab ------------------------------------------------------------------

def test_fstab_names_root_and_swap_by_uuid(tree):
    instance_files.rewrite_fstab(tree, root=FsEntry(ROOT_UUID, "ext4"),
                                 swap=FsEntry(SWAP_UUID, "swap"))
    assert read(tree, "/etc/fstab") == (
        "# /etc/fstab: static file system information.\n"
        "#\n"
        "# <file system> <mount point>   <type>  <options>       <dump>  <pass>\n"
        f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1\n"
        f"UUID={SWAP_UUID}\tnone\tswap\tsw\t0\t0\n")


@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
def test_fstab_root_line_uses_the_filesystem_type(fstype):
    text = instance_files.fstab_text("", FsEntry(ROOT_UUID, fstype), None)
    assert f"UUID={ROOT_UUID}\t/\t{fstype}\terrors=remount-ro\t0\t1\n" in text
    assert "swap" not in text


def test_fstab_keeps_site_entries_but_not_old_root_swap_or_placeholder():
    existing = ("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"
                "/dev/sda1 / ext3 defaults 0 1\n"
                "UUID=old-swap none swap sw 0 0\n"
                "# scratch space\n"
                "tmpfs /tmp tmpfs nosuid,nodev 0 0\n"
                "/swapfile none swap sw 0 0\n")
    text = instance_files.fstab_text(existing, FsEntry(ROOT_UUID, "ext4"),
                                     FsEntry(SWAP_UUID, "swap"))
    assert text.splitlines()[3:] == [
        f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1",
        f"UUID={SWAP_UUID}\tnone\tswap\tsw\t0\t0",
        "",
        "# scratch space",
        "tmpfs /tmp tmpfs nosuid,nodev 0 0",
        "/swapfile none swap sw 0 0"]


def test_rewriting_fstab_twice_gives_the_same_file(tree):
    root, swap = FsEntry(ROOT_UUID, "ext4"), FsEntry(SWAP_UUID, "swap")
    instance_files.rewrite_fstab(tree, root=root, swap=swap)
    first = read(tree, "/etc/fstab")
    instance_files.rewrite_fstab(tree, root=root, swap=swap)
    assert read(tree, "/etc/fstab") == first


# --- root password ----------------------------------------------------------

def test_root_password_is_emptied_keeping_the_rest_mode_and_owner(tree):
    shadow = Path(tree.root, "etc/shadow")
    gid = 42 if os.geteuid() == 0 else os.getgid()
    os.chown(shadow, os.geteuid(), gid)
    instance_files.clear_root_password(tree)
    assert shadow.read_text() == SHADOW.replace("root:*:", "root::")
    st = shadow.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (os.geteuid(), gid)


def test_a_shadow_without_root_is_an_error_naming_the_cache(tree):
    Path(tree.root, "etc/shadow").write_text("daemon:*:1:0:99999:7:::\n")
    with pytest.raises(instance_files.InstanceFilesError, match="no line for root.*cache"):
        instance_files.clear_root_password(tree)


# --- network ----------------------------------------------------------------

def test_interfaces_has_loopback_only_when_ifupdown_is_installed(tmp_path, node):
    t = make_tree(tmp_path / "root", packages=("ifupdown",))
    instance_files.configure(t, Instance(NAME), root=FsEntry(ROOT_UUID, "ext4"),
                             node_files=node)
    assert read(t, "/etc/network/interfaces") == instance_files.INTERFACES_TEXT
    assert "auto lo\niface lo inet loopback\n" in instance_files.INTERFACES_TEXT
    mode = stat.S_IMODE(os.stat(Path(t.root, "etc/network")).st_mode)
    assert mode == 0o755


def test_no_interfaces_file_without_ifupdown(tmp_path, node):
    t = make_tree(tmp_path / "root", packages=())
    instance_files.configure(t, Instance(NAME), root=FsEntry(ROOT_UUID, "ext4"),
                             node_files=node)
    assert not os.path.lexists(Path(t.root, "etc/network/interfaces"))


def test_ifupdown_removed_with_config_files_left_does_not_count(tmp_path):
    t = make_tree(tmp_path / "root", packages=())
    Path(t.root, "var/lib/dpkg/status").write_text(
        status_paragraph("ifupdown", "deinstall ok config-files"))
    assert not instance_files.uses_ifupdown(t, instance_files.installed_packages(t))


def test_ifup_in_the_tree_counts_without_a_status_file(tmp_path):
    t = make_tree(tmp_path / "root", packages=())
    os.unlink(Path(t.root, "var/lib/dpkg/status"))
    write(Path(t.root, "usr/sbin/ifup"), "ELF", 0o755)
    assert instance_files.installed_packages(t) == frozenset()
    assert instance_files.uses_ifupdown(t, frozenset())


# --- serial console ---------------------------------------------------------

WANTS = "etc/systemd/system/getty.target.wants"


@pytest.mark.parametrize("release,unit", [
    ("bookworm", "/lib/systemd/system/serial-getty@.service"),
    ("trixie", "/usr/lib/systemd/system/serial-getty@.service"),
    ("split", "/lib/systemd/system/serial-getty@.service")])
def test_systemd_tree_enables_serial_getty_as_systemctl_would(tmp_path, release, unit):
    t = make_tree(tmp_path / "root", release=release)
    assert instance_files.enable_serial_console(t, "ttyS0") == "systemd"
    link = Path(t.root, WANTS, "serial-getty@ttyS0.service")
    assert os.readlink(link) == unit
    assert link.resolve().is_file()
    assert stat.S_IMODE(os.stat(Path(t.root, WANTS)).st_mode) == 0o755
    assert read(t, "/etc/shadow") == SHADOW  # nothing else touched
    assert not os.path.exists(Path(t.root, "etc/inittab"))


def test_systemd_tree_with_an_inittab_gets_no_inittab_line(tmp_path):
    t = make_tree(tmp_path / "root")
    write(Path(t.root, "etc/inittab"), "id:2:initdefault:\n")
    assert instance_files.enable_serial_console(t, "ttyS0") == "systemd"
    assert read(t, "/etc/inittab") == "id:2:initdefault:\n"


def test_enabling_the_getty_again_replaces_the_link(tmp_path):
    t = make_tree(tmp_path / "root", release="trixie")
    instance_files.enable_serial_console(t, "hvc0")
    instance_files.enable_serial_console(t, "hvc0")
    assert os.listdir(Path(t.root, WANTS)) == ["serial-getty@hvc0.service"]


def test_sysvinit_tree_gets_an_inittab_getty(tmp_path):
    t = make_tree(tmp_path / "root", init="sysvinit")
    assert instance_files.enable_serial_console(t, "ttyS0", "38400") == "inittab"
    assert read(t, "/etc/inittab").endswith(
        "#T0:23:respawn:/sbin/getty -L ttyS0 9600 vt100\n"
        "T0:2345:respawn:/sbin/getty -L 38400 ttyS0 vt100\n")
    assert not os.path.exists(Path(t.root, "etc/systemd"))


def test_inittab_getty_without_speed_lets_agetty_try_common_speeds(tmp_path):
    t = make_tree(tmp_path / "root", init="sysvinit")
    instance_files.enable_serial_console(t, "hvc0")
    assert read(t, "/etc/inittab").endswith(
        "hv0:2345:respawn:/sbin/getty -L 115200,38400,9600 hvc0 vt100\n")


def test_inittab_getty_is_added_once(tmp_path):
    t = make_tree(tmp_path / "root", init="sysvinit")
    instance_files.enable_serial_console(t, "ttyS0")
    first = read(t, "/etc/inittab")
    assert instance_files.add_inittab_getty(t, "ttyS0") is False
    assert read(t, "/etc/inittab") == first


def test_inittab_getty_id_avoids_ids_in_use():
    line = instance_files.inittab_getty_line("ttyS0", "", {"T0", "1"})
    assert line.startswith("gs0:2345:respawn:")


def test_minbase_tree_without_init_gets_no_getty(tmp_path, caplog):
    t = make_tree(tmp_path / "root", init="none")
    assert instance_files.enable_serial_console(t, "ttyS0") == ""
    assert "no getty" in caplog.text
    assert not os.path.exists(Path(t.root, "etc/systemd"))


def test_no_console_asked_means_no_getty(tmp_path, node):
    t = make_tree(tmp_path / "root")
    done = instance_files.configure(t, Instance(NAME), root=FsEntry(ROOT_UUID, "ext4"),
                                    node_files=node)
    assert done.serial_console == ""
    assert not os.path.exists(Path(t.root, WANTS))


@pytest.mark.parametrize("env,device,speed", [
    ({"HYPERVISOR": "kvm", "INSTANCE_HV_serial_console": "True",
      "INSTANCE_HV_serial_speed": "38400"}, "ttyS0", "38400"),
    ({"HYPERVISOR": "kvm", "INSTANCE_HV_serial_console": "False"}, None, ""),
    ({"HYPERVISOR": "kvm", "INSTANCE_HV_serial_console": "True",
      "INSTANCE_HV_serial_speed": "\u00b9"}, "ttyS0", ""),
    ({"HYPERVISOR": "xen-pvm"}, "hvc0", "")])
def test_instance_takes_its_console_from_ganeti(env, device, speed):
    request = environment.parse("create", [], {
        "OS_API_VERSION": "20", "INSTANCE_NAME": NAME, "DISK_COUNT": "1",
        "DISK_0_PATH": "/dev/xenvg/disk0", **env})
    instance = Instance.from_request(request)
    assert (instance.name, instance.serial_console, instance.serial_speed) == (
        NAME, device, speed)


def test_a_console_device_that_is_not_a_plain_name_is_refused():
    with pytest.raises(ValueError):
        Instance(NAME, serial_console="../../etc/passwd")


# --- leftovers ----------------------------------------------------------------

def test_downloaded_packages_go_and_apt_lock_and_partial_dir_stay(tree):
    removed = instance_files.remove_downloaded_packages(tree)
    archives = Path(tree.root, "var/cache/apt/archives")
    assert sorted(os.listdir(archives)) == ["lock", "partial"]
    assert os.listdir(archives / "partial") == []
    assert removed == ["/var/cache/apt/archives/libc6_2.36_amd64.deb",
                       "/var/cache/apt/archives/partial/zlib1g_1.2_amd64.deb"]


def test_persistent_net_rules_are_removed(tree):
    write(Path(tree.root, "etc/udev/rules.d/z25_persistent-net.rules"), "x")
    write(Path(tree.root, "etc/udev/rules.d/99-site.rules"), "x")
    assert instance_files.remove_persistent_net_rules(tree) == list(
        instance_files.PERSISTENT_NET_RULES)
    assert os.listdir(Path(tree.root, "etc/udev/rules.d")) == ["99-site.rules"]


# --- identity -----------------------------------------------------------------

def test_machine_id_is_emptied_and_seeds_removed(tree):
    changed = instance_files.reset_identity(tree)
    machine_id = Path(tree.root, "etc/machine-id")
    assert machine_id.read_text() == ""
    assert stat.S_IMODE(machine_id.stat().st_mode) == 0o444
    assert not os.path.lexists(Path(tree.root, "var/lib/dbus/machine-id"))
    assert not os.path.lexists(Path(tree.root, "var/lib/systemd/random-seed"))
    assert changed == ["/etc/machine-id", "/var/lib/dbus/machine-id",
                       "/var/lib/systemd/random-seed"]


def test_dbus_machine_id_symlink_to_etc_is_kept(tree):
    dbus = Path(tree.root, "var/lib/dbus/machine-id")
    dbus.unlink()
    os.symlink("/etc/machine-id", dbus)
    instance_files.reset_identity(tree)
    assert os.readlink(dbus) == "/etc/machine-id"


def test_a_missing_machine_id_is_not_invented(tree):
    os.unlink(Path(tree.root, "etc/machine-id"))
    instance_files.reset_identity(tree)
    assert not os.path.lexists(Path(tree.root, "etc/machine-id"))


def ssh_blob(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


FAKE_BLOBS = {
    "rsa": ssh_blob(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xc5" * 384),
    "ecdsa": ssh_blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" + b"\x11" * 64),
    "ed25519": ssh_blob(b"ssh-ed25519", b"\x22" * 32),
}


def fake_keygen(argv):
    """Stands for ssh-keygen -t TYPE -C COMMENT -f PATH: writes both halves."""
    kind = argv[argv.index("-t") + 1]
    path = argv[argv.index("-f") + 1]
    comment = argv[argv.index("-C") + 1]
    blob = FAKE_BLOBS[kind]
    name = blob[4:4 + int.from_bytes(blob[:4], "big")].decode()
    Path(path).write_text("PRIVATE\n")
    with open(path + ".pub", "w") as f:
        f.write(f"{name} {base64.b64encode(blob).decode()} {comment}\n")
    os.chmod(path + ".pub", 0o600)  # as under Ganeti's umask 077


def sha256_of(kind: str) -> str:
    return base64.b64encode(hashlib.sha256(FAKE_BLOBS[kind]).digest()).decode().rstrip("=")


def test_ssh_host_keys_are_replaced_and_fingerprints_returned(tmp_path, fake_runner):
    t = make_tree(tmp_path / "root", packages=("openssh-server",))
    ssh = Path(t.root, "etc/ssh")
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub",
                 "ssh_host_dsa_key", "ssh_host_dsa_key.pub", "ssh_host_rsa_key-cert.pub"):
        write(ssh / name, "old key\n")
    write(ssh / "sshd_config", "PermitRootLogin no\n")
    fake_runner.expect("ssh-keygen", action=fake_keygen)
    prints = instance_files.regenerate_ssh_host_keys(t, "root@web1.example.org")
    key = str(ssh / "ssh_host_ed25519_key")
    assert fake_runner.calls == [("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                  "root@web1.example.org", "-f", key)]
    assert sorted(os.listdir(ssh)) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub",
                                       "sshd_config"]
    assert stat.S_IMODE(os.stat(key + ".pub").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert prints == (f"256 SHA256:{sha256_of('ed25519')} root@web1.example.org (ED25519)",)


def test_every_default_key_type_is_made_when_the_tree_has_none(tmp_path, fake_runner, node,
                                                               caplog):
    t = make_tree(tmp_path / "root", packages=("openssh-server",))
    fake_runner.expect("ssh-keygen", action=fake_keygen)
    with caplog.at_level(logging.INFO):
        done = instance_files.configure(t, Instance(NAME), root=FsEntry(ROOT_UUID, "ext4"),
                                        node_files=node)
    assert [c[3] for c in fake_runner.calls] == ["rsa", "ecdsa", "ed25519"]
    assert done.ssh_fingerprints == (
        f"3072 SHA256:{sha256_of('rsa')} root@{NAME} (RSA)",
        f"256 SHA256:{sha256_of('ecdsa')} root@{NAME} (ECDSA)",
        f"256 SHA256:{sha256_of('ed25519')} root@{NAME} (ED25519)")
    for line in done.ssh_fingerprints:
        assert f"SSH host key {line}" in caplog.text


def test_no_ssh_keys_are_made_without_openssh_server(tmp_path, fake_runner):
    t = make_tree(tmp_path / "root", packages=("openssh-client",))
    assert instance_files.regenerate_ssh_host_keys(t, "root@x") == ()
    assert fake_runner.calls == []


def test_a_failing_ssh_keygen_fails_the_configuration(tmp_path, fake_runner):
    from ganeti_debootstrap.errors import CommandError
    t = make_tree(tmp_path / "root", packages=("openssh-server",))
    fake_runner.expect("ssh-keygen", returncode=1, stderr="unknown key type")
    with pytest.raises(CommandError, match="unknown key type"):
        instance_files.regenerate_ssh_host_keys(t, "root@x")


@pytest.mark.real_commands
@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519"])
def test_fingerprints_read_as_ssh_keygen_prints_them(tmp_path, kind):
    key = tmp_path / f"key_{kind}"
    runner.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "root@x", "-f", str(key)])
    expected = runner.output(["ssh-keygen", "-l", "-f", f"{key}.pub"])
    assert instance_files.fingerprint((tmp_path / f"key_{kind}.pub").read_text()) == expected


# --- all together -------------------------------------------------------------

def test_configure_writes_the_whole_instance(tmp_path, node):
    t = make_tree(tmp_path / "root", release="trixie")
    done = instance_files.configure(
        t, Instance(NAME, serial_console="ttyS0"), root=FsEntry(ROOT_UUID, "ext3"),
        swap=FsEntry(SWAP_UUID, "swap"), node_files=node)
    assert read(t, "/etc/hostname") == f"{NAME}\n"
    assert read(t, "/etc/mailname") == f"{NAME}\n"
    assert read(t, "/etc/hosts") == instance_files.hosts_text(NAME)
    assert read(t, "/etc/resolv.conf") == "search example.org\nnameserver 192.0.2.53\n"
    assert f"UUID={SWAP_UUID}\tnone\tswap" in read(t, "/etc/fstab")
    assert read(t, "/etc/shadow").startswith("root::19700:")
    assert done == instance_files.Configured(ssh_fingerprints=(), serial_console="systemd")
    assert read(t, "/etc/machine-id") == ""
    assert not os.path.lexists(Path(t.root, "var/cache/apt/archives/libc6_2.36_amd64.deb"))
