"""The declared OS parameters and their validation."""

from __future__ import annotations

import pytest

import dataclasses

from ganeti_debootstrap import filesystems, osparams, settings
from ganeti_debootstrap.errors import ConfigError, DefinitionError


def test_filesystem_left_empty_leaves_the_choice_to_the_setting():
    assert osparams.validate({}).filesystem == ""
    assert osparams.validate({"filesystem": ""}).filesystem == ""


@pytest.mark.parametrize("fs", ["ext2", "ext3", "ext4", "xfs", "btrfs"])
def test_each_root_filesystem_is_accepted(fs):
    assert osparams.validate({"filesystem": fs}).filesystem == fs


def test_bad_filesystem_lists_the_choices():
    with pytest.raises(ConfigError, match="filesystem='zfs'.*ext4, ext3, ext2, xfs, btrfs"
                                          ".*-O filesystem=ext4 "):
        osparams.validate({"filesystem": "zfs"})


def test_undeclared_parameter_is_refused():
    with pytest.raises(ConfigError, match="'colour'.*known: .*filesystem"):
        osparams.validate({"colour": "blue"})


def test_parameters_list_has_one_line_per_parameter():
    lines = osparams.parameters_list().splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == [p.name for p in osparams.PARAMETERS]


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\u2028"])
def test_a_line_break_in_a_parameter_name_or_value_is_refused_naming_it(char):
    with pytest.raises(ConfigError, match=r"OS parameter network=.* \(OSP_NETWORK\) contains"):
        osparams.validate({"network": "auto" + char + "x"})
    with pytest.raises(ConfigError, match=r"the name of the OS parameter 'net.*' contains"):
        osparams.validate({"net" + char + "work": "auto"})


def test_every_field_of_the_parameters_is_a_declared_parameter():
    assert [p.name for p in osparams.PARAMETERS] == [
        f.name for f in dataclasses.fields(osparams.OSParams)]
    defaults = osparams.OSParams()
    for p in osparams.PARAMETERS:
        assert getattr(defaults, p.name) == p.default
        assert p.default == "" or p.default in p.choices or p.check is not None


def test_choices_shared_with_the_settings_and_the_filesystems_are_the_same_lists():
    known = {p.name: p for p in osparams.PARAMETERS}
    assert known["filesystem"].choices == filesystems.ROOT_TYPES
    assert known["filesystem"].default == ""
    assert settings.Settings().filesystem == "ext4"
    assert known["bootloader"].choices == settings.BOOTLOADERS


def test_parameters_needing_a_package_are_refused_without_it():
    with pytest.raises(DefinitionError, match="admin_user=admin .*sudo"):
        osparams.check_packages(osparams.validate({"admin_user": "admin"}), ("vim",))
    with pytest.raises(DefinitionError, match="cloud_init=nocloud .*cloud-init"):
        osparams.check_packages(osparams.validate({"cloud_init": "nocloud"}), ("sudo",))
    osparams.check_packages(osparams.validate({"admin_user": "admin", "cloud_init": "nocloud"}),
                            ("sudo", "cloud-init"))
    osparams.check_packages(osparams.validate({}), ())
