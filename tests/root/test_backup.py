"""export, import and rename, run as Ganeti runs them, on real disks.

Sites hold years of backups made by the shell edition's export (a level-0
dump of the root filesystem): what we export must restore with plain
restore(8), and what they hold must import here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile

import pytest

from tests.root import scripts
from tests.root.scripts import (create_env, ganeti_env, mounted_root, read, root_device,
                                run_script)
from tests.root.backupio import (CHANGED_BY_IMPORT, MTIME_CHANGED_BY_IMPORT, copy_tree_out,
                                 export_announcing, export_env, export_to_file,
                                 fstab_root_and_swap, import_from_file)
from tests.treecompare import differences

# An IMA hash attribute (IMA_XATTR_DIGEST_NG, SHA-256) of "measured\n".
IMA_HASH = b"\x04\x04" + hashlib.sha256(b"measured\n").digest()


@pytest.mark.parametrize("style,fstype", [("msdos", "ext4"), ("gpt", "ext3"),
                                          ("none", "ext2")])
def test_export_wipe_import_gives_back_the_same_tree(tree, tmp_path, style, fstype):
    tree.settings(f'PARTITION_STYLE="{style}"\n')
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    run_script(tree, "create", create_env("bk1.example.org", disk, OSP_FILESYSTEM=fstype))
    # Extra metadata the round trip must keep: a capability, an ACL, an xattr.
    with mounted_root(disk, read_only=False) as root:
        probe = os.path.join(root, "root/probe")
        with open(probe, "w") as f:
            f.write("probe\n")
        subprocess.run(["setcap", "cap_net_raw+ep", probe], check=True)
        subprocess.run(["setfacl", "-m", "u:1234:rw", probe], check=True)
        os.setxattr(probe, "user.site", b"kept")
        os.link(probe, os.path.join(root, "root/probe-link"))
        # Attributes only CAP_SYS_ADMIN sets: an overlayfs upper directory's
        # opaque marker (Docker's overlay2 inside the guest), an IMA hash.
        opaque = os.path.join(root, "root/upper/deleted-and-recreated")
        os.makedirs(opaque)
        os.setxattr(opaque, "trusted.overlay.opaque", b"y")
        measured = os.path.join(root, "root/measured")
        with open(measured, "w") as f:
            f.write("measured\n")
        os.setxattr(measured, "security.ima", IMA_HASH)
    before = str(tmp_path / "before")
    copy_tree_out(disk, before)

    stream = str(tmp_path / "backup.dump")
    export_to_file(tree, disk, stream, OSP_FILESYSTEM=fstype)
    with open(disk, "r+b") as f:  # wipe: a new, empty disk
        f.truncate(0)
        f.truncate(1024 * 2**20)
    import_from_file(tree, disk, stream, OSP_FILESYSTEM=fstype)

    after = str(tmp_path / "after")
    copy_tree_out(disk, after)
    assert differences(before, after, ignore=CHANGED_BY_IMPORT,
                       ignore_mtime=MTIME_CHANGED_BY_IMPORT) == []
    with root_device(disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
        assert scripts.blkid(dev, "TYPE") == fstype
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
    with mounted_root(disk) as root:
        assert [f"UUID={uuid}", "/"] == fstab_root_and_swap(root)[0][:2]
        assert not os.path.exists(os.path.join(root, "restoresymtable"))
        assert subprocess.run(["getcap", os.path.join(root, "root/probe")],
                              capture_output=True, text=True).stdout.split()[-1] == "cap_net_raw=ep"
        # (Also compared above; named here so that a loss reads plainly.)
        assert os.getxattr(os.path.join(root, "root/upper/deleted-and-recreated"),
                           "trusted.overlay.opaque") == b"y"
        assert os.getxattr(os.path.join(root, "root/measured"), "security.ima") == IMA_HASH


@pytest.fixture
def instance(tree, tmp_path):
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    run_script(tree, "create", create_env("bk1.example.org", disk))
    return disk


def test_export_writes_only_the_dump_to_stdout_and_the_size_to_exp_size_fd(
        tree, instance, tmp_path):
    stream = str(tmp_path / "s.dump")
    announced = export_announcing(tree, export_env(instance), stream)
    assert announced.endswith("\n")
    size = os.path.getsize(stream)
    assert abs(int(announced) - size) <= size * 0.10, (announced, size)
    # Plain restore(8) reads it: the stream is nothing but the dump.
    listing = subprocess.run(["restore", "-t", "-f", stream], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "./etc/hostname" in listing.stdout


def test_what_export_writes_is_restorable_by_plain_restore(tree, instance, tmp_path):
    stream = str(tmp_path / "s.dump")
    export_to_file(tree, instance, stream)
    target = str(tmp_path / "plain")
    os.makedirs(target)
    with open(stream, "rb") as inp:
        res = subprocess.run(["restore", "-r", "-y", "-f", "-"], stdin=inp, cwd=target,
                             capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert read(target, "/etc/hostname") == "bk1.example.org\n"


def test_export_piped_straight_into_plain_restore_gives_the_instance(tree, instance, tmp_path):
    """Export writes dump's default 10 KiB records, which every restore
    reading a pipe (as behind Ganeti's transfer) takes: restore 0.4b50
    refuses 64 KiB ones there ("Tape blocksize is too large")."""
    target = str(tmp_path / "piped")
    os.makedirs(target)
    export = subprocess.Popen(
        [scripts.PYTHON, scripts.LAUNCHER, tree.sysconfdir, tree.localstatedir,
         tree.os_dir, "export"], env=export_env(instance), cwd=tree.os_dir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    restore = subprocess.run(["restore", "-r", "-y", "-f", "-"], stdin=export.stdout,
                             cwd=target, capture_output=True, text=True)
    assert export.stdout is not None
    export.stdout.close()
    _, err = export.communicate()
    assert export.returncode == 0, err.decode()
    assert restore.returncode == 0, restore.stderr
    assert "End-of-input" not in restore.stderr
    assert read(target, "/etc/hostname") == "bk1.example.org\n"
    with mounted_root(instance) as root:
        assert (os.path.getsize(os.path.join(target, "usr/lib/x86_64-linux-gnu/libc.so.6"))
                == os.path.getsize(os.path.join(root, "usr/lib/x86_64-linux-gnu/libc.so.6")))
    # dump pads its last record: a stream of whole 10 KiB records.
    stream = str(tmp_path / "s.dump")
    export_to_file(tree, instance, stream)
    assert os.path.getsize(stream) % 10240 == 0


def test_shell_edition_stream_with_old_fstab_imports(tree, instance, tmp_path):
    # What the shell edition's export held: a dump -0 of a root whose fstab
    # names devices (/dev/sda1 root, /dev/sdb swap), made here by hand.
    with mounted_root(instance, read_only=False) as root:
        with open(os.path.join(root, "etc/fstab"), "w") as f:
            f.write("# /etc/fstab: static file system information.\n"
                    "/dev/sda1  /  ext3  defaults  0  1\n"
                    "/dev/sdb   swap swap defaults 0  0\n"
                    "proc       /proc proc defaults 0 0\n")
    stream = str(tmp_path / "old.dump")
    with root_device(instance) as dev, open(stream, "wb") as out:
        subprocess.run(["dump", "-0", "-q", "-f", "-", dev], stdout=out, check=True,
                       stderr=subprocess.DEVNULL)
    new_disk = scripts.sparse_disk(str(tmp_path), 1024, "new.img")
    import_from_file(tree, new_disk, stream)
    with root_device(new_disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    with mounted_root(new_disk) as root:
        fstab = read(root, "/etc/fstab")
        assert f"UUID={uuid} / ext4" in " ".join(fstab.split())
        assert "/dev/sda1" not in fstab
        assert "/dev/sdb" not in [ln.split()[0] for ln in fstab.splitlines()
                                  if ln.strip() and not ln.startswith("#")]
        assert "proc" in fstab  # lines that name neither root nor swap stay


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_stream_fails_the_import_clearly(tree, instance, tmp_path, damage):
    stream = str(tmp_path / "s.dump")
    export_to_file(tree, instance, stream)
    bad = str(tmp_path / "bad.dump")
    with open(stream, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        if damage == "truncated":
            f.write(data[: len(data) // 2])
        elif damage == "garbage":
            f.write(os.urandom(64 * 1024))
    new_disk = scripts.sparse_disk(str(tmp_path), 1024, "new.img")
    res = import_from_file(tree, new_disk, bad, check=False)
    assert res.returncode != 0
    tail = "\n".join(res.stderr.decode().strip().splitlines()[-8:])
    assert "ERROR: import failed" in tail
    assert ("truncated or damaged" in tail) or ("not a dump" in tail)


def test_export_refuses_a_disk_that_is_not_ours(tree, tmp_path):
    disk = scripts.sparse_disk(str(tmp_path), 1024)
    subprocess.run(["mkswap", disk], check=True, capture_output=True)
    out = str(tmp_path / "s.dump")
    with open(out, "wb") as f:
        res = run_script(tree, "export", export_env(disk), stdout=f.fileno(), check=False)
    assert res.returncode != 0
    assert os.path.getsize(out) == 0
    last = res.stderr.decode().strip().splitlines()[-1]
    assert "holds a swap filesystem" in last and "roots made by create can be used" in last


def test_export_refuses_a_filesystem_with_a_pending_journal(tree, instance, tmp_path):
    with root_device(instance, read_only=False) as dev:
        subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", dev],
                       check=True, capture_output=True)
    out = str(tmp_path / "s.dump")
    with open(out, "wb") as f:
        res = run_script(tree, "export", export_env(instance), stdout=f.fileno(), check=False)
    assert res.returncode != 0 and os.path.getsize(out) == 0
    assert "in use or was not cleanly unmounted" in res.stderr.decode()


def test_export_refuses_a_mounted_disk(tree, instance, tmp_path):
    with mounted_root(instance):
        out = str(tmp_path / "s.dump")
        with open(out, "wb") as f:
            res = run_script(tree, "export", export_env(instance), stdout=f.fileno(),
                             check=False)
    assert res.returncode != 0 and os.path.getsize(out) == 0


def rename_env(disk: str, old: str, new: str) -> dict[str, str]:
    return ganeti_env(INSTANCE_NAME=new, OLD_INSTANCE_NAME=old, DISK_COUNT="1",
                      DISK_0_PATH=disk)


def test_rename_changes_hostname_mailname_and_hosts(tree, instance):
    run_script(tree, "rename", rename_env(instance, "bk1.example.org", "bk2.example.org"))
    with mounted_root(instance) as root:
        assert read(root, "/etc/hostname") == "bk2.example.org\n"
        assert read(root, "/etc/mailname") == "bk2.example.org\n"
        hosts = read(root, "/etc/hosts")
        assert "bk2.example.org" in hosts and "bk1" not in hosts


def test_rename_refuses_a_wrong_old_name_and_changes_nothing(tree, instance):
    with tempfile.TemporaryDirectory() as _:
        res = run_script(tree, "rename", rename_env(instance, "other.example.org",
                                                    "bk2.example.org"), check=False)
    assert res.returncode != 0
    assert "not the old name 'other.example.org'" in res.stderr.decode()
    with mounted_root(instance) as root:
        assert read(root, "/etc/hostname") == "bk1.example.org\n"
        assert "bk1.example.org" in read(root, "/etc/hosts")


BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
# Where a tool of the instance would be found, by chroot or on a PATH into it.
TRAPPED = ("/usr/sbin/grub-install", "/usr/sbin/grub-probe", "/usr/sbin/grub-mkimage",
           "/usr/bin/grub-mkimage", "/usr/sbin/grub-bios-setup", "/usr/sbin/update-grub",
           "/usr/lib/grub/i386-pc/grub-bios-setup", "/usr/bin/debconf-set-selections",
           "/usr/bin/debconf-communicate", "/usr/bin/sh")


def _listing(path: str) -> list[tuple[str, int, int, bytes]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            with open(full, "rb") if os.path.isfile(full) else open(os.devnull, "rb") as f:
                found.append((full, st.st_mode, st.st_mtime_ns, f.read()))
    return found


@pytest.mark.parametrize("style", ["msdos", "gpt"])
def test_import_with_grub_runs_nothing_of_the_backup_and_writes_only_inside_it(
        tree, instance, tmp_path, style):
    markers = str(tmp_path / "markers")
    node_dir = str(tmp_path / "node-dir")  # /boot/grub points here
    os.makedirs(node_dir)
    with open(os.path.join(node_dir, "grub.cfg"), "w") as f:
        f.write("the node's\n")
    with mounted_root(instance, read_only=False) as root:
        # A trap where each tool would be: run on the node or in a chroot,
        # it leaves a mark (the same path, on the node or in the instance).
        for inner in TRAPPED:
            path = os.path.join(root, inner.lstrip("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.unlink(path)
            with open(path, "w") as f:
                f.write(f'#!/bin/dash\nmkdir -p {markers}\necho "$0" >> {markers}/ran\n')
            os.chmod(path, 0o755)
        # A kernel to boot (data: never run, only linked to).
        for name in ("vmlinuz", "initrd.img"):
            with open(os.path.join(root, f"boot/{name}-6.1.0-trap"), "w") as f:
                f.write("not a kernel\n")
            os.symlink(f"boot/{name}-6.1.0-trap", os.path.join(root, name))
        os.symlink(node_dir, os.path.join(root, "boot/grub"))
        debconf_before = read(root, "/var/cache/debconf/config.dat")
    node_before = _listing(node_dir)
    stream = str(tmp_path / "backup.dump")
    export_to_file(tree, instance, stream)
    new_disk = scripts.sparse_disk(str(tmp_path), 1024, "new.img")
    tree.settings(f'PARTITION_STYLE="{style}"\n')
    res = import_from_file(tree, new_disk, stream, OSP_BOOTLOADER="grub", DEBUG_LEVEL="1")
    log = res.stderr.decode()

    assert not os.path.exists(markers), open(os.path.join(markers, "ran")).read()
    assert _listing(node_dir) == node_before
    assert "running: chroot" not in log and "running: /usr/bin/grub-mkimage" in log
    with root_device(new_disk) as dev:
        uuid = scripts.blkid(dev, "UUID")
    with mounted_root(new_disk) as root:
        assert not os.path.exists(os.path.join(root, markers.lstrip("/")))
        # GRUB followed /boot/grub inside the instance, where GRUB at boot does too.
        landed = os.path.join(root, node_dir.lstrip("/"))
        assert os.readlink(os.path.join(root, "boot/grub")) == node_dir
        cfg = read(root, f"{node_dir}/grub.cfg")
        with open(os.path.join(landed, "i386-pc/core.img"), "rb") as f:
            core = f.read()
        assert os.path.isfile(os.path.join(landed, "i386-pc/normal.mod"))
        debconf_after = read(root, "/var/cache/debconf/config.dat")
    # grub-pc is not installed in this instance: its answer is added, for
    # when it is; every other record is kept as it was.
    assert "grub-pc/install_devices" not in debconf_before
    added = ("Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
             "Value: /dev/vda\nOwners: grub-pc\nFlags: seen")
    assert debconf_after.split("\n\n") == \
        debconf_before.rstrip("\n").split("\n\n") + [added, ""]
    assert f"search --no-floppy --fs-uuid --set=root {uuid}" in cfg
    assert "linux /vmlinuz root=UUID=" in cfg
    with open(new_disk, "rb") as f:
        mbr = f.read(512)
    assert any(mbr[:440]) and mbr[510:512] == b"\x55\xaa"
    # grub-bios-setup embeds core.img after the MBR (msdos) or in the BIOS
    # boot partition (gpt), patching its first sectors.
    table = json.loads(subprocess.run(["sfdisk", "--json", new_disk], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    boot = [p["start"] for p in table["partitions"] if p["type"] == BIOS_BOOT]
    start = 512 * (boot[0] if style == "gpt" else 1)
    with open(new_disk, "rb") as f:
        f.seek(start)
        embedded = f.read(len(core))
    assert embedded[1024:] == core[1024:]
