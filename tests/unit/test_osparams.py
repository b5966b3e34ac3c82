"""The declared OS parameters and their validation."""

from __future__ import annotations

import pytest

from ganeti_debootstrap import osparams
from ganeti_debootstrap.errors import ConfigError


def test_filesystem_defaults_to_ext4():
    assert osparams.validate({}).filesystem == "ext4"
    assert osparams.validate({"filesystem": ""}).filesystem == "ext4"


@pytest.mark.parametrize("fs", ["ext2", "ext3", "ext4"])
def test_each_ext_filesystem_is_accepted(fs):
    assert osparams.validate({"filesystem": fs}).filesystem == fs


def test_bad_filesystem_lists_the_choices():
    with pytest.raises(ConfigError, match="filesystem='xfs'.*ext4, ext3, ext2"):
        osparams.validate({"filesystem": "xfs"})


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
