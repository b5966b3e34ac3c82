"""import's restore step: the confined restore command and how its failures read."""

from __future__ import annotations

import logging
import os

import pytest

from ganeti_debootstrap import confine, import_disk
from ganeti_debootstrap.errors import CommandError, MissingProgramError
from tests.dumprecords import header

CONFINE = os.path.join(os.path.dirname(import_disk.__file__), "confine.py")


def stream_fd(data: bytes) -> int:
    """A descriptor reading ``data`` and then end-of-file."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    return read_fd


COMPLETE = header(1) + bytes(2048) + header(5) + header(5)


def test_restore_runs_confined_to_the_target_with_the_stream_on_stdin(fake_runner, tmp_path):
    target = str(tmp_path)
    fake_runner.expect("/usr/bin/python3", action=lambda argv: (
        tmp_path / "restoresymtable").write_bytes(b"table"))
    fd = stream_fd(COMPLETE)
    try:
        assert import_disk.restore_stream(target, fd) == len(COMPLETE)
    finally:
        os.close(fd)
    assert fake_runner.calls == [("/usr/bin/python3", "-I", "-S", CONFINE, target, "--",
                                  "restore", "-r", "-y", "-f", "-")]
    # restore's bookkeeping does not stay in the instance.
    assert not (tmp_path / "restoresymtable").exists()


@pytest.mark.parametrize("damage", ["truncated", "restore fails"])
def test_a_damaged_stream_keeps_its_explanation(fake_runner, tmp_path, damage):
    if damage == "truncated":
        fake_runner.expect("/usr/bin/python3")
        data = COMPLETE[:-2048]
    else:
        fake_runner.expect("/usr/bin/python3", returncode=1,
                           stderr="restore: Tape is not a dump tape")
        data = b"garbage" * 200
    fd = stream_fd(data)
    try:
        with pytest.raises(import_disk.DefinitionError) as err:
            import_disk.restore_stream(str(tmp_path), fd)
    finally:
        os.close(fd)
    if damage == "truncated":
        assert isinstance(err.value, import_disk.ImportError_)
        assert "truncated or damaged" in str(err.value)
    else:
        assert isinstance(err.value, CommandError)
        assert "not a dump(8) stream" in str(err.value)
        assert "Tape is not a dump tape" in str(err.value)


def test_a_confinement_that_cannot_be_set_up_is_not_blamed_on_the_stream(fake_runner,
                                                                        tmp_path):
    fake_runner.expect("/usr/bin/python3", returncode=confine.SETUP_FAILED,
                       stderr="confine: cannot confine restore to /x: unshare: "
                              "Operation not permitted")
    fd = stream_fd(COMPLETE)
    try:
        with pytest.raises(import_disk.ImportError_) as err:
            import_disk.restore_stream(str(tmp_path), fd)
    finally:
        os.close(fd)
    message = str(err.value)
    assert "could not be confined" in message and "unshare: Operation not permitted" in message
    assert "dump(8)" not in message


def test_a_missing_restore_names_its_package(fake_runner, tmp_path):
    fake_runner.expect("/usr/bin/python3", returncode=confine.NOT_FOUND,
                       stderr="confine: cannot run restore: No such file or directory")
    fd = stream_fd(COMPLETE)
    try:
        with pytest.raises(MissingProgramError) as err:
            import_disk.restore_stream(str(tmp_path), fd)
    finally:
        os.close(fd)
    assert "'restore'" in str(err.value) and "'dump'" in str(err.value)


@pytest.mark.parametrize("machine", ["x86_64", "ppc64le"])
def test_only_where_restore_runs_without_cap_sys_admin_import_warns_of_the_lost_xattrs(
        fake_runner, tmp_path, monkeypatch, caplog, machine):
    # (confine.py decides by the same table: none, no filter, no CAP_SYS_ADMIN.)
    real_table = confine.host_table
    monkeypatch.setattr(confine, "host_table", lambda: real_table(machine, 8, "little"))
    fake_runner.expect("/usr/bin/python3")
    fd = stream_fd(COMPLETE)
    try:
        with caplog.at_level(logging.WARNING):
            import_disk.restore_stream(str(tmp_path), fd)
    finally:
        os.close(fd)
    warnings = [r for r in caplog.records if "trusted.*" in r.getMessage()]
    if machine == "x86_64":
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
