"""cloud_init=nocloud and user_data: checks and the seed (synthetic trees)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
import yaml  # type: ignore[import]  # python3-yaml ships no annotations

from ganeti_debootstrap import cloudinit, environment, instance_files, osparams
from ganeti_debootstrap.cloudinit import CloudInitError
from ganeti_debootstrap.errors import ConfigError
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.instance_files import Instance, NodeFiles
from tests.systemtree import ROOT_UUID, make_tree, read, write

UUID = "5f3c8e1a-7b2d-4c9e-8f10-2a3b4c5d6e7f"
NAME = "web1.example.org"
CLOUD_CONFIG = ("#cloud-config\n"
                "write_files:\n"
                "  - path: /root/from-user-data\n"
                "    content: 'written by cloud-init, with: a colon'\n")


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


def request(**env: str) -> environment.Request:
    base = {"OS_API_VERSION": "20", "INSTANCE_NAME": NAME, "INSTANCE_UUID": UUID,
            "DISK_COUNT": "1", "DISK_0_PATH": "/dev/null", "DISK_0_ACCESS": "rw",
            "NIC_COUNT": "2", "NIC_0_MAC": "52:54:00:AA:BB:01", "NIC_0_IP": "192.0.2.10",
            "NIC_0_NETWORK_SUBNET": "192.0.2.0/24", "NIC_0_NETWORK_GATEWAY": "192.0.2.1",
            "NIC_0_NETWORK_SUBNET6": "2001:db8:1::/64",
            "NIC_0_NETWORK_GATEWAY6": "2001:db8:1::1",
            "NIC_1_MAC": "52:54:00:aa:bb:02"}
    base.update(env)
    return environment.parse("create", [], base)


# --- the parameters -----------------------------------------------------------

def test_cloud_init_defaults_to_no_and_accepts_nocloud():
    assert osparams.validate({}).cloud_init == "no"
    assert osparams.validate({"cloud_init": "nocloud"}).cloud_init == "nocloud"
    with pytest.raises(ConfigError, match="choose one of no, nocloud"):
        osparams.validate({"cloud_init": "ec2"})


@pytest.mark.parametrize("text", [CLOUD_CONFIG, "#cloud-config\n", "#!/bin/sh\necho hi\n",
                                  "#cloud-config\r\nhostname: x\r\n"])
def test_cloud_config_and_scripts_are_accepted(text):
    params = osparams.validate({"user_data": b64(text)})
    assert cloudinit.decode_user_data(params.user_data) == text


@pytest.mark.parametrize("data, why", [
    ("not base64!", "is not base64"),
    (b64(b"\xff\xfe#cloud-config"), "not UTF-8"),
    (b64("#cloud-config\n" + "a: b\n" * 4000), "more than 16384"),
    (b64("#cloud-config\nusers: [a, b\nsecret: hunter2\n"), "not valid YAML once decoded (line"),
    (b64("#cloud-config\n- a list\n- not a mapping\n"), "not a mapping"),
    (b64("#include\nhttp://example.org/x\n"), "does not start with '#cloud-config'"),
    (b64("hostname: no header\n"), "does not start with '#cloud-config'"),
])
def test_bad_user_data_is_refused_without_quoting_it(data, why):
    with pytest.raises(ConfigError) as err:
        osparams.validate({"user_data": data})
    message = str(err.value)
    assert why in message and "user_data (value not shown)" in message
    assert "hunter2" not in message and data[:20] not in message


# --- the seed -----------------------------------------------------------------

def test_meta_data_has_the_ganeti_uuid_and_the_name_as_json():
    inst = Instance.from_request(request(), osparams.validate({"cloud_init": "nocloud"}))
    assert inst.cloud_seed is not None
    assert json.loads(cloudinit.meta_data_text(inst.cloud_seed)) == {
        "instance-id": UUID, "local-hostname": NAME}
    # Our own network files step aside: no NICs in our plan.
    assert inst.network_plan.nics == ()


def test_a_bad_instance_uuid_is_refused():
    with pytest.raises(CloudInitError, match="INSTANCE_UUID='not-a-uuid"):
        Instance.from_request(request(INSTANCE_UUID="not-a-uuid\n: x"),
                              osparams.validate({"cloud_init": "nocloud"}))


def test_without_a_uuid_the_instance_id_comes_from_the_name():
    assert cloudinit.instance_id("", NAME) == f"ganeti-{NAME}"


def test_network_config_v2_carries_the_addresses_our_files_would():
    params = osparams.validate({"cloud_init": "nocloud"})
    inst = Instance.from_request(request(), params)
    assert inst.cloud_seed is not None
    config = yaml.safe_load(cloudinit.network_config_text(inst.cloud_seed.nics))
    assert config == {"version": 2, "ethernets": {
        "nic0": {"match": {"macaddress": "52:54:00:aa:bb:01"}, "set-name": "nic0",
                 "addresses": ["192.0.2.10/24", "2001:db8:1:0:5054:ff:feaa:bb01/64"],
                 "dhcp4": False, "dhcp6": False,
                 "gateway4": "192.0.2.1", "gateway6": "2001:db8:1::1"},
        "nic1": {"match": {"macaddress": "52:54:00:aa:bb:02"}, "set-name": "nic1",
                 "dhcp4": True, "dhcp6": False}}}
    # The same addresses as without cloud-init.
    ours = Instance.from_request(request(), osparams.validate({})).network_plan.nics
    assert ours == inst.cloud_seed.nics


def _configure(t, inst):
    node = write(Path(t.root).parent / "node-resolv.conf", "nameserver 192.0.2.53\n")
    return instance_files.configure(t, inst, root=FsEntry(ROOT_UUID, "ext4"),
                                    node_files=NodeFiles(str(node), str(node)))


def test_the_seed_is_written_and_our_network_files_step_aside(tmp_path):
    t = make_tree(tmp_path / "root", packages=("ifupdown", "cloud-init"))
    params = osparams.validate({"cloud_init": "nocloud", "user_data": b64(CLOUD_CONFIG)})
    _configure(t, Instance.from_request(request(), params))
    seed = cloudinit.SEED_DIR
    assert read(t, f"{seed}/user-data") == CLOUD_CONFIG
    assert yaml.safe_load(read(t, f"{seed}/meta-data"))["instance-id"] == UUID
    assert "nic0" in yaml.safe_load(read(t, f"{seed}/network-config"))["ethernets"]
    for name in ("meta-data", "user-data", "network-config"):
        assert stat.S_IMODE(os.stat(Path(t.root, seed.lstrip("/"), name)).st_mode) == 0o600
    dropin = yaml.safe_load(read(t, cloudinit.CONFIG_DROPIN))
    assert dropin == {"datasource_list": ["NoCloud", "None"], "ssh_deletekeys": False,
                      "prefer_fqdn_over_hostname": True}
    # Loopback only in ours; no .link files naming the NICs.
    assert "nic0" not in read(t, "/etc/network/interfaces")
    assert not os.path.exists(Path(t.root, "etc/systemd/network"))
    # The name and the static address agree with what cloud-init applies.
    assert read(t, "/etc/hostname") == f"{NAME}\n"
    assert f"192.0.2.10\t{NAME}\tweb1\n" in read(t, "/etc/hosts")


def test_network_none_tells_cloud_init_to_leave_the_network_alone(tmp_path):
    t = make_tree(tmp_path / "root", packages=("ifupdown", "cloud-init"))
    params = osparams.validate({"cloud_init": "nocloud", "network": "none"})
    _configure(t, Instance.from_request(request(), params))
    assert yaml.safe_load(read(t, cloudinit.CONFIG_DROPIN))["network"] == {
        "config": "disabled"}
    assert not os.path.exists(Path(t.root, cloudinit.SEED_DIR.lstrip("/"), "network-config"))
    assert read(t, f"{cloudinit.SEED_DIR}/user-data") == "#cloud-config\n"


def test_nocloud_without_cloud_init_installed_is_refused_with_the_fix(tmp_path):
    t = make_tree(tmp_path / "root")
    params = osparams.validate({"cloud_init": "nocloud"})
    with pytest.raises(CloudInitError, match="Add cloud-init to EXTRA_PKGS"):
        _configure(t, Instance.from_request(request(), params))
    assert not os.path.exists(Path(t.root, "var/lib/cloud"))


def test_nocloud_without_cloud_init_in_extra_pkgs_is_refused_before_anything():
    with pytest.raises(CloudInitError, match="or set cloud_init=no"):
        cloudinit.refuse_without_cloud_init("nocloud", ("openssh-server",))
    cloudinit.refuse_without_cloud_init("nocloud", ("cloud-init",))
    cloudinit.refuse_without_cloud_init("no", ())
