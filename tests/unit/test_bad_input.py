"""Bad input: every variable and setting the scripts read, malformed.

Each bad value must end the script with one clear error whose LAST line
names the input (Ganeti shows the administrator the log's last lines), a
non-zero exit status, nothing changed on the disk, no file written outside
the instance, and nothing the value contains executed or taken as a path.

The scripts run in this process through ``cli.main`` (as the entry points
call it), with the fake runner refusing every command but the harmless
``dpkg --print-architecture`` and the shell reading the settings files
(run for real): a bad value that got as far as touching a
disk (wipefs, sfdisk, losetup, mkfs...) would make the fake raise, which the
top-level handler reports as an internal error (status 70), and the test
fails. The property-based tests at the end feed arbitrary text to the
parsers and the path helper.
"""

from __future__ import annotations

import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hypothesis.configuration
import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ganeti_debootstrap import cli, environment, names, rename, settings
from ganeti_debootstrap.errors import ConfigError, UsageError
from ganeti_debootstrap.paths import Paths
from ganeti_debootstrap.target import Target, TargetPathError
from tests.diskdigest import disk_digest

DISK_MIB = 1024

# Hypothesis keeps its files (examples, a Unicode table) in ./.hypothesis by
# default: not in the source tree. Nothing is reused between runs
# (database=None below): the examples are drawn afresh each time.
hypothesis.configuration.set_hypothesis_home_dir(
    os.path.join(tempfile.gettempdir(), f"gidb-hypothesis-{os.getuid()}"))


@dataclass
class Node:
    """A scratch installation of the OS definition and one instance disk."""

    paths: Paths
    disk: str
    canary: Path  # a file that must never come to exist
    tmpdir: Path  # TMPDIR of the scripts: must stay empty
    watched: tuple[Path, ...]  # directories where nothing may appear

    def env(self, **variables: str | None) -> dict[str, str]:
        """Ganeti's create environment (API 20) with ``variables`` changed (None: unset)."""
        env = {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "OS_API_VERSION": "20",
               "OS_NAME": "debootstrap", "OS_VARIANT": "default", "DEBUG_LEVEL": "0",
               "HYPERVISOR": "kvm", "INSTANCE_NAME": "web1.example.org",
               "DISK_COUNT": "1", "DISK_0_PATH": self.disk, "DISK_0_ACCESS": "rw",
               "NIC_COUNT": "0"}
        for key, value in variables.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def listing(self) -> dict[str, list[str]]:
        return {str(d): sorted(os.listdir(d)) for d in self.watched}


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    paths = Paths(str(tmp_path / "etc"), str(tmp_path / "var"), str(tmp_path / "os"))
    os.makedirs(os.path.dirname(paths.defaults_file))
    os.makedirs(paths.default_variants_dir)
    os.makedirs(paths.os_dir)
    os.makedirs(paths.localstatedir)
    Path(paths.variants_list).write_text("default\n")
    Path(paths.default_variants_dir, "default.conf").write_text("")
    Path(paths.defaults_file).write_text("")
    disks = tmp_path / "disks"
    disks.mkdir()
    disk = disks / "disk0.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB * 2**20)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    # Ganeti runs the scripts with the OS directory as working directory.
    monkeypatch.chdir(paths.os_dir)
    return Node(paths, str(disk), tmp_path / "canary", tmpdir,
                (tmpdir, Path(paths.os_dir), disks, tmp_path))




@dataclass
class Outcome:
    status: int
    lines: list[str]

    @property
    def last(self) -> str:
        return self.lines[-1] if self.lines else ""


@pytest.fixture
def call(node: Node, fake_runner, capsys, process_state):
    """Run a script as its entry point would; check that it changed nothing."""
    fake_runner.expect("dpkg", "--print-architecture", stdout="amd64")
    fake_runner.expect(*settings.SHELL_COMMAND, real=True)
    reading_settings = " ".join(settings.SHELL_COMMAND) + " "

    def run(script: str, env: dict[str, str], argv: tuple[str, ...] = ()) -> Outcome:
        before_disk = disk_digest(node.disk)
        before = node.listing()
        capsys.readouterr()
        status = cli.main(script, None, "", argv=list(argv), environ=env,
                          paths=node.paths)
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert status != 70, f"internal error (a command ran?):\n{err}"
        assert disk_digest(node.disk) == before_disk, "the disk was changed"
        assert node.listing() == before, "a file appeared outside the instance"
        assert not node.canary.exists(), "something the input held was executed"
        assert [c for c in fake_runner.commands()
                if c != "dpkg --print-architecture"
                and not c.startswith(reading_settings)] == []
        return Outcome(status, lines)
    return run


