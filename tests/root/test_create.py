"""create, run as Ganeti runs it, on real sparse disks with the session's cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from ganeti_debootstrap import filesystems
from tests.root import bootstrap_fixture, scripts
from tests.root.scripts import create_env, mounted_root, read, root_device, run_script


def check_instance(disk_path: str, name: str, fstype: str) -> str:
    """Assert what every created instance holds; returns the root UUID."""
    with root_device(disk_path) as dev:
        assert scripts.blkid(dev, "TYPE") == fstype
        uuid = scripts.blkid(dev, "UUID")
        scripts.assert_fs_clean(dev, fstype)
    with mounted_root(disk_path) as root:
        assert read(root, "/etc/hostname") == name + "\n"
        assert read(root, "/etc/mailname") == name + "\n"
        fstab = read(root, "/etc/fstab")
        root_lines = [ln.split() for ln in fstab.splitlines()
                      if ln.split()[1:2] == ["/"]]
        options, fsck_pass = (("errors=remount-ro", "1") if fstype.startswith("ext")
                              else ("defaults", "0"))
        assert root_lines == [[f"UUID={uuid}", "/", fstype, options, "0", fsck_pass]]
        hosts = read(root, "/etc/hosts")
        assert "127.0.0.1" in hosts and name in hosts
        shadow = read(root, "/etc/shadow").splitlines()
        assert [ln for ln in shadow if ln.startswith("root:")][0].startswith("root::")
        assert read(root, "/etc/machine-id") == ""
        assert not [f for f in os.listdir(os.path.join(root, "var/cache/apt/archives"))
                    if f.endswith(".deb")]
        assert os.path.exists(os.path.join(root, "usr/bin/dpkg"))
        assert "VERSION_CODENAME=trixie" in read(root, "/etc/os-release")
    return uuid


@pytest.mark.parametrize("style", ["msdos", "gpt", "none"])
@pytest.mark.parametrize("fstype", filesystems.ROOT_TYPES)
def test_create_makes_a_configured_instance(tree, disk, style, fstype):
    tree.settings(f'PARTITION_STYLE="{style}"\n')
    res = run_script(tree, "create", create_env("web1.example.org", disk,
                                                OSP_FILESYSTEM=fstype))
    check_instance(disk, "web1.example.org", fstype)
    table = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True)
    if style == "none":
        assert table.returncode != 0 or not table.stdout.strip()
    else:
        assert f'"label":"{"dos" if style == "msdos" else "gpt"}"' in table.stdout.replace(" ", "")
        assert '"start":2048' in table.stdout.replace(" ", "")
    # One line per phase with its duration at the default debug level.
    log = res.stderr.decode()
    for phase in ("partition", "make filesystems", "configure instance"):
        assert f"{phase}: done in" in log
    assert "install system: done in" in log or "copy filesystem image: done in" in log


def test_serial_console_gets_a_getty_on_systemd(tree, disk):
    run_script(tree, "create", create_env("con1", disk, INSTANCE_HV_serial_console="True"))
    with mounted_root(disk) as root:
        wants = os.path.join(root, "etc/systemd/system/getty.target.wants")
        assert "serial-getty@ttyS0.service" in os.listdir(wants)
        link = os.readlink(os.path.join(wants, "serial-getty@ttyS0.service"))
        assert os.path.exists(os.path.join(root, link.lstrip("/")))


def test_no_serial_getty_without_serial_console(tree, disk):
    run_script(tree, "create", create_env("con0", disk, INSTANCE_HV_serial_console="False"))
    with mounted_root(disk) as root:
        wants = os.path.join(root, "etc/systemd/system/getty.target.wants")
        assert not [f for f in (os.listdir(wants) if os.path.isdir(wants) else [])
                    if f.startswith("serial-getty@")]


def test_debug_level_logs_every_command(tree, disk):
    res = run_script(tree, "create", create_env("dbg1", disk, DEBUG_LEVEL="1"))
    log = res.stderr.decode()
    assert "running: sfdisk" in log and "running: losetup" in log


def test_hooks_run_in_order_with_target_and_api_filesystems(tree, disk):
    tree.hook("10-first", 'echo "$INSTANCE_NAME $SUITE $PARTITION_STYLE $FSYSDEV" '
                          '> "$TARGET/root/hook-env"\n'
                          'test -e "$TARGET/proc/self" && echo proc >> "$TARGET/root/hook-env"\n'
                          'echo first >> "$TARGET/root/hook-order"\n')
    tree.hook("20-second", 'echo second >> "$TARGET/root/hook-order"\n'
                           'chroot "$TARGET" dpkg-query -W dpkg > "$TARGET/root/chroot-ok"\n')
    tree.hook("30-ignored.sh", 'echo never >> "$TARGET/root/hook-order"\n')
    run_script(tree, "create", create_env("hooked", disk))
    with mounted_root(disk) as root:
        assert read(root, "/root/hook-order") == "first\nsecond\n"
        env_line, proc_line = read(root, "/root/hook-env").splitlines()
        name, suite, style, fsysdev = env_line.split()
        assert (name, suite, style) == ("hooked", "trixie", "msdos")
        assert fsysdev.startswith("/dev/")
        assert proc_line == "proc"
        assert read(root, "/root/chroot-ok").startswith("dpkg")
        assert not os.path.exists(os.path.join(root, "usr/sbin/policy-rc.d"))


def test_failing_hook_fails_create_naming_it_and_releases_everything(tree, disk):
    tree.hook("10-mount-and-fail", 'mount -t tmpfs none "$TARGET/mnt"\nexit 7\n')
    res = run_script(tree, "create", create_env("fails", disk), check=False)
    assert res.returncode != 0
    last = res.stderr.decode().strip().splitlines()[-6:]
    assert any("10-mount-and-fail" in ln for ln in last)
    assert any("7" in ln for ln in last)
    # (the no_leaks fixture asserts no mount or loop device is left)


def test_disk_under_512_mib_is_refused_with_both_sizes(tree, tmp_path):
    small = scripts.sparse_disk(str(tmp_path), 300, "small.img")
    res = run_script(tree, "create", create_env("small", small), check=False)
    assert res.returncode != 0
    tail = res.stderr.decode().strip().splitlines()[-1]
    assert "300" in tail and "512" in tail


def test_missing_disk_is_refused(tree, tmp_path):
    res = run_script(tree, "create", create_env("nodisk", str(tmp_path / "absent.img")),
                     check=False)
    assert res.returncode != 0
    assert "absent.img" in res.stderr.decode().strip().splitlines()[-1]


def test_reinstall_starts_from_scratch(tree, disk):
    run_script(tree, "create", create_env("re1", disk))
    with mounted_root(disk, read_only=False) as root:
        with open(os.path.join(root, "root/old-data"), "w") as f:
            f.write("x")
    uuid_before = check_instance(disk, "re1", "ext4")
    run_script(tree, "create", create_env("re1", disk, INSTANCE_REINSTALL="1"))
    uuid_after = check_instance(disk, "re1", "ext4")
    assert uuid_after != uuid_before
    with mounted_root(disk) as root:
        assert not os.path.exists(os.path.join(root, "root/old-data"))


def test_api5_create_uses_options_whole_disk_and_swap(tree, tmp_path):
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    swap = scripts.sparse_disk(str(tmp_path), 128, "swap.img")
    env = scripts.ganeti_env()
    del env["OS_API_VERSION"]
    run_script(tree, "create", env, args=("-i", "old1.example.org", "-b", disk, "-s", swap))
    swap_uuid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", swap],
                               capture_output=True, text=True).stdout.strip()
    assert swap_uuid
    # API 5 means no partition table: the filesystem is on the whole disk.
    assert subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", disk],
                          capture_output=True, text=True).stdout.strip() == "ext4"
    with mounted_root(disk) as root:
        assert f"UUID={swap_uuid}" in read(root, "/etc/fstab")
        assert read(root, "/etc/hostname") == "old1.example.org\n"


def test_two_concurrent_creates_share_the_cache(tree, tmp_path):
    disks = [scripts.sparse_disk(str(tmp_path), 1024, f"c{i}.img") for i in range(2)]
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    def one(i: int) -> None:
        results[i] = run_script(tree, "create", create_env(f"par{i}", disks[i]), check=False)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert results[i].returncode == 0, results[i].stderr.decode()[-2000:]
        check_instance(disks[i], f"par{i}", "ext4")


def closed_port_proxy() -> str:
    """A proxy URL on loopback where nothing listens: downloads fail at once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_changed_extra_pkgs_do_not_reuse_the_cache(tree, disk):
    # The proxy is not part of the cache key; pointing it at a closed port
    # makes any bootstrap fail fast, proving the old cache was not used.
    tree.settings(f'EXTRA_PKGS="openssh-server"\nPROXY="{closed_port_proxy()}"\n')
    res = run_script(tree, "create", create_env("newkey", disk), check=False)
    assert res.returncode != 0
    assert "No cache for" in res.stderr.decode()
    assert "Unpacking the cache" not in res.stderr.decode()


