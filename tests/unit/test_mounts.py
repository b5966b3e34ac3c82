"""Mount handling without root: a fake mount table the fake mount/umount edit."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

import pytest

from ganeti_debootstrap import mounts
from ganeti_debootstrap.errors import DiskError

SAMPLE = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
24 27 0:6 / /dev rw,relatime shared:2 master:7 - devtmpfs devtmpfs rw,mode=755
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600
29 26 0:26 / /dev/pts rw,relatime - devpts devpts rw,mode=600
40 27 7:1 / /tmp/my\040disk rw,relatime - ext4 /dev/loop1 rw
41 40 0:50 / /tmp/my\040disk/proc rw - proc proc rw
42 40 0:51 / /tmp/my\040disk/dev rw - devtmpfs udev rw
43 42 0:52 / /tmp/my\040disk/dev/pts rw - devpts devpts rw
44 40 0:53 / /tmp/my\040disk2 rw - tmpfs tmp\134fs rw
"""


class FakeMountTable:
    """A mountinfo file that the fake mount and umount commands change."""

    def __init__(self, path: str, lines: Sequence[str] = ()) -> None:
        self.path = path
        self.lines = list(lines)
        self.next_id = 100
        self.save()

    def save(self) -> None:
        with open(self.path, "w") as f:
            f.write("".join(line + "\n" for line in self.lines))

    def add(self, mount_point: str, fstype: str = "tmpfs") -> None:
        self.next_id += 1
        escaped = mount_point.replace(" ", "\\040")
        self.lines.append(f"{self.next_id} 1 0:{self.next_id} / {escaped} rw - "
                          f"{fstype} src rw")
        self.save()

    def mount(self, argv: Sequence[str]) -> None:
        self.add(argv[-1])

    def umount(self, argv: Sequence[str]) -> None:
        """Remove the topmost (last) mount at the path, like umount(8)."""
        for i in reversed(range(len(self.lines))):
            if mounts.parse_mountinfo(self.lines[i])[0].mount_point == argv[-1]:
                del self.lines[i]
                self.save()
                return
        raise AssertionError(f"umount of {argv[-1]}, which is not mounted")


@pytest.fixture
def table(tmp_path, monkeypatch) -> FakeMountTable:
    path = str(tmp_path / "mountinfo")
    monkeypatch.setattr(mounts, "MOUNTINFO", path)
    return FakeMountTable(path)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(mounts, "_sleep", slept.append)
    return slept


def test_mountinfo_fields_are_parsed_and_unescaped():
    entries = mounts.parse_mountinfo(SAMPLE)
    assert len(entries) == 10
    disk = entries[5]
    assert disk.mount_point == "/tmp/my disk"
    assert (disk.major, disk.minor) == (7, 1)
    assert disk.fstype == "ext4"
    assert disk.source == "/dev/loop1"
    assert disk.parent_id == 27
    # Optional fields before the separator do not shift the others.
    assert entries[2].fstype == "devtmpfs" and entries[2].source == "devtmpfs"
    assert entries[9].source == "tmp\\fs"


def test_unmount_order_is_deepest_first_and_ignores_prefix_siblings():
    order = [e.mount_point for e in
             mounts.mounts_under("/tmp/my disk", mounts.parse_mountinfo(SAMPLE))]
    assert order == ["/tmp/my disk/dev/pts", "/tmp/my disk/dev",
                     "/tmp/my disk/proc", "/tmp/my disk"]


def test_mounts_stacked_on_one_path_are_unmounted_newest_first():
    entries = mounts.parse_mountinfo(SAMPLE)
    under = mounts.mounts_under("/dev", entries)
    assert [e.mount_id for e in under] == [29, 26, 24]


def test_unmount_tree_unmounts_everything_below_deepest_first(fake_runner, table):
    for point in ["/t", "/t/proc", "/t/dev", "/t/dev/pts", "/t/dev/pts", "/tx"]:
        table.add(point)
    fake_runner.expect("umount", action=table.umount)
    mounts.unmount_tree("/t")
    assert fake_runner.commands() == [
        "umount /t/dev/pts", "umount /t/dev/pts", "umount /t/dev",
        "umount /t/proc", "umount /t"]
    assert [e.mount_point for e in mounts.current_mounts()] == ["/tx"]