def injections(canary: Path) -> list[str]:
    """Values that would run a command or leave their place if interpreted."""
    return [f"$(touch {canary})", f"`touch {canary}`", f"x;touch {canary}",
            f"x|touch {canary}", f"x&&touch {canary}", f"x\ntouch {canary}",
            f"../../{canary.name}", f"{canary}"]


# --- the environment ------------------------------------------------------------

BAD_INSTANCE_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("web1;reboot", id="semicolon"),
    pytest.param("$(reboot)", id="command-substitution"),
    pytest.param("`reboot`", id="backticks"),
    pytest.param("web1/../../etc", id="slashes"),
    pytest.param("web1\nweb2", id="newline"),
    pytest.param("web 1", id="space"),
    pytest.param("-web1", id="leading-hyphen"),
    pytest.param("web1-", id="trailing-hyphen"),
    pytest.param("web_1", id="underscore"),
    pytest.param("web1..example.org", id="empty-label"),
    pytest.param("a" * 64 + ".example.org", id="label-over-63"),
    pytest.param(".".join(["a" * 60] * 5), id="over-253"),
    pytest.param("wéb1", id="non-ascii"),
    pytest.param("web1\x00", id="nul"),
]


@pytest.mark.parametrize("name", BAD_INSTANCE_NAMES)
@pytest.mark.parametrize("script", ["create", "import", "export", "rename"])
def test_bad_instance_name_is_refused_naming_it(node, call, script, name):
    env = node.env(INSTANCE_NAME=name)
    env.update(IMPORT_DISK_PATH=node.disk, EXPORT_DISK_PATH=node.disk,
               OLD_INSTANCE_NAME="web0.example.org")
    if "\x00" in name:
        # No environment can hold a NUL byte: the API 5 option can.
        del env["OS_API_VERSION"]
        out = call(script, env, ("-i", name, "-b", node.disk, "-s", node.disk,
                                 "-o", "web0"))
        assert out.status != 0 and "-i=" in out.last
        return
    out = call(script, env)
    assert out.status != 0
    assert "INSTANCE_NAME" in out.last


@pytest.mark.parametrize("index", range(8))
def test_instance_names_holding_commands_are_never_run(node, call, index):
    name = injections(node.canary)[index]
    out = call("create", node.env(INSTANCE_NAME=name))
    assert out.status != 0 and "INSTANCE_NAME" in out.last


def test_bad_old_instance_name_is_refused_by_rename(node, call):
    out = call("rename", node.env(OLD_INSTANCE_NAME=f"$(touch {node.canary})"))
    assert out.status != 0 and "OLD_INSTANCE_NAME" in out.last


@pytest.mark.parametrize("variant", [
    "../../etc/passwd", "default/../../x", "/etc/passwd", ".hidden", "a b",
    "x;touch canary", "default\n", "unknown", "$(touch canary)", "ä"])
def test_bad_or_unknown_variant_is_refused_naming_it(node, call, variant):
    out = call("create", node.env(OS_VARIANT=variant))
    assert out.status != 0
    assert repr(variant) in out.last


@pytest.mark.parametrize("script", ["create", "verify"])
@pytest.mark.parametrize("name,value", [
    ("OSP_FILESYSTEM", "zfs"), ("OSP_FILESYSTEM", "ext4;touch canary"),
    ("OSP_FILESYSTEM", "../../ext4"), ("OSP_FILESYSTEM", "EXT4"),
    ("OSP_NO_SUCH_PARAMETER", "1"),
])
def test_bad_os_parameter_is_refused_naming_it(node, call, script, name, value):
    argv = ("parameters",) if script == "verify" else ()
    out = call(script, node.env(**{name: value}), argv)
    assert out.status != 0
    assert name[len("OSP_"):].lower() in out.last


