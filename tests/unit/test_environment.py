"""How the scripts read what Ganeti passes (API 5 options, API 10+ variables)."""

from __future__ import annotations

import pytest

from ganeti_debootstrap import environment
from ganeti_debootstrap.errors import ConfigError, UsageError

BASE = {"OS_API_VERSION": "20", "INSTANCE_NAME": "web1.example.org",
        "DISK_COUNT": "1", "DISK_0_PATH": "/dev/xenvg/web1.disk0",
        "HYPERVISOR": "kvm"}


def parse(script="create", argv=(), **overrides):
    env = dict(BASE)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return environment.parse(script, list(argv), env)


def test_create_reads_instance_and_disk_zero():
    req = parse()
    assert req.api_version == 20
    assert req.instance_name == "web1.example.org"
    assert req.disk_path == "/dev/xenvg/web1.disk0"
    assert req.disks[0].index == 0


@pytest.mark.parametrize("version", ["10", "15", "20"])
def test_environment_apis_are_accepted(version):
    assert parse(OS_API_VERSION=version).api_version == int(version)


def test_unknown_api_version_is_refused_with_supported_list():
    with pytest.raises(ConfigError, match=r"OS_API_VERSION='7'.*20, 15, 10, 5"):
        parse(OS_API_VERSION="7")


def test_all_missing_variables_are_named_in_one_error():
    with pytest.raises(ConfigError) as err:
        parse(INSTANCE_NAME=None, DISK_COUNT=None)
    assert "INSTANCE_NAME" in str(err.value) and "DISK_COUNT" in str(err.value)


def test_missing_disk_path_is_named():
    with pytest.raises(ConfigError, match="DISK_0_PATH"):
        parse(DISK_0_PATH=None)


def test_disk_count_zero_is_refused():
    with pytest.raises(ConfigError, match="DISK_COUNT=0"):
        parse(DISK_COUNT="0")


def test_uri_only_disk_is_explained():
    with pytest.raises(ConfigError, match="only reachable by URI"):
        parse(DISK_0_PATH=None, DISK_0_URI="rbd:pool/img")


@pytest.mark.parametrize("name", ["a;rm -rf /", "a/b", "x\nEVIL=1", "-lead.example",
                                  "a" * 64 + ".example", "a." * 127 + "ab", ""])
def test_invalid_instance_names_are_refused(name):
    with pytest.raises(ConfigError):
        parse(INSTANCE_NAME=name)


def test_not_a_number_is_reported():
    with pytest.raises(ConfigError, match="DISK_COUNT='one'"):
        parse(DISK_COUNT="one")


def test_serial_console_from_hv_param_and_xen_pvm():
    assert parse(INSTANCE_HV_serial_console="True").serial_console == "ttyS0"
    assert parse(INSTANCE_HV_serial_console="False").serial_console is None
    assert parse(HYPERVISOR="xen-pvm").serial_console == "hvc0"


def test_os_params_are_lowercased_and_reinstall_flag_read():
    req = parse(OSP_FILESYSTEM="ext3", INSTANCE_REINSTALL="1")
    assert req.os_params == {"filesystem": "ext3"}
    assert req.reinstall


def test_nics_are_parsed_with_network_details():
    req = parse(NIC_COUNT="1", NIC_0_MAC="aa:00:00:11:22:33", NIC_0_IP="198.51.100.5",
                NIC_0_NETWORK_SUBNET="198.51.100.0/24",
                NIC_0_NETWORK_GATEWAY="198.51.100.1", NIC_0_BRIDGE="br0")
    nic = req.nics[0]
    assert (nic.mac, nic.ip, nic.subnet, nic.gateway, nic.link) == (
        "aa:00:00:11:22:33", "198.51.100.5", "198.51.100.0/24", "198.51.100.1", "br0")


def test_api5_options():
    req = environment.parse("create", ["-i", "web1", "-b", "/dev/sda", "-s", "/dev/sdb"], {})
    assert (req.api_version, req.instance_name, req.disk_path, req.swap_device) == (
        5, "web1", "/dev/sda", "/dev/sdb")


def test_api5_missing_swap_is_a_usage_error():
    with pytest.raises(UsageError, match="-s"):
        environment.parse("create", ["-i", "web1", "-b", "/dev/sda"], {})


def test_api5_rename_needs_old_name():
    with pytest.raises(UsageError, match="-o"):
        environment.parse("rename", ["-i", "new", "-b", "/dev/sda", "-s", "/dev/sdb"], {})


def test_api5_export_needs_no_swap():
    req = environment.parse("export", ["-i", "web1", "-b", "/dev/sda"], {})
    assert req.disk_path == "/dev/sda"


@pytest.mark.parametrize("script", environment.SCRIPTS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_script_prints_usage_on_help(script, flag):
    with pytest.raises(UsageError, match="Usage:"):
        environment.parse(script, [flag], dict(BASE))


def test_arguments_with_environment_api_are_a_usage_error():
    with pytest.raises(UsageError, match="Unexpected arguments"):
        parse(argv=["extra"])


def test_export_reads_export_variables():
    req = parse("export", EXPORT_INDEX="0", EXPORT_DISK_PATH="/dev/loop3", EXP_SIZE_FD="7")
    assert (req.disk_path, req.disk_index, req.exp_size_fd) == ("/dev/loop3", 0, 7)


def test_export_falls_back_to_historical_export_device():
    req = parse("export", EXPORT_INDEX="0", EXPORT_DEVICE="/dev/loop4")
    assert req.disk_path == "/dev/loop4"


def test_import_without_device_is_refused():
    with pytest.raises(ConfigError, match="IMPORT_DISK_PATH"):
        parse("import", IMPORT_INDEX="0")


def test_rename_needs_old_name_and_checks_it():
    with pytest.raises(ConfigError, match="OLD_INSTANCE_NAME"):
        parse("rename")
    req = parse("rename", OLD_INSTANCE_NAME="web0.example.org")
    assert req.old_instance_name == "web0.example.org"


def test_verify_needs_a_check_and_refuses_unknown_ones():
    with pytest.raises(UsageError):
        environment.parse("verify", [], {"OS_API_VERSION": "20"})
    with pytest.raises(UsageError, match="'bogus'.*parameters"):
        environment.parse("verify", ["bogus"], {"OS_API_VERSION": "20"})
    req = environment.parse("verify", ["parameters"], {"OS_API_VERSION": "20",
                                                       "OSP_FILESYSTEM": "ext2"})
    assert req.os_params == {"filesystem": "ext2"}
