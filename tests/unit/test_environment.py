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


@pytest.mark.parametrize("given,speed", [("38400", "38400"), ("", ""), ("fast", ""),
                                         ("-9600", ""), ("\u00b9", ""), ("\u0663", "")])
def test_serial_speed_is_read_once_as_ascii_digits_or_nothing(given, speed):
    assert parse(INSTANCE_HV_serial_speed=given).serial_speed == speed


@pytest.mark.parametrize("level,debug", [(None, False), ("", False), ("0", False),
                                         ("1", True), ("2", True)])
def test_debug_level_other_than_0_asks_for_debugging(level, debug):
    env = {} if level is None else {"DEBUG_LEVEL": level}
    assert environment.debug_requested(env) is debug


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


# --- no value that could add a line; counts and descriptors bounded ----------------

# Each ends a line for some reader (or for str.splitlines): refused anywhere.
LINE_BREAKS = [pytest.param("\n", id="LF"), pytest.param("\r", id="CR"),
               pytest.param("\t", id="tab"), pytest.param("\x00", id="NUL"),
               pytest.param("\x0b", id="VT"), pytest.param("\x1e", id="RS"),
               pytest.param("\x7f", id="DEL"), pytest.param("\x85", id="NEL"),
               pytest.param("\u2028", id="LS"), pytest.param("\u2029", id="PS")]

NIC = {"NIC_COUNT": "1", "NIC_0_MAC": "aa:00:00:00:00:01", "NIC_0_IP": "192.0.2.10",
       "NIC_0_MODE": "bridged", "NIC_0_LINK": "br0", "NIC_0_BRIDGE": "br0",
       "NIC_0_NAME": "front", "NIC_0_NETWORK_NAME": "net1",
       "NIC_0_NETWORK_SUBNET": "192.0.2.0/24", "NIC_0_NETWORK_GATEWAY": "192.0.2.1",
       "NIC_0_NETWORK_SUBNET6": "2001:db8::/64", "NIC_0_NETWORK_GATEWAY6": "2001:db8::1",
       "NIC_0_NETWORK_TAGS": "web dmz", "NIC_0_NETWORK_UUID": "6d4c0a52-0000-4000-8000-1",
       "NIC_0_VLAN": ".100"}


@pytest.mark.parametrize("char", LINE_BREAKS)
@pytest.mark.parametrize("name", sorted(NIC)[1:] + ["INSTANCE_NAME", "OS_VARIANT",
                                                     "DISK_0_PATH", "DISK_0_URI",
                                                     "DISK_0_NAME"])
def test_a_line_break_in_a_variable_is_refused_naming_it(name, char):
    env = dict(NIC, OS_VARIANT="default")
    env[name] = (env.get(name) or BASE.get(name) or "x") + char + "pre-up reboot"
    with pytest.raises(ConfigError) as err:
        parse(**env)
    last = str(err.value).splitlines()[-1]
    assert f"{name}=" in last and "pre-up reboot" in last
    if char != "\n":  # the message's own lines are split by newlines
        assert char not in str(err.value)


@pytest.mark.parametrize("char", LINE_BREAKS)
def test_a_line_break_in_the_old_name_or_the_import_disk_is_refused(char):
    with pytest.raises(ConfigError, match="OLD_INSTANCE_NAME="):
        parse("rename", OLD_INSTANCE_NAME="web0" + char)
    with pytest.raises(ConfigError, match="IMPORT_DISK_PATH="):
        parse("import", IMPORT_INDEX="0", IMPORT_DISK_PATH="/dev/xenvg/d" + char)
    with pytest.raises(ConfigError, match="-b="):
        environment.parse("create", ["-i", "web1", "-b", "/dev/d" + char, "-s", "/dev/s"],
                          {})


def test_the_message_never_holds_the_line_break_itself():
    with pytest.raises(ConfigError) as err:
        parse(**dict(NIC, NIC_0_NETWORK_NAME="net1\npre-up reboot"))
    assert "pre-up reboot" in str(err.value)
    assert not any(line.startswith("pre-up") for line in str(err.value).splitlines())