@pytest.mark.parametrize("value", ["abc", "7", "20x", "-20", "2 0", "１０", " 20"])
@pytest.mark.parametrize("script", ["create", "import", "export", "rename", "verify"])
def test_unknown_os_api_version_is_refused(node, call, script, value):
    argv = ("parameters",) if script == "verify" else ()
    out = call(script, node.env(OS_API_VERSION=value), argv)
    assert out.status != 0 and "OS_API_VERSION" in out.last


@pytest.mark.parametrize("variables,named", [
    ({"DISK_COUNT": "0"}, "DISK_COUNT=0"),
    ({"DISK_COUNT": "one"}, "DISK_COUNT"),
    ({"DISK_COUNT": "-1"}, "DISK_COUNT"),
    ({"DISK_COUNT": None}, "DISK_COUNT"),
    ({"DISK_0_PATH": None}, "DISK_0_PATH"),
    ({"DISK_0_PATH": ""}, "DISK_0_PATH"),
    ({"DISK_0_PATH": "/dev/x\nrm -rf /"}, "DISK_0_PATH"),
    ({"DISK_0_SIZE": "big"}, "DISK_0_SIZE"),
    ({"NIC_COUNT": "two"}, "NIC_COUNT"),
    ({"INSTANCE_NAME": None}, "INSTANCE_NAME"),
])
def test_bad_disk_and_nic_variables_are_refused_naming_them(node, call, variables, named):
    out = call("create", node.env(**variables))
    assert out.status != 0 and named in out.last


def test_disk_count_minus_one_is_refused_naming_it(node, call):
    # Ganeti never passes it; it must not be read as "no disks, fine".
    out = call("create", node.env(DISK_COUNT="-1"))
    assert out.status != 0 and "DISK_COUNT" in out.last


@pytest.mark.parametrize("name,value", [
    ("NIC_0_MAC", "zz:zz:zz:zz:zz:zz"), ("NIC_0_MAC", "aa:00:00:00:00:01;reboot"),
    ("NIC_0_IP", "10.0.0.300"), ("NIC_0_IP", "10.0.0.1;reboot"),
    ("NIC_0_NETWORK_GATEWAY", "gateway"), ("NIC_0_NETWORK_GATEWAY", "10.0.0.1;x"),
])
def test_bad_nic_value_is_refused_naming_it(node, call, name, value):
    env = node.env(NIC_COUNT="1", NIC_0_MAC="aa:00:00:00:00:01", NIC_0_MODE="bridged",
                   NIC_0_LINK="br0", NIC_0_IP="10.0.0.2",
                   NIC_0_NETWORK_SUBNET="10.0.0.0/24", NIC_0_NETWORK_GATEWAY="10.0.0.1")
    env[name] = value
    out = call("create", env)
    assert out.status != 0 and name in out.last


@pytest.mark.parametrize("kind", ["missing", "directory", "char-device", "dir-symlink",
                                  "too-small", "fifo"])
def test_disk_path_that_is_not_a_usable_disk_is_refused_naming_it(node, call, tmp_path,
                                                                   kind):
    path = tmp_path / "other"
    if kind == "directory":
        path.mkdir()
    elif kind == "char-device":
        path = Path("/dev/null")
    elif kind == "dir-symlink":
        (tmp_path / "adir").mkdir()
        path.symlink_to(tmp_path / "adir")
    elif kind == "too-small":
        with open(path, "wb") as f:
            f.truncate(100 * 2**20)
    elif kind == "fifo":
        os.mkfifo(path)
    out = call("create", node.env(DISK_0_PATH=str(path)))
    assert out.status != 0
    assert str(path) in out.last


@pytest.mark.parametrize("script", ["import", "export"])
@pytest.mark.parametrize("value", ["x", "1.5", "0x1", "one"])
def test_import_export_index_that_is_not_a_number_is_refused(node, call, script, value):
    prefix = script.upper()
    env = node.env(**{f"{prefix}_INDEX": value, f"{prefix}_DISK_PATH": node.disk})
    out = call(script, env)
    assert out.status != 0 and f"{prefix}_INDEX" in out.last


