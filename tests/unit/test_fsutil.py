"""fsutil: atomic writes leave the old or the new file, never a part; umask is restored."""

from __future__ import annotations

import os
import stat

import pytest

from ganeti_debootstrap import fsutil


def test_atomic_write_replaces_the_file_with_its_mode(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old\n")
    fsutil.atomic_write(str(path), "new\n", mode=0o600)
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["record.json"]


def test_atomic_write_takes_bytes_and_a_temporary_prefix(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    path = tmp_path / "image"
    monkeypatch.setattr(os, "replace", spy)
    fsutil.atomic_write(str(path), b"\x00\x01", tmp_prefix="image.tmp-")
    assert path.read_bytes() == b"\x00\x01"
    assert seen and seen[0].startswith("image.tmp-")


def test_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "inputs"
    path.write_text("old\n")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        fsutil.atomic_write(str(path), "new\n")
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


def test_umask_is_set_in_the_block_and_restored_after_an_error():
    saved = os.umask(0o077)
    try:
        with pytest.raises(RuntimeError):
            with fsutil.umask(0o022):
                assert os.umask(0o022) == 0o022
                raise RuntimeError
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(saved)


def test_fsync_path_accepts_a_directory_and_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    fsutil.fsync_path(str(tmp_path))
    fsutil.fsync_path(str(tmp_path / "f"))
    with pytest.raises(FileNotFoundError):
        fsutil.fsync_path(str(tmp_path / "missing"))