def test_damaged_cache_is_detected_and_never_unpacked(tree, disk, tmp_path):
    own = str(tmp_path / "var")
    shutil.copytree(tree.localstatedir, own)
    damaged = scripts.OSTree(tree.sysconfdir, own, tree.os_dir)
    # The default settings' archive: the shared directory holds others too.
    archive = bootstrap_fixture.default_key().stem + ".tar"
    path = os.path.join(damaged.cache_dir, archive)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    damaged.settings(f'PROXY="{closed_port_proxy()}"\n')
    res = run_script(damaged, "create", create_env("dmg", disk), check=False)
    assert res.returncode != 0
    assert "Unpacking the cache" not in res.stderr.decode()
    assert not os.path.exists(path), "the damaged archive must be removed"


def test_generate_cache_no_bootstraps_and_leaves_the_cache_alone(tree, disk):
    # As in the shell edition, "no" means every create bootstraps; a proxy
    # on a closed port makes that bootstrap fail at once.
    tree.settings(f'GENERATE_CACHE="no"\nPROXY="{closed_port_proxy()}"\n')
    before = sorted(os.listdir(tree.cache_dir))
    res = run_script(tree, "create", create_env("nocache", disk), check=False)
    assert res.returncode != 0
    log = res.stderr.decode()
    assert "Unpacking the cache" not in log and "cache image" not in log
    assert sorted(os.listdir(tree.cache_dir)) == before


@pytest.mark.parametrize("image", ["yes", "no"])
def test_reinstall_without_partition_table_erases_the_old_table(tree, disk, image):
    # A GPT keeps a backup header at the end of the disk, where neither the
    # new filesystem nor its image write.
    tree.settings(f'PARTITION_STYLE="gpt"\nCACHE_IMAGE="{image}"\n')
    run_script(tree, "create", create_env("pt1", disk))
    tree.settings(f'PARTITION_STYLE="none"\nCACHE_IMAGE="{image}"\n')
    run_script(tree, "create", create_env("pt1", disk, INSTANCE_REINSTALL="1"))
    probe = subprocess.run(["blkid", "-p", "-o", "export", disk], capture_output=True,
                           text=True).stdout
    assert "TYPE=ext4" in probe and "PTTYPE" not in probe
    assert subprocess.run(["sfdisk", "--json", disk], capture_output=True).returncode != 0