@pytest.mark.parametrize("script", ["import", "export"])
def test_missing_import_export_disk_is_refused(node, call, script):
    out = call(script, node.env(**{f"{script.upper()}_INDEX": "0"}))
    assert out.status != 0 and f"{script.upper()}_DISK_PATH" in out.last


@pytest.mark.parametrize("value", ["x", "-1", "0", "1", "3.0", "99999"])
def test_exp_size_fd_that_is_not_an_open_descriptor_is_refused(node, call, value):
    env = node.env(EXPORT_INDEX="0", EXPORT_DISK_PATH=node.disk, EXP_SIZE_FD=value)
    out = call("export", env)
    assert out.status != 0 and "EXP_SIZE_FD" in out.last


def test_exp_size_fd_open_only_for_reading_is_refused(node, call):
    fd = os.open(node.disk, os.O_RDONLY)
    try:
        env = node.env(EXPORT_INDEX="0", EXPORT_DISK_PATH=node.disk, EXP_SIZE_FD=str(fd))
        out = call("export", env)
    finally:
        os.close(fd)
    assert out.status != 0 and f"EXP_SIZE_FD={fd}" in out.last


@pytest.mark.parametrize("argv", [
    ("-i", "web1", "-b"),                          # option without its value
    ("-x", "1"),                                   # unknown option
    ("-i", "web1", "-b", "/dev/x", "-s", "/dev/y", "extra"),
    ("-i", "web1", "-s", "/dev/y"),                # no -b
])
def test_api5_bad_options_are_refused_naming_the_problem(node, call, argv):
    env = node.env(OS_API_VERSION=None)
    out = call("create", env, argv)
    assert out.status == 2
    assert "Usage" not in out.last
    assert any(o in out.last for o in ("-b", "-x", "extra"))


def test_api10_with_arguments_is_a_usage_error_naming_them(node, call):
    out = call("create", node.env(), ("-i", "web1"))
    assert out.status == 2 and "Unexpected arguments" in out.last


@pytest.mark.parametrize("argv", [(), ("bogus",), ("parameters", "$(touch canary)")])
def test_verify_with_unknown_checks_is_a_usage_error_naming_them(node, call, argv):
    out = call("verify", node.env(), argv)
    assert out.status == 2
    assert ("verify needs" in out.last) or ("Unknown verify check" in out.last)


# --- the settings ------------------------------------------------------------------

BAD_SETTINGS = [
    ("SUITE", "../../etc"), ("SUITE", "trixie;reboot"), ("SUITE", "a b"),
    ("ARCH", "amd64;x"), ("ARCH", "AMD64"),
    ("MIRROR", "javascript:alert(1)"), ("MIRROR", "/srv/mirror"),
    ("PROXY", "ftp://proxy"), ("PROXY", "proxy:3128"),
    ("COMPONENTS", "main,../x"), ("COMPONENTS", "main,$(x)"),
    ("EXTRA_PKGS", "vim;reboot"), ("EXTRA_PKGS", "../x"), ("EXTRA_PKGS", "Vim"),
    ("GENERATE_CACHE", "maybe"), ("CLEAN_CACHE", "-1"), ("CLEAN_CACHE", "x"),
    ("PARTITION_STYLE", "gpt2"), ("PARTITION_STYLE", "MSDOS"),
    ("PARTITION_ALIGNMENT", "0"), ("PARTITION_ALIGNMENT", "-1"),
    ("PARTITION_ALIGNMENT", "abc"), ("PARTITION_ALIGNMENT", "1.5"),
    ("PARTITION_ALIGNMENT", "2048 "), ("PARTITION_ALIGNMENT", "0x800"),
    ("CACHE_IMAGE", "sometimes"), ("BOOTSTRAP_TOOL", "busybox"),
    ("CUSTOMIZE_DIR", "relative/hooks"), ("VARIANTS_DIR", "variants"),
    ("HOOK_TIMEOUT", "0"), ("HOOK_TIMEOUT", "-5"), ("HOOK_TIMEOUT", "1h"),
    # Unicode digits: isdigit() says yes, int() says no.
    ("CLEAN_CACHE", "¹"), ("PARTITION_ALIGNMENT", "２０４８"), ("HOOK_TIMEOUT", "٣٦٠٠"),
]