def test_values_legal_before_are_still_accepted():
    env = dict(NIC, NIC_0_NETWORK_NAME="réseau 1 (bâtiment B)", NIC_0_NAME="eth front",
               NIC_0_NETWORK_TAGS="a b c", DISK_0_PATH="/srv/ganeti/file storage/web1.0")
    request = parse(**env)
    assert request.nics[0].network_name == "réseau 1 (bâtiment B)"


@pytest.mark.parametrize("name,value,limit", [
    ("DISK_COUNT", "17", "16"), ("DISK_COUNT", "1000000", "16"),
    ("NIC_COUNT", "9", "8"), ("NIC_COUNT", "1000000", "8"),
    ("DISK_0_SIZE", str(2**43 + 1), str(2**43)), ("DISK_0_SIZE", "-1", "0"),
    ("NIC_COUNT", "-1", "8"),
])
def test_counts_and_sizes_beyond_ganetis_limits_are_refused(name, value, limit):
    with pytest.raises(ConfigError) as err:
        parse(**{name: value})
    last = str(err.value).splitlines()[-1]
    assert name in last and limit in last


def test_a_million_nics_is_refused_at_once():
    import time
    start = time.monotonic()
    with pytest.raises(ConfigError, match="NIC_COUNT=1000000 is out of range"):
        parse(NIC_COUNT="1000000")
    assert time.monotonic() - start < 0.5


def test_counts_at_ganetis_limits_are_accepted():
    disks = {f"DISK_{n}_PATH": f"/dev/xenvg/d{n}" for n in range(16)}
    nics = {f"NIC_{n}_MAC": f"aa:00:00:00:00:{n:02x}" for n in range(8)}
    request = parse(DISK_COUNT="16", NIC_COUNT="8", DISK_0_SIZE=str(2**43),
                    **disks, **nics)
    assert len(request.disks) == 16 and len(request.nics) == 8
    assert request.disks[0].size_mib == 2**43


@pytest.mark.parametrize("script", ["import", "export"])
@pytest.mark.parametrize("value,accepted", [("0", True), ("15", True), ("16", False),
                                            ("-1", False), ("99999999999", False)])
def test_disk_index_is_bounded_by_ganetis_disk_limit(script, value, accepted):
    prefix = script.upper()
    env = {f"{prefix}_INDEX": value, f"{prefix}_DISK_PATH": "/dev/xenvg/d"}
    if accepted:
        assert parse(script, **env).disk_index == int(value)
    else:
        with pytest.raises(ConfigError, match=f"{prefix}_INDEX=.* 0 to 15"):
            parse(script, **env)


@pytest.mark.parametrize("value", ["1048576", "9" * 30, "9" * 5000, "-" + "9" * 5000,
                                   str(2**63), str(2**31)],
                         ids=["2**20", "30-digits", "5000-digits", "minus-5000-digits",
                              "2**63", "2**31"])
def test_huge_numbers_are_refused_without_a_traceback(value):
    env = {"EXPORT_INDEX": "0", "EXPORT_DISK_PATH": "/dev/xenvg/d", "EXP_SIZE_FD": value}
    with pytest.raises(ConfigError) as err:
        parse("export", **env)
    last = str(err.value).splitlines()[-1]
    assert "EXP_SIZE_FD=" in last and "1048575" in last
    assert len(last) < 600
    for name in ("DISK_COUNT", "NIC_COUNT", "DISK_0_SIZE"):
        if name == "DISK_0_SIZE" and len(value) < 20 and int(value) <= 2**43:
            continue  # a size in MiB: 1 TiB or 2 PiB is fine
        with pytest.raises(ConfigError, match=f"{name}=.*out of range"):
            parse(**{name: value})


def test_the_highest_descriptor_is_accepted():
    env = {"EXPORT_INDEX": "0", "EXPORT_DISK_PATH": "/dev/xenvg/d",
           "EXP_SIZE_FD": "1048575"}
    assert parse("export", **env).exp_size_fd == 1048575


@pytest.mark.parametrize("given,kept", [
    ("6F1C6A3E-0B7D-4E1A-9C61-2B3D4E5F6A7B", "6f1c6a3e-0b7d-4e1a-9c61-2b3d4e5f6a7b"),
    ("not-a-uuid", ""), (None, "")])
def test_ganetis_disk_uuid_is_kept_when_it_is_one(given, kept):
    assert parse(DISK_0_UUID=given).disks[0].uuid == kept