def test_unmount_tree_of_nothing_mounted_runs_nothing(fake_runner, table):
    table.add("/elsewhere")
    mounts.unmount_tree("/t")
    assert fake_runner.calls == []


def test_busy_unmount_is_retried(fake_runner, table, sleeps):
    table.add("/t")
    fake_runner.expect("umount", action=table.umount)
    fake_runner.expect("umount", returncode=32, stderr="umount: /t: target is busy.", times=2)
    mounts.unmount_tree("/t")
    assert fake_runner.commands() == ["umount /t"] * 3
    assert sleeps == list(mounts.UNMOUNT_DELAYS[:2])


def test_unmount_that_stays_busy_names_the_processes(fake_runner, table, sleeps,
                                                      proc):
    table.add("/t")
    pid = os.path.join(proc, "4242")
    os.makedirs(os.path.join(pid, "fd"))
    os.symlink("/t/var/lib", os.path.join(pid, "cwd"))
    with open(os.path.join(pid, "comm"), "w") as f:
        f.write("sleep\n")
    fake_runner.expect("umount", returncode=32, stderr="umount: /t: target is busy.")
    with pytest.raises(DiskError) as err:
        mounts.unmount_tree("/t")
    message = str(err.value)
    assert "sleep (pid 4242)" in message
    assert "target is busy" in message
    assert "umount -R /t" in message
    assert len(fake_runner.calls) == len(mounts.UNMOUNT_DELAYS) + 1
    assert "-l" not in {arg for call in fake_runner.calls for arg in call}


def test_mounted_passes_type_and_options_and_unmounts_on_exit(fake_runner, table):
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", action=table.umount)
    with mounts.mounted("/dev/loop1", "/t", fstype="ext4", options=("ro", "noload")) as where:
        assert where == "/t"
        table.add("/t/proc")  # a hook's mount
        assert fake_runner.commands() == ["mount -t ext4 -o ro,noload /dev/loop1 /t"]
    assert fake_runner.commands()[1:] == ["umount /t/proc", "umount /t"]


def test_failed_mount_unmounts_nothing(fake_runner, table):
    fake_runner.expect("mount", returncode=32, stderr="wrong fs type")
    with pytest.raises(Exception, match="wrong fs type"):
        with mounts.mounted("/dev/loop1", "/t"):
            pass
    assert fake_runner.commands() == ["mount /dev/loop1 /t"]


def test_unmount_failure_does_not_replace_the_original_error(fake_runner, table, sleeps,
                                                              proc, caplog):
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", returncode=32, stderr="target is busy")
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="hook failed"):
        with mounts.mounted("/dev/loop1", "/t"):
            raise RuntimeError("hook failed")
    assert "unmounting /t also failed" in caplog.text


def test_unmount_failure_without_other_error_is_raised(fake_runner, table, sleeps,
                                                        proc):
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", returncode=32, stderr="target is busy")
    with pytest.raises(DiskError, match="Cannot unmount /t"):
        with mounts.mounted("/dev/loop1", "/t"):
            pass


def test_api_filesystems_mount_in_order_and_unmount_in_reverse(fake_runner, tmp_path,
                                                               table):
    target = str(tmp_path / "target")
    os.makedirs(target)
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", action=table.umount)
    with mounts.api_filesystems(target):
        for sub in ("proc", "sys", "dev", "dev/pts"):
            assert os.path.isdir(os.path.join(target, sub))
        mounted = len(fake_runner.calls)
    t = target
    assert fake_runner.commands()[:mounted] == [
        f"mount -t proc -o nosuid,nodev,noexec proc {t}/proc",
        f"mount -t sysfs -o nosuid,nodev,noexec sysfs {t}/sys",
        f"mount --bind --make-private /dev {t}/dev",
        f"mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=666 devpts {t}/dev/pts",
    ]
    assert fake_runner.commands()[mounted:] == [
        f"umount {t}/dev/pts", f"umount {t}/dev", f"umount {t}/sys", f"umount {t}/proc"]