@pytest.mark.parametrize("where", ["defaults", "variant"])
@pytest.mark.parametrize("name,value", BAD_SETTINGS)
def test_bad_setting_is_refused_naming_it_and_its_file(node, call, where, name, value):
    target = (node.paths.defaults_file if where == "defaults"
              else os.path.join(node.paths.default_variants_dir, "default.conf"))
    quoted = "'" + value.replace("'", "'\\''") + "'"
    Path(target).write_text(f"{name}={quoted}\n")
    out = call("create", node.env())
    assert out.status != 0
    assert name in out.last and target in out.last


def test_alignment_leaving_too_little_room_is_refused_before_writing(node, call):
    Path(node.paths.defaults_file).write_text('PARTITION_ALIGNMENT="1900000"\n')
    out = call("create", node.env())
    assert out.status != 0 and "PARTITION_ALIGNMENT=1900000" in out.last


@pytest.mark.parametrize("text", ['SUITE="unterminated\n', "if then fi\n", "SUITE=(\n",
                                  "exit 3\n", "return 1\n"])
@pytest.mark.parametrize("where", ["defaults", "variant"])
def test_settings_file_that_fails_as_shell_is_refused_naming_it(node, call, where, text):
    target = (node.paths.defaults_file if where == "defaults"
              else os.path.join(node.paths.default_variants_dir, "default.conf"))
    Path(target).write_text(text)
    out = call("create", node.env())
    assert out.status != 0 and target in out.last


def test_published_variant_without_settings_file_is_a_configuration_error(node, call):
    Path(node.paths.variants_list).write_text("default\nweb\n")
    out = call("create", node.env(OS_VARIANT="web"))
    assert out.status != 0 and "'web'" in out.last and "web.conf" in out.last


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_hooks_directory_others_can_write_is_refused_before_the_disk(node, call, tmp_path,
                                                                     mode):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "10-ok").write_text(f"#!/bin/sh\ntouch {node.canary}\n")
    (hooks / "10-ok").chmod(0o755)
    hooks.chmod(mode)
    Path(node.paths.defaults_file).write_text(f'CUSTOMIZE_DIR="{hooks}"\n')
    out = call("create", node.env())
    assert out.status != 0
    assert "Refusing to run the customisation hooks" in out.last and str(hooks) in out.last


