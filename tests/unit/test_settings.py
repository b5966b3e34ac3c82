"""Settings and variants are read as the shell edition read them: with /bin/sh."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from ganeti_debootstrap import settings
from ganeti_debootstrap.errors import ConfigError
from ganeti_debootstrap.paths import Paths
from tests.scratch import make_paths

# settings.load sources the settings files with /bin/sh, a real program.
pytestmark = pytest.mark.real_commands


@pytest.fixture
def tree(tmp_path):
    return make_paths(tmp_path, defaults=None, localstatedir=False,
                      variants_list="# published variants\n\ndefault\n")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_missing_defaults_file_gives_built_in_defaults(tree):
    s = settings.load(tree, "", 20)
    assert s.suite == settings.DEFAULT_SUITE
    assert s.partition_style == "msdos" and s.partition_alignment == 2048
    assert s.generate_cache and s.clean_cache_days == 14
    assert s.customize_dir == tree.default_hooks_dir
    assert s.variant == "default"


def test_api5_defaults_to_no_partition_table(tree):
    assert settings.load(tree, "", 5).partition_style == "none"


def test_variant_appends_to_defaults_with_shell_expansion(tree):
    write(tree.defaults_file, 'EXTRA_PKGS="vim,less"\n')
    write(os.path.join(tree.default_variants_dir, "ssh.conf"),
          'EXTRA_PKGS="$EXTRA_PKGS,openssh-server"\nSUITE=bookworm\n')
    write(tree.variants_list, "default\nssh\n")
    s = settings.load(tree, "ssh", 20)
    assert s.extra_pkgs == ("vim", "less", "openssh-server")
    assert s.suite == "bookworm"
    assert s.variant == "ssh"


def test_variant_sees_built_in_defaults_like_the_shell_edition(tree):
    write(os.path.join(tree.default_variants_dir, "default.conf"),
          'SUITE="$SUITE-backports-not-really"\n')
    suite = settings.load(tree, "default", 20).suite
    assert suite == settings.DEFAULT_SUITE + "-backports-not-really"


def test_variants_dir_from_defaults_file_is_used(tree, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    write(str(other / "default.conf"), "SUITE=bookworm\n")
    write(tree.defaults_file, f'VARIANTS_DIR="{other}"\n')
    assert settings.load(tree, "default", 20).suite == "bookworm"


def test_empty_clean_cache_means_never(tree):
    write(tree.defaults_file, 'CLEAN_CACHE=""\n')
    assert settings.load(tree, "", 20).clean_cache_days is None


def test_file_output_does_not_become_a_value(tree):
    write(tree.defaults_file, 'echo SUITE; printf "SUITE\\0x\\0"\nSUITE=bookworm\n')
    assert settings.load(tree, "", 20).suite == "bookworm"


def test_node_environment_does_not_leak_into_settings(tree, monkeypatch):
    monkeypatch.setenv("SUITE", "sid")
    monkeypatch.setenv("MIRROR", "http://leak.invalid/")
    s = settings.load(tree, "", 20)
    assert s.suite == settings.DEFAULT_SUITE and s.mirror == ""


def test_syntax_error_names_the_file_and_line(tree):
    write(tree.defaults_file, 'SUITE=bookworm\nif then\n')
    with pytest.raises(ConfigError) as err:
        settings.load(tree, "", 20)
    assert tree.defaults_file in str(err.value) and "2" in str(err.value)


def test_published_variant_without_conf_is_a_configuration_error(tree):
    write(tree.variants_list, "default\nghost\n")
    with pytest.raises(ConfigError, match="published.*ghost.conf is missing"):
        settings.load(tree, "ghost", 20)


def test_unknown_variant_is_unsupported(tree):
    with pytest.raises(ConfigError, match="'nope' is not supported"):
        settings.load(tree, "nope", 20)


def test_configured_but_unlisted_variant_is_accepted(tree):
    write(os.path.join(tree.default_variants_dir, "extra.conf"), "SUITE=bookworm\n")
    assert settings.load(tree, "extra", 20).suite == "bookworm"


@pytest.mark.parametrize("name", ["../default", "a/b", ".hidden", "x y", "-x"])
def test_variant_names_with_path_parts_are_refused(tree, name):
    with pytest.raises(ConfigError, match="not a plain name"):
        settings.load(tree, name, 20)


@pytest.mark.parametrize("line, setting", [
    ("PARTITION_STYLE=mbr", "PARTITION_STYLE"),
    ("PARTITION_ALIGNMENT=0", "PARTITION_ALIGNMENT"),
    ("PARTITION_ALIGNMENT=-8", "PARTITION_ALIGNMENT"),
    ("PARTITION_ALIGNMENT=1MiB", "PARTITION_ALIGNMENT"),
    ("GENERATE_CACHE=maybe", "GENERATE_CACHE"),
    ("CLEAN_CACHE=soon", "CLEAN_CACHE"),
    ("ARCH=AMD64", "ARCH"),
    ("ARCH='amd64;rm'", "ARCH"),
    ("SUITE='../../etc'", "SUITE"),
    ("MIRROR=ftp.example.org/debian", "MIRROR"),
    ("PROXY=proxy:3128", "PROXY"),
    ("EXTRA_PKGS='vim,--foo'", "EXTRA_PKGS"),
    ("COMPONENTS='main,../x'", "COMPONENTS"),
    ("BOOTSTRAP_TOOL=cdebootstrap", "BOOTSTRAP_TOOL"),
    ("CUSTOMIZE_DIR=hooks", "CUSTOMIZE_DIR"),
])
def test_bad_values_name_the_setting_and_file(tree, line, setting):
    write(tree.defaults_file, line + "\n")
    with pytest.raises(ConfigError) as err:
        settings.load(tree, "", 20)
    assert setting in str(err.value) and tree.defaults_file in str(err.value)


def test_all_bad_values_are_reported_together(tree):
    write(tree.defaults_file, "PARTITION_STYLE=mbr\nGENERATE_CACHE=maybe\n")
    with pytest.raises(ConfigError) as err:
        settings.load(tree, "", 20)
    assert "PARTITION_STYLE" in str(err.value) and "GENERATE_CACHE" in str(err.value)


def test_lists_drop_empty_items(tree):
    write(tree.defaults_file, 'EXTRA_PKGS=",vim,,less,"\nCOMPONENTS="main contrib"\n')
    s = settings.load(tree, "", 20)
    assert s.extra_pkgs == ("vim", "less") and s.components == ("main", "contrib")


# --- the table of settings ----------------------------------------------------------

SOURCE_TREE = Path(__file__).resolve().parents[2]
DOCUMENTED = re.compile(r'^# ([A-Z_]+)="([^"]*)"$', re.MULTILINE)


def readme_settings() -> list[str]:
    """The names in the README's table of settings (| setting | meaning | default |)."""
    text = (SOURCE_TREE / "README.md").read_text()
    table = text.split("| setting | meaning | default |\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE)


def test_every_field_but_the_variant_and_its_files_is_a_declared_setting():
    declared = [s.dest for s in settings.SETTINGS]
    fields = [f.name for f in dataclasses.fields(settings.Settings)]
    assert declared + ["variant", "sources"] == fields
    assert len(set(settings.NAMES)) == len(settings.NAMES) == len(declared)
    for spec in settings.SETTINGS:
        assert spec.help and "\n" not in spec.help, spec.name


def test_the_readme_lists_every_setting_and_no_other():
    assert sorted(readme_settings()) == sorted(settings.NAMES)


def test_the_shipped_defaults_file_shows_each_setting_with_its_default():
    text = (SOURCE_TREE / "defaults").read_text()
    documented = dict(DOCUMENTED.findall(text))
    assert sorted(documented) == sorted(settings.NAMES)
    # As installed with sysconfdir /etc (the paths the file shows).
    paths = Paths("/etc", "/var", "/usr/share/ganeti/os/debootstrap")
    for spec in settings.SETTINGS:
        default = spec.default
        if callable(spec.shell_default):
            default = spec.shell_default(paths)
        if spec.api5_default is not None:
            # Documented empty: the default then depends on the OS API.
            default = ""
        assert documented[spec.name] == default, spec.name


def test_settings_built_in_are_the_defaults_of_the_table():
    assert settings.validate({}, [], 20) == settings.Settings()
    for spec in settings.SETTINGS:
        empty = settings.validate({spec.name: ""}, ["f"], 20)
        if not spec.empty_is_value:
            assert getattr(empty, spec.dest) == getattr(settings.Settings(), spec.dest)


@pytest.mark.parametrize("name", ["PARTITION_STYLE", "BOOTLOADER", "BOOTSTRAP_TOOL"])
def test_a_choice_accepts_exactly_the_values_of_its_type(name):
    spec = settings.BY_NAME[name]
    choices = get_args(get_type_hints(settings.Settings)[spec.dest])
    for value in choices:
        assert getattr(settings.validate({name: value}, ["f"], 20), spec.dest) == value
    with pytest.raises(ConfigError, match=f"{name} .*'x' must be one of {', '.join(choices)}$"):
        settings.validate({name: "x"}, ["f"], 20)


def test_the_settings_files_are_read_through_the_runner(tree, fake_runner):
    fake_runner.expect(*settings.SHELL_COMMAND, real=True)
    write(tree.defaults_file, "SUITE=bookworm\n")
    assert settings.load(tree, "default", 20).suite == "bookworm"
    conf = os.path.join(tree.default_variants_dir, "default.conf")
    assert [call[len(settings.SHELL_COMMAND) + 1:] for call in fake_runner.calls] == [
        ("settings", tree.defaults_file), ("settings", tree.defaults_file, conf)]
    assert all(env is None for env in fake_runner.envs)
