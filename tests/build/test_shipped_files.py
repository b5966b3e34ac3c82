"""The files shipped beside the code agree with it (no build needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ganeti_debootstrap import environment, osparams, settings
from ganeti_debootstrap.paths import Paths

from .conftest import GANETI_PATH, ROOT

SCRIPTS = ("create", "import", "export", "rename", "verify")
DOCUMENTED = re.compile(r'^# ([A-Z_]+)="([^"]*)"$', re.MULTILINE)


def test_parameters_list_matches_the_declared_os_parameters() -> None:
    assert (ROOT / "parameters.list").read_text() == osparams.parameters_list()


def test_ganeti_api_version_lists_the_supported_versions_newest_first() -> None:
    shipped = (ROOT / "ganeti_api_version").read_text()
    assert shipped == "".join(f"{v}\n" for v in environment.API_VERSIONS)
    assert shipped == "20\n15\n10\n5\n"


def test_variants_list_publishes_only_default_which_has_a_conf_file() -> None:
    assert settings.read_variants_list(str(ROOT / "variants.list")) == ["default"]
    assert (ROOT / "variants" / "default.conf").is_file()


def test_variant_conffiles_are_byte_for_byte_the_shell_edition_ones() -> None:
    # Debian's 0.16-8 ships "default\n" and an empty default.conf as
    # conffiles: with the same content, dpkg keeps a site's edited copies on
    # upgrade without asking (a changed shipped file would mean a prompt).
    assert (ROOT / "variants.list").read_bytes() == b"default\n"
    assert (ROOT / "variants" / "default.conf").read_bytes() == b""


def test_defaults_file_documents_every_setting_once() -> None:
    text = (ROOT / "defaults").read_text()
    documented = [name for name, _ in DOCUMENTED.findall(text)]
    assert sorted(documented) == sorted(settings.NAMES)


def test_defaults_file_sets_nothing_as_shipped() -> None:
    lines = (ROOT / "defaults").read_text().splitlines()
    assert all(ln.startswith("#") or not ln.strip() for ln in lines)


@pytest.fixture
def config_tree(tmp_path: Path) -> Paths:
    """A sysconfdir and OS dir in tmp_path with the shipped variant files."""
    paths = Paths(str(tmp_path / "etc"), str(tmp_path / "var"), str(tmp_path / "os"))
    Path(paths.default_variants_dir).mkdir(parents=True)
    Path(paths.defaults_file).parent.mkdir(parents=True)
    Path(paths.os_dir).mkdir()
    shutil.copy(ROOT / "variants.list", paths.variants_list)
    shutil.copy(ROOT / "variants" / "default.conf", paths.default_variants_dir)
    return paths


@pytest.mark.parametrize("api_version", [20, 5])
def test_shipped_defaults_file_gives_the_built_in_settings(
        config_tree: Paths, api_version: int) -> None:
    built_in = settings.load(config_tree, "", api_version)
    shutil.copy(ROOT / "defaults", config_tree.defaults_file)
    assert settings.load(config_tree, "", api_version) == built_in


@pytest.mark.parametrize("api_version", [20, 5])
def test_documented_values_are_the_built_in_defaults(
        config_tree: Paths, api_version: int) -> None:
    # Uncommenting every documented line must change nothing either; the
    # documented paths are those of a sysconfdir of /etc.
    built_in = settings.load(config_tree, "", api_version)
    text = DOCUMENTED.sub(r'\1="\2"', (ROOT / "defaults").read_text())
    text = text.replace('="/etc/', f'="{config_tree.sysconfdir}/')
    Path(config_tree.defaults_file).write_text(text)
    assert settings.load(config_tree, "", api_version) == built_in


def test_entry_point_templates_are_isolated_and_pass_their_own_name() -> None:
    for script in SCRIPTS:
        text = (ROOT / f"{script}.in").read_text()
        assert text.startswith("#!@PYTHON@ -I\n"), script
        assert "os.path.dirname(os.path.realpath(__file__))" in text, script
        assert f'sys.exit(cli.main("{script}", common, __file__))' in text, script


def test_common_py_template_defines_only_the_configured_values() -> None:
    namespace: dict[str, object] = {}
    exec((ROOT / "common.py.in").read_text(), namespace)
    assert {k: v for k, v in namespace.items() if not k.startswith("__")} == {
        "SYSCONFDIR": "@sysconfdir@", "LOCALSTATEDIR": "@localstatedir@",
        "OS_DIR": "@osdir@", "VERSION": "@VERSION@"}


def substitute(template: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    return template


def test_entry_point_runs_verify_from_a_hand_made_os_dir(tmp_path: Path) -> None:
    # What make generates, without make: the template's own logic works.
    os_dir = tmp_path / "debootstrap"
    os_dir.mkdir()
    values = {"PYTHON": sys.executable, "sysconfdir": str(tmp_path / "etc"),
              "localstatedir": str(tmp_path / "var"), "osdir": str(os_dir),
              "VERSION": "0"}
    verify = os_dir / "verify"
    verify.write_text(substitute((ROOT / "verify.in").read_text(), values))
    verify.chmod(0o755)
    (os_dir / "common.py").write_text(substitute((ROOT / "common.py.in").read_text(),
                                                 values))
    shutil.copytree(ROOT / "ganeti_debootstrap", os_dir / "ganeti_debootstrap",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": GANETI_PATH, "OS_API_VERSION": "20", "PYTHONDONTWRITEBYTECODE": "1"}
    good = subprocess.run(["./verify", "parameters"], cwd=os_dir, capture_output=True,
                          text=True, env={**env, "OSP_FILESYSTEM": "ext4"})
    bad = subprocess.run(["./verify", "parameters"], cwd=os_dir, capture_output=True,
                         text=True, env={**env, "OSP_FILESYSTEM": "zfs"})
    assert good.returncode == 0, good.stderr
    assert bad.returncode == 1
    assert "zfs" in bad.stderr.rstrip().splitlines()[-1]