def test_writable_hook_is_refused_before_the_disk(node, call, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hooks.chmod(0o755)
    hook = hooks / "10-writable"
    hook.write_text(f"#!/bin/sh\ntouch {node.canary}\n")
    hook.chmod(0o757)
    Path(node.paths.defaults_file).write_text(f'CUSTOMIZE_DIR="{hooks}"\n')
    out = call("create", node.env())
    assert out.status != 0 and str(hooks) in out.last


# --- no input adds a line to a file of the instance ---------------------------------

LINE_BREAKS = [pytest.param("\n", id="LF"), pytest.param("\r", id="CR"),
               pytest.param("\t", id="tab"), pytest.param("\x85", id="NEL"),
               pytest.param("\u2028", id="LS"), pytest.param("\u2029", id="PS")]

NIC_ENV = {"NIC_COUNT": "1", "NIC_0_MAC": "aa:00:00:00:00:01", "NIC_0_MODE": "bridged",
           "NIC_0_LINK": "br0", "NIC_0_BRIDGE": "br0", "NIC_0_IP": "10.0.0.2",
           "NIC_0_NAME": "front", "NIC_0_NETWORK_NAME": "net1",
           "NIC_0_NETWORK_SUBNET": "10.0.0.0/24", "NIC_0_NETWORK_GATEWAY": "10.0.0.1",
           "NIC_0_NETWORK_SUBNET6": "2001:db8::/64",
           "NIC_0_NETWORK_GATEWAY6": "2001:db8::1", "NIC_0_NETWORK_TAGS": "web"}


@pytest.mark.parametrize("char", LINE_BREAKS)
@pytest.mark.parametrize("name", sorted(n for n in NIC_ENV if n != "NIC_COUNT"))
def test_a_line_break_in_a_nic_variable_is_refused_naming_it(node, call, name, char):
    env = node.env(**NIC_ENV)
    env[name] += f"{char}pre-up touch {node.canary}"
    out = call("create", env)
    assert out.status == 1 and f"{name}=" in out.last


@pytest.mark.parametrize("char", LINE_BREAKS)
@pytest.mark.parametrize("script,name", [("create", "INSTANCE_NAME"),
                                         ("rename", "OLD_INSTANCE_NAME"),
                                         ("create", "OS_VARIANT")])
def test_a_line_break_in_a_name_is_refused_naming_it(node, call, script, name, char):
    env = node.env(OLD_INSTANCE_NAME="web0.example.org")
    env[name] += f"{char}touch {node.canary}"
    out = call(script, env)
    assert out.status == 1 and f"{name}=" in out.last


@pytest.mark.parametrize("char", LINE_BREAKS)
@pytest.mark.parametrize("script", ["create", "verify"])
def test_a_line_break_in_an_os_parameter_is_refused_naming_it(node, call, script, char):
    argv = ("parameters",) if script == "verify" else ()
    out = call(script, node.env(OSP_FILESYSTEM=f"ext4{char}touch {node.canary}"), argv)
    assert out.status == 1 and "filesystem=" in out.last and "OSP_FILESYSTEM" in out.last


TEXT_SETTINGS = [("MIRROR", "http://127.0.0.1:3142/debian"),
                 ("PROXY", "http://127.0.0.1:3128"), ("COMPONENTS", "main"),
                 ("SUITE", "trixie"), ("EXTRA_PKGS", "vim"), ("ARCH", "amd64"),
                 ("CUSTOMIZE_DIR", "/etc/hooks"), ("VARIANTS_DIR", "/etc/variants"),
                 ("BOOTLOADER", "none"), ("CLEAN_CACHE", "14")]


@pytest.mark.parametrize("char", LINE_BREAKS)
@pytest.mark.parametrize("name,legal", TEXT_SETTINGS)
@pytest.mark.parametrize("where", ["defaults", "variant"])
def test_a_line_break_in_a_setting_is_refused_naming_it_and_its_file(node, call, where,
                                                                      name, legal, char):
    target = (node.paths.defaults_file if where == "defaults"
              else os.path.join(node.paths.default_variants_dir, "default.conf"))
    value = f"{legal}{char}deb http://127.0.0.1/x trixie main"
    Path(target).write_text(f"{name}='{value}'\n", encoding="utf-8")
    out = call("create", node.env())
    assert out.status == 1
    assert name in out.last and target in out.last and "contains" in out.last


@pytest.mark.parametrize("name,legal", TEXT_SETTINGS)
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f"])
def test_a_control_character_in_a_setting_is_refused(name, legal, char):
    with pytest.raises(ConfigError, match=f"{name} .*contains"):
        settings.validate({name: legal + char}, ["/etc/default/x"], 20)


@pytest.mark.parametrize("name", ["MIRROR", "PROXY"])
def test_a_space_in_a_url_setting_is_refused(name):
    value = "http://127.0.0.1/debian trixie main"
    with pytest.raises(ConfigError, match=f"{name} .*contains a space"):
        settings.validate({name: value}, ["/etc/default/x"], 20)


def test_settings_legal_before_are_still_accepted():
    conf = settings.validate({"MIRROR": "file:/srv/mirror/debian", "PROXY":
                              "http://127.0.0.1:3128/", "COMPONENTS": "main contrib",
                              "EXTRA_PKGS": "vim, less,openssh-server",
                              "SUITE": "bookworm-backports"}, ["/etc/default/x"], 20)
    assert conf.extra_pkgs == ("vim", "less", "openssh-server")
    assert conf.components == ("main", "contrib")


# --- counts from Ganeti are bounded ---------------------------------------------------

@pytest.mark.parametrize("name,value,limit", [
    ("DISK_COUNT", "17", "16"), ("DISK_COUNT", "1000000", "16"),
    ("NIC_COUNT", "9", "8"), ("NIC_COUNT", "1000000", "8"),
    ("DISK_0_SIZE", "9" * 100, str(2**43)),
])
def test_counts_beyond_ganetis_limits_are_refused_naming_the_limit(node, call, name,
                                                                   value, limit):
    out = call("create", node.env(**{name: value}))
    assert out.status == 1 and f"{name}=" in out.last and limit in out.last


@pytest.mark.parametrize("value", ["1048576", str(2**63), "9" * 5000])
def test_exp_size_fd_beyond_any_descriptor_is_refused_without_a_traceback(node, call,
                                                                          value):
    env = node.env(EXPORT_INDEX="0", EXPORT_DISK_PATH=node.disk, EXP_SIZE_FD=value)
    out = call("export", env)
    assert out.status == 1 and "EXP_SIZE_FD=" in out.last and "1048575" in out.last


@pytest.mark.parametrize("script", ["import", "export"])
def test_disk_index_beyond_ganetis_disk_limit_is_refused(node, call, script):
    prefix = script.upper()
    env = node.env(**{f"{prefix}_INDEX": "16", f"{prefix}_DISK_PATH": node.disk})
    out = call(script, env)
    assert out.status == 1 and f"{prefix}_INDEX=16" in out.last and "0 to 15" in out.last


# --- what runs as root is owned by root ---------------------------------------------------

@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
@pytest.mark.parametrize("which", ["settings file", "variants dir", "variant file"])
def test_settings_others_can_change_are_refused_before_the_disk(node, call, which, mode):
    path = {"settings file": node.paths.defaults_file,
            "variants dir": node.paths.default_variants_dir,
            "variant file": os.path.join(node.paths.default_variants_dir,
                                         "default.conf")}[which]
    # The code others could have put there: it must not run.
    shell = (path if which == "settings file"
             else os.path.join(node.paths.default_variants_dir, "default.conf"))
    Path(shell).write_text(f"touch {node.canary}\n")
    os.chmod(path, mode | (0o111 if os.path.isdir(path) else 0))
    out = call("create", node.env())
    assert out.status == 1
    assert f"Refusing to read the settings in {path}" in out.last
    assert f"chmod go-w {path}" in out.last


def test_a_cache_directory_others_can_write_is_refused_before_the_disk(node, call):
    cache_dir = node.paths.cache_dir
    os.makedirs(cache_dir)
    os.chmod(cache_dir, 0o777)
    out = call("create", node.env())
    assert out.status == 1
    assert f"Refusing to use the bootstrap cache in {cache_dir}" in out.last
    assert f"chmod go-w {cache_dir}" in out.last


# --- property-based: parsers never fail in unexpected ways -----------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\x00"), max_size=300)
VARIABLES = ("OS_API_VERSION", "INSTANCE_NAME", "OLD_INSTANCE_NAME", "OS_VARIANT",
             "DISK_COUNT", "DISK_0_PATH", "DISK_0_SIZE", "DISK_0_URI", "NIC_COUNT",
             "NIC_0_MAC", "NIC_0_IP", "EXPORT_INDEX", "EXPORT_DISK_PATH",
             "IMPORT_INDEX", "IMPORT_DISK_PATH", "EXP_SIZE_FD", "DEBUG_LEVEL",
             "INSTANCE_HV_serial_console", "OSP_FILESYSTEM", "INSTANCE_REINSTALL")
VALID_HOSTNAME = __import__("re").compile(
    r"^(?=.{1,253}\.?$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


@hsettings(max_examples=400, deadline=None, database=None)
@given(script=st.sampled_from(environment.SCRIPTS),
       env=st.dictionaries(st.sampled_from(VARIABLES), TEXT, max_size=12),
       argv=st.lists(TEXT, max_size=4))
def test_parse_raises_only_usage_or_config_errors(script, env, argv):
    try:
        request = environment.parse(script, argv, env)
    except (UsageError, ConfigError):
        return
    # What it accepted is what the checks promise.
    if request.instance_name:
        assert VALID_HOSTNAME.match(request.instance_name), request.instance_name
    assert "\n" not in request.disk_path


@hsettings(max_examples=1000, deadline=None, database=None)
@given(TEXT)
def test_hostname_check_accepts_only_real_hostnames(name):
    problem = names.hostname_problem(name)
    if problem is None:
        assert VALID_HOSTNAME.match(name), name
        assert not set(name) & set("/\\$`;|&<>()'\" \t\n*?[]{}!~")
    else:
        assert problem and "\n" not in problem


@hsettings(max_examples=300, deadline=None, database=None)
@given(raw=st.dictionaries(st.sampled_from(settings.NAMES), TEXT, max_size=8),
       api=st.sampled_from(environment.API_VERSIONS))
def test_settings_validation_raises_only_config_errors(raw, api):
    try:
        conf = settings.validate(raw, ["/etc/default/x"], api)
    except ConfigError as err:
        assert "/etc/default/x" in str(err)
        return
    # Values that end up in file names or command lines are plain names:
    # no shell syntax, no way up a directory tree (a component may hold a
    # slash, as in main/debian-installer; nothing else may).
    for value in (conf.suite, conf.arch, *conf.extra_pkgs, *conf.components):
        assert ".." not in value and not set(value) & set(" \t\n;|&$`'\"\\<>*?")
    for value in (conf.suite, conf.arch, *conf.extra_pkgs):
        assert "/" not in value
    assert conf.partition_alignment > 0
    assert conf.hook_timeout is None or conf.hook_timeout > 0


HOSTNAME = st.from_regex(r"\A[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z][a-z0-9]{0,8}){0,2}\Z")


@hsettings(max_examples=300, deadline=None, database=None)
@given(text=st.text(alphabet=string.printable, max_size=400), old=HOSTNAME, new=HOSTNAME)
def test_rename_hosts_touches_only_lines_naming_the_instance(text, old, new):
    assume(names.short_hostname(old) != names.short_hostname(new))
    out = rename.rename_hosts(text, old, new)
    olds = {old, names.short_hostname(old)}
    before, after = text.splitlines(keepends=True), out.splitlines(keepends=True)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        fields = b.partition("#")[0].split()
        if len(fields) >= 2 and olds & set(fields[1:]):
            # The address stays, the old names are gone from the names.
            assert a.partition("#")[0].split()[0] == fields[0]
            assert not olds & set(a.partition("#")[0].split()[1:])
        else:
            assert a == b


# A small tree of directories and symlinks, some pointing out of the root,
# some looping, some absolute.
LINK_TARGETS = st.sampled_from(["/", "..", "../..", "/etc", "../../../etc", "a", "a/b",
                                "/a/../..", "l1", "l2", "/l1", ".", "b/../../..",
                                "/nonexistent/../../x"])
PATH_PARTS = st.sampled_from(["a", "b", "l1", "l2", "..", ".", "", "etc", "x"])


@hsettings(max_examples=300, deadline=None, database=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(links=st.dictionaries(st.sampled_from(["l1", "l2", "a/l3", "a/b/l4"]), LINK_TARGETS,
                             max_size=4),
       parts=st.lists(PATH_PARTS, min_size=1, max_size=8),
       absolute=st.booleans())
def test_target_paths_never_leave_the_root(tmp_path, links, parts, absolute):
    with tempfile.TemporaryDirectory(dir=tmp_path) as top:
        root = os.path.join(top, "root")
        os.makedirs(os.path.join(root, "a", "b"))
        for name, dest in links.items():
            os.symlink(dest, os.path.join(root, name))
        inner = ("/" if absolute else "") + "/".join(parts)
        for method in (Target(root).path, Target(root).path_nofollow):
            try:
                result = method(inner)
            except TargetPathError:
                continue
            real_root = os.path.realpath(root)
            assert os.path.commonpath([root, result]) == root
            # What the kernel resolves from there stays inside too (the last
            # component may be a link that path_nofollow keeps: its directory).
            follows = method == Target(root).path or result == root
            resolved = os.path.realpath(result if follows else os.path.dirname(result))
            assert os.path.commonpath([real_root, resolved]) == real_root, (inner, links)


@hsettings(max_examples=500, deadline=None, database=None)
@given(st.text(max_size=80))
def test_one_line_text_never_splits_and_agrees_with_the_line_check(text):
    line = names.one_line(text)
    assert names.line_break_problem(line) is None
    assert len(line.splitlines()) <= 1
    assert (line == text) == (names.line_break_problem(text) is None)
