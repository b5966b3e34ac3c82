"""The production path, for real: kpartx, device-mapper and LVM inside a node VM.

This kernel has no device-mapper; a Debian kernel under qemu has. One boot
of the node VM (tests/root/node_vm.py) runs every scenario of
tests/root/node_vm_scenarios.py in one go; each is a test here, failing
with what the scenario saw. The partition path each scenario's scripts
took (kpartx, or the offset loop device) and the timings are printed
after the run and checked below.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests.root import bootstrap_fixture, node_vm
from tests.root.node_vm_scenarios import MEASUREMENTS, SCENARIOS

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="boots an amd64 node under qemu-system-x86_64")

# The partition path each scenario must report.
EXPECTED_PATH = {
    "create_msdos_on_lv": "kpartx",
    "create_gpt_on_lv": "kpartx",
    "refuse_mounted_lv": "refused",
    "refuse_lv_with_holder": "refused",
    "refuse_foreign_kpartx_mapping": "refused",
    "sigterm_during_create_on_lv": "kpartx",
    "sigkill_during_create_on_lv": "kpartx",
    "create_grub_on_lv": "kpartx",
    "export_import_rename_on_lvs": "kpartx/kpartx/kpartx",
    "create_msdos_on_lv_without_kpartx": "offset loop device",
    "export_on_lv_without_kpartx": "offset loop device",
    "export_on_lv_loop_direct_io": "offset loop device",
    "compare_create_paths_on_lv": "kpartx/offset loop device/offset loop device",
}


@pytest.fixture(scope="module")
def node_run(request, tmp_path_factory) -> node_vm.NodeRun:
    localstatedir = (os.environ.get(bootstrap_fixture.ENVIRONMENT_VARIABLE)
                     or bootstrap_fixture._built.get("path")
                     or str(tmp_path_factory.mktemp("node-localstatedir")))
    os.makedirs(localstatedir, exist_ok=True)
    run = node_vm.run_node_vm(localstatedir, tmp_path_factory.mktemp("node-vm"),
                              measure=os.environ.get(node_vm.MEASURE_VARIABLE) == "1")
    # Shown whatever the capture and -r options: each scenario's partition
    # path and time are what this module reports.
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with (capture.global_and_fixture_disabled() if capture is not None
              else contextlib.nullcontext()):
            for line in node_vm.summary(run).splitlines():
                reporter.write_line(line)
    return run


def test_every_scenario_is_known_here():
    assert set(EXPECTED_PATH) == {name for name, _ in SCENARIOS + MEASUREMENTS}


def test_node_vm_sets_up_lvm_and_reports_every_scenario(node_run):
    assert "setup" in node_run.results, node_run.output[-3000:]
    assert node_run.results["setup"].ok, node_run.results["setup"].detail
    missing = [name for name, _ in SCENARIOS if name not in node_run.results]
    assert not missing, f"no result for {missing}; output:\n{node_run.output[-3000:]}"


@pytest.mark.parametrize("name", [name for name, _ in SCENARIOS])
def test_scenario(node_run, name):
    _check(node_run, name)


def test_measurements_when_asked(node_run):
    """With GIDB_NODE_VM_MEASURE=1 the measurements ran and passed; else none ran."""
    names = [name for name, _ in MEASUREMENTS]
    if os.environ.get(node_vm.MEASURE_VARIABLE) != "1":
        assert not set(names) & set(node_run.results)
        return
    for name in names:
        _check(node_run, name)


def _check(node_run, name):
    result = node_run.results.get(name)
    assert result is not None, f"no result; output:\n{node_run.output[-3000:]}"
    assert result.ok, result.detail
    assert result.path == EXPECTED_PATH[name]