def test_api_filesystems_failure_midway_releases_what_was_mounted(fake_runner, tmp_path,
                                                                  table):
    target = str(tmp_path / "target")
    os.makedirs(target)
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("mount", "--bind", returncode=32, stderr="no /dev")
    fake_runner.expect("umount", action=table.umount)
    with pytest.raises(Exception, match="no /dev"):
        with mounts.api_filesystems(target):
            pass
    assert fake_runner.commands()[-2:] == [f"umount {target}/sys", f"umount {target}/proc"]
    assert mounts.current_mounts() == []


def test_api_filesystems_do_not_follow_symlinks_out_of_the_instance(fake_runner, tmp_path,
                                                                    table):
    target = tmp_path / "target"
    target.mkdir()
    escape = tmp_path / "node-etc"
    escape.mkdir()
    # An instance whose /proc points at an absolute path: inside the
    # instance that is <target>/node-etc, never the node's directory.
    os.symlink(str(escape), target / "proc")
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", action=table.umount)
    with mounts.api_filesystems(str(target)):
        pass
    first = fake_runner.calls[0]
    assert first[-1] == str(target) + str(escape)
    assert not first[-1].startswith(str(escape))


def test_temporary_mountpoint_is_removed_also_on_error():
    with pytest.raises(RuntimeError):
        with mounts.temporary_mountpoint() as path:
            assert os.path.isdir(path) and os.listdir(path) == []
            raise RuntimeError("boom")
    assert not os.path.exists(path)


def test_temporary_mountpoint_lies_inside_a_root_only_directory():
    saved = os.umask(0o077)  # Ganeti's
    try:
        with mounts.temporary_mountpoint() as path:
            parent = os.path.dirname(path)
            assert os.path.basename(parent).startswith("ganeti-debootstrap.")
            assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
            assert os.stat(parent).st_uid == os.geteuid()
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    finally:
        os.umask(saved)
    assert not os.path.exists(parent)


def test_a_mountpoint_left_busy_is_named_with_its_private_parent(monkeypatch):
    with pytest.raises(DiskError, match=r"umount -R .*/root\) and remove "):
        with mounts.temporary_mountpoint() as path:
            with open(os.path.join(path, "left"), "w"):
                pass  # something left in it: rmdir fails as with a mount
    os.unlink(os.path.join(path, "left"))
    os.rmdir(path)
    os.rmdir(os.path.dirname(path))


def test_private_root_is_made_in_the_directory_asked(tmp_path):
    root = mounts.make_private_root("stage.", str(tmp_path))
    assert os.path.dirname(os.path.dirname(root)) == str(tmp_path)
    assert stat.S_IMODE(os.stat(os.path.dirname(root)).st_mode) == 0o700
    assert os.listdir(root) == []


@pytest.mark.parametrize("options,mount_options", [
    ((), ""), (mounts.UNTRUSTED_OPTIONS, "-o nosuid,nodev ")])
def test_instance_root_is_mounted_on_a_private_point_and_removed(fake_runner, table,
                                                                 options, mount_options):
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", action=table.umount)
    with mounts.instance_root("/dev/loop1", "ext4", "/disk", options) as root:
        assert stat.S_IMODE(os.stat(os.path.dirname(root)).st_mode) == 0o700
        assert fake_runner.commands() == [f"mount -t ext4 {mount_options}/dev/loop1 {root}"]
    assert fake_runner.commands()[1:] == [f"umount {root}"]
    assert not os.path.exists(os.path.dirname(root))


def test_instance_root_is_released_after_a_failure_inside(fake_runner, table):
    fake_runner.expect("mount", action=table.mount)
    fake_runner.expect("umount", action=table.umount)
    with pytest.raises(RuntimeError, match="restore failed"):
        with mounts.instance_root("/dev/loop1", "ext4", "/disk") as root:
            raise RuntimeError("restore failed")
    assert fake_runner.commands()[1:] == [f"umount {root}"]
    assert mounts.current_mounts() == []
    assert not os.path.exists(os.path.dirname(root))
