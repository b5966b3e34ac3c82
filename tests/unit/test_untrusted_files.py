"""Files of a used instance are read as untrusted data: never blocking, never
unbounded, regular files only, and a clear error (or warning) naming them."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ganeti_debootstrap import bootloader, instance_files, rename
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.target import MAX_READ_BYTES, Target, UnsafeFileError

# Every read below must end at once; a hang (a FIFO opened for reading
# without O_NONBLOCK, /dev/zero read to its end) fails the test instead.
DEADLINE_SECONDS = 10

HUGE_BYTES = 4 * 2**30  # a sparse 4 GiB file: no disk used, st_size huge


def within_deadline(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result (or exception), failing the test if it takes too long."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            outcome["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(DEADLINE_SECONDS)
    assert not worker.is_alive(), f"still running after {DEADLINE_SECONDS} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def make_hostile(path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a ``kind`` of non-text at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        # A relative name: AF_UNIX paths are limited to 108 bytes.
        monkeypatch.chdir(path.parent)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path.name)
        sock.close()
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(HUGE_BYTES)
    elif kind == "invalid-utf8":
        path.write_bytes(b"old.example.org\xff\xfe\n")
    else:
        raise AssertionError(kind)


HOSTILE = {"fifo": "a FIFO (named pipe), not a regular file",
           "socket": "a socket, not a regular file",
           "directory": "a directory, not a regular file",
           "huge": "is 4096.0 MiB long, more than the 4.0 MiB read at most",
           "invalid-utf8": "is not UTF-8 text (invalid byte at offset 15)"}


# --- the reader ---------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_reading_a_hostile_file_fails_at_once_naming_it(root, kind, monkeypatch):
    make_hostile(root / "etc/hostname", kind, monkeypatch)
    with pytest.raises(UnsafeFileError) as caught:
        within_deadline(lambda: Target(str(root)).read_text("/etc/hostname"))
    message = str(caught.value)
    assert message.startswith("/etc/hostname in the instance ")
    assert HOSTILE[kind] in message
    assert "\n" not in message
    assert caught.value.inner == "/etc/hostname"


def test_a_fifo_with_a_silent_writer_does_not_block_the_reader(root):
    fifo = root / "etc/hosts"
    os.mkfifo(fifo)
    # A writer that never writes: a blocking read would wait for ever.
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(UnsafeFileError, match="FIFO"):
            within_deadline(lambda: Target(str(root)).read_text("/etc/hosts"))
    finally:
        os.close(writer)


def test_a_character_device_is_refused_without_reading_it():
    # /dev/zero never ends: read unbounded, it would exhaust memory. With "/"
    # as the instance root, the node's own device is reached.
    with pytest.raises(UnsafeFileError, match="character device node"):
        within_deadline(lambda: Target("/").read_text("/dev/zero"))


def test_a_link_to_a_device_resolves_inside_the_instance(root):
    os.symlink("/dev/zero", root / "etc/hostname")
    with pytest.raises(FileNotFoundError):
        within_deadline(lambda: Target(str(root)).read_text("/etc/hostname"))


def test_a_link_to_a_fifo_names_the_file_and_where_it_led(root):
    os.mkfifo(root / "etc/pipe")
    os.symlink("pipe", root / "etc/hostname")
    with pytest.raises(UnsafeFileError, match=r"^/etc/hostname \(-> /etc/pipe\) in the "
                                              r"instance is a FIFO"):
        within_deadline(lambda: Target(str(root)).read_text("/etc/hostname"))


def test_a_file_growing_past_its_size_is_read_only_up_to_the_bound():
    # /proc files say 0 bytes and hold more: the size check cannot catch
    # them, the bounded read must.
    with pytest.raises(UnsafeFileError, match="grew beyond the 16 bytes"):
        within_deadline(lambda: Target("/").read_text("/proc/self/maps", limit=16))


def test_a_file_at_the_bound_is_read_and_one_byte_more_is_not(root):
    (root / "etc/at").write_bytes(b"a" * MAX_READ_BYTES)
    (root / "etc/over").write_bytes(b"a" * (MAX_READ_BYTES + 1))
    t = Target(str(root))
    assert len(t.read_text("/etc/at")) == MAX_READ_BYTES
    with pytest.raises(UnsafeFileError, match="more than the 4.0 MiB"):
        t.read_text("/etc/over")


def test_a_path_through_a_file_is_a_clear_error(root):
    (root / "etc/default").write_text("not a directory\n")
    with pytest.raises(UnsafeFileError, match="component of its path is not a directory"):
        Target(str(root)).read_text("/etc/default/grub")


def test_a_missing_file_is_still_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        Target(str(root)).read_text("/etc/absent")


def test_the_advice_ends_the_message(root):
    os.mkfifo(root / "etc/hostname")
    with pytest.raises(UnsafeFileError, match=r"not a regular file\. Do this\.$"):
        Target(str(root)).read_text("/etc/hostname", advice="Do this.")


# --- the writer -----------------------------------------------------------------

def test_writing_over_a_directory_is_a_clear_error_and_changes_nothing(root):
    (root / "etc/hostname").mkdir()
    (root / "etc/hostname/keep").write_text("x")
    with pytest.raises(UnsafeFileError, match="^/etc/hostname in the instance is a "
                                              "directory where a file belongs"):
        Target(str(root)).write_text("/etc/hostname", "web1\n")
    assert sorted(os.listdir(root / "etc")) == ["hostname"]
    assert os.listdir(root / "etc/hostname") == ["keep"]


def test_writing_below_a_file_is_a_clear_error(root):
    (root / "etc/default").write_text("x")
    with pytest.raises(UnsafeFileError, match="its directory /etc/default/grub.d "
                                              "cannot be made"):
        Target(str(root)).write_text("/etc/default/grub.d/x.cfg", "y\n")
    assert (root / "etc/default").read_text() == "x"


def test_writing_replaces_a_fifo_without_opening_it(root):
    os.mkfifo(root / "etc/hostname")
    within_deadline(lambda: Target(str(root)).write_text("/etc/hostname", "web1\n"))
    assert (root / "etc/hostname").read_text() == "web1\n"


def test_writing_into_a_missing_directory_makes_it(root):
    Target(str(root)).write_text("/etc/default/grub.d/x.cfg", "y\n")
    assert (root / "etc/default/grub.d/x.cfg").read_text() == "y\n"


def test_remove_leaves_a_directory_and_takes_a_fifo(root):
    os.mkfifo(root / "etc/pipe")
    (root / "etc/dir").mkdir()
    t = Target(str(root))
    assert t.remove("/etc/pipe") is True
    assert t.remove("/etc/dir") is False
    assert t.remove("/etc/pipe/below") is False
    assert os.listdir(root / "etc") == ["dir"]


# --- rename -------------------------------------------------------------------------

OLD, NEW = "old.example.org", "new.example.org"


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry below ``root``: its type and (for small files) content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = b""
            if stat.S_ISREG(st.st_mode) and st.st_size < 2**20:
                data = Path(path).read_bytes()
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), data)
    return out


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_rename_refuses_a_hostile_hostname_and_changes_nothing(root, kind, monkeypatch):
    make_hostile(root / "etc/hostname", kind, monkeypatch)
    (root / "etc/mailname").write_text(f"{OLD}\n")
    before = snapshot(root)
    with pytest.raises(UnsafeFileError) as caught:
        within_deadline(lambda: rename.apply(Target(str(root)), OLD, NEW))
    message = str(caught.value)
    assert message.startswith("/etc/hostname in the instance ")
    assert "Rename changes nothing" in message
    assert snapshot(root) == before


@pytest.mark.parametrize("name", ["mailname", "hosts"])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_rename_warns_about_a_hostile_optional_file_and_leaves_it(root, name, kind,
                                                                 monkeypatch, caplog):
    (root / "etc/hostname").write_text(f"{OLD}\n")
    make_hostile(root / "etc" / name, kind, monkeypatch)
    before = snapshot(root)[f"etc/{name}"]
    with caplog.at_level(logging.WARNING):
        changed = within_deadline(lambda: rename.apply(Target(str(root)), OLD, NEW))
    assert changed == ["/etc/hostname"]
    assert (root / "etc/hostname").read_text() == f"{NEW}\n"
    assert snapshot(root)[f"etc/{name}"] == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"/etc/{name} in the instance ")
    assert "rename leaves it alone" in warnings[0]


def test_rename_warns_about_a_link_loop_at_hosts(root, caplog):
    (root / "etc/hostname").write_text(f"{OLD}\n")
    os.symlink("../../etc/hosts", root / "etc/hosts")
    with caplog.at_level(logging.WARNING):
        assert rename.apply(Target(str(root)), OLD, NEW) == ["/etc/hostname"]
    assert "/etc/hosts in the instance cannot be resolved: too many symbolic links" \
        in caplog.text
    assert os.readlink(root / "etc/hosts") == "../../etc/hosts"


def test_rename_quotes_a_long_unexpected_hostname_briefly(root):
    (root / "etc/hostname").write_text("x" * 100_000 + "\n")
    with pytest.raises(rename.RenameError) as caught:
        rename.apply(Target(str(root)), OLD, NEW)
    assert len(str(caught.value)) < 1000


# --- import's and create's readers ---------------------------------------------------

@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_fstab_that_is_not_text_stops_the_rewrite_naming_it(root, kind, monkeypatch):
    make_hostile(root / "etc/fstab", kind, monkeypatch)
    before = snapshot(root)
    with pytest.raises(UnsafeFileError) as caught:
        within_deadline(lambda: instance_files.rewrite_fstab(
            Target(str(root)), root=FsEntry("0d4c3a8e-8f7c-4f0e-9d1d-1b2a3c4d5e6f", "ext4")))
    assert str(caught.value).startswith("/etc/fstab in the instance ")
    assert "new disks" in str(caught.value)
    assert snapshot(root) == before


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_os_title_of_a_hostile_os_release_is_the_default(root, kind, monkeypatch):
    make_hostile(root / "etc/os-release", kind, monkeypatch)
    assert within_deadline(lambda: bootloader.os_title(Target(str(root)))) == \
        "Debian GNU/Linux"


def test_identity_reset_refuses_a_machine_id_directory_clearly(root):
    (root / "etc/machine-id").mkdir()
    with pytest.raises(UnsafeFileError, match="^/etc/machine-id in the instance is a "
                                              "directory"):
        instance_files.reset_identity(Target(str(root)))


def test_identity_reset_replaces_a_fifo_machine_id_without_opening_it(root):
    os.mkfifo(root / "etc/machine-id")
    within_deadline(lambda: instance_files.reset_identity(Target(str(root))))
    assert (root / "etc/machine-id").read_text() == ""
