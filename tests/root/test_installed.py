"""The installed create, run the way Ganeti runs it, for each partition style.

``make install`` into a scratch prefix (its sysconfdir scratch too, the
session's warm cache as localstatedir); then ``create`` from the installed
OS directory with Ganeti's clean environment (``env -i``, Ganeti's PATH,
umask 077, cwd the OS directory) on a 1 GiB sparse file. The filesystem it
makes must mount and hold the configured instance.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.root import scripts
from tests.root.ganeti_cluster import install_os_definition
from tests.root.scripts import mounted_root, read, root_device

SOURCE = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, bootstrapped_localstatedir) -> Path:
    return install_os_definition(SOURCE, tmp_path_factory.mktemp("installed"),
                                 Path(bootstrapped_localstatedir))


@pytest.mark.parametrize("style", ["msdos", "gpt", "none"])
def test_installed_create_makes_a_mountable_configured_instance(installed, tmp_path, style):
    settings = installed.parent.parent / "etc" / "default" / "ganeti-instance-debootstrap"
    original = settings.read_text()
    settings.write_text(original + f'\nPARTITION_STYLE="{style}"\n')
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    try:
        proc = subprocess.run(
            ["env", "-i", "PATH=/sbin:/bin:/usr/sbin:/usr/bin", "OS_API_VERSION=20",
             "OS_NAME=debootstrap", "OS_VARIANT=default", "DEBUG_LEVEL=0",
             "INSTANCE_NAME=inst1.example.org", "HYPERVISOR=kvm", "DISK_COUNT=1",
             f"DISK_0_PATH={disk}", "DISK_0_SIZE=1024", "NIC_COUNT=0",
             "OSP_FILESYSTEM=ext4", "./create"],
            cwd=installed, capture_output=True, text=True, timeout=600,
            preexec_fn=lambda: os.umask(0o077))
    finally:
        settings.write_text(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "created on" in proc.stderr.strip().splitlines()[-1]
    with root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    with mounted_root(disk) as root:
        assert read(root, "/etc/hostname") == "inst1.example.org\n"
        assert f"UUID={uuid} / ext4" in " ".join(read(root, "/etc/fstab").split())
        assert os.path.exists(os.path.join(root, "usr/bin/dpkg"))
