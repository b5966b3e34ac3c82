"""The cache with real GNU tar, real file metadata and real concurrent runs."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest

from ganeti_debootstrap.cache_store import CacheKey
from ganeti_debootstrap.errors import CacheError
from tests.root.cachetree import make_system

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = CacheKey(suite="trixie", arch="amd64", mirror="", components=(),
               extra_pkgs=(), tool="mmdebstrap")
def describe(root: str) -> dict[str, tuple[object, ...]]:
    """Everything tar must keep, for each path relative to ``root``."""
    result: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames if dirpath == root else dirnames + filenames:
            path = os.path.join(dirpath, name) if name else root
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            xattrs = {a: os.getxattr(path, a, follow_symlinks=False)
                      for a in sorted(os.listxattr(path, follow_symlinks=False))}
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
            result[rel] = (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime),
                           st.st_rdev, link, xattrs, first)
    return result


def tool_output(argv: list[str], cwd: str) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def entry(store, tmp_path):
    with store.using(KEY, lambda: None):
        with store.staging_dir(KEY) as root:
            make_system(root)
            return store.store(KEY, root)


def test_extracted_tree_keeps_every_kind_of_metadata(store, entry, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    make_system(str(source))
    dest = tmp_path / "dest"
    dest.mkdir()
    with store.using(KEY, lambda: None):
        store.extract(entry, str(dest))
    before, after = describe(str(source)), describe(str(dest))
    assert sorted(after) == sorted(before)
    for rel in before:
        assert after[rel] == before[rel], rel


def test_capabilities_acls_and_special_files_survive(store, entry, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    with store.using(KEY, lambda: None):
        store.extract(entry, str(dest))
    assert "cap_net_raw=ep" in tool_output(["getcap", "usr/bin/ping"], str(dest))
    acl = tool_output(["getfacl", "-n", "-p", "srv/shared/report", "srv/shared"], str(dest))
    assert "user:1234:rw-" in acl and "default:group:100:r-x" in acl
    assert os.getxattr(dest / "etc/site.conf", "user.site") == b"preseeded"
    assert os.stat(dest / "usr/bin/su").st_mode & stat.S_ISUID
    assert os.stat(dest / "home/user/.profile").st_uid == 1234
    assert os.stat(dest / "usr/bin/dpkg").st_ino == os.stat(dest / "usr/bin/dpkg-hardlink").st_ino
    assert stat.S_ISCHR(os.lstat(dest / "dev/null").st_mode)
    assert stat.S_ISFIFO(os.lstat(dest / "dev/initctl").st_mode)
    assert os.stat(dest / "var-sparse").st_blocks * 512 < 2**20  # holes kept


def test_acl_ids_are_the_instances_not_mapped_through_node_names(store, entry, tmp_path):
    """Extract where the node's group 100 has another name: ids must not move."""
    dest = tmp_path / "dest"
    dest.mkdir()
    group = tmp_path / "group"
    with open("/etc/group") as f:
        lines = [ln for ln in f if ln.split(":")[2] != "100"]
    group.write_text("".join(lines) + "renumbered:x:100:\nusers:x:555:\n")
    extract = run_script(f"""
        from ganeti_debootstrap.cache_store import CacheEntry
        with store.using(key, lambda: None):
            store.extract(CacheEntry(key, {entry.path!r}, {entry.inputs_file!r}),
                          {str(dest)!r})
    """, store.directory, wrap=["unshare", "--mount", "sh", "-c",
                                f"mount --bind {group} /etc/group && exec \"$@\"", "-"])
    out, err = extract.communicate(timeout=60)
    assert extract.returncode == 0, err
    acl = tool_output(["getfacl", "-n", "-p", "srv/shared"], str(dest))
    assert "default:group:100:r-x" in acl


def test_archive_is_readable_by_root_only(entry):
    assert stat.S_IMODE(os.stat(entry.path).st_mode) == 0o600


def test_recorded_archive_is_found_again(store, entry):
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry


def damage(path: str, how: str) -> None:
    size = os.path.getsize(path)
    if how == "truncated":
        os.truncate(path, size // 2)
    elif how == "cut-at-record":
        os.truncate(path, size - 10240)
    elif how == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(size))
    elif how == "empty":
        os.truncate(path, 0)


@pytest.mark.parametrize("how", ["truncated", "cut-at-record", "garbage", "empty"])
def test_damaged_archive_is_removed_before_use(store, entry, how):
    damage(entry.path, how)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert not os.path.exists(entry.path)
    assert not os.path.exists(entry.inputs_file)


def test_valid_tar_of_something_else_is_removed(store, entry, tmp_path):
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "file").write_text("not a system")
    subprocess.run(["tar", "-cf", entry.path, "-C", str(other), "."], check=True)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
    assert not os.path.exists(entry.path)


@pytest.mark.parametrize("compress", [[], ["--gzip"]])
def test_administrators_repack_is_kept_and_used(store, entry, tmp_path, compress):
    work = tmp_path / "work"
    work.mkdir()
    # The way an administrator is told to repack: attributes and ids kept.
    subprocess.run(["tar", "-xpf", entry.path, "--numeric-owner", "--xattrs",
                    "--xattrs-include=*", "-C", str(work)], check=True)
    (work / "etc" / "motd").write_text("Site preseed\n")
    subprocess.run(["tar", "-cf", entry.path, *compress, "--numeric-owner",
                    "--xattrs", "-C", str(work), "."], check=True)
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) == entry
        dest = tmp_path / "dest"
        dest.mkdir()
        store.extract(entry, str(dest))
    assert (dest / "etc" / "motd").read_text() == "Site preseed\n"
    assert "cap_net_raw=ep" in tool_output(["getcap", "usr/bin/ping"], str(dest))
    record = json.load(open(entry.inputs_file))
    assert record["size"] == os.path.getsize(entry.path)


def run_script(body: str, *args: str, wrap: Sequence[str] = ()) -> subprocess.Popen[str]:
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        from ganeti_debootstrap import log
        from ganeti_debootstrap.cache_store import Cache, CacheKey
        log.setup(False)
        store = Cache(sys.argv[1], clean_days=14)
        key = CacheKey(suite="trixie", arch="amd64", mirror="", components=(),
                       extra_pkgs=(), tool="mmdebstrap")
    """) + textwrap.dedent(body)
    return subprocess.Popen([*wrap, sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


BUILD_ONCE = """
    from tests.root.cachetree import make_system
    with store.using(key, lambda: None):
        entry = store.lookup(key)
        if entry is None:
            with open(sys.argv[2], "a") as f:
                f.write(f"{os.getpid()}\\n")
            with store.staging_dir(key) as root:
                make_system(root)
                time.sleep(1.5)
                entry = store.store(key, root)
    print(entry.path)
"""


def test_concurrent_creates_build_once_and_share_the_archive(store, tmp_path):
    marker = tmp_path / "builds"
    procs = [run_script(BUILD_ONCE, store.directory, str(marker)) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    for proc, (_out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    assert len(marker.read_text().splitlines()) == 1
    assert {out.strip() for out, _ in results} == {store.archive_path(KEY)}
    assert any("Waiting for another run" in err for _, err in results)


HOLD_AND_WAIT = """
    import tempfile
    with store.using(key, lambda: None):
        with store.staging_dir(key) as root:
            os.makedirs(os.path.join(root, "etc"))
            fd, tmp = tempfile.mkstemp(dir=store.directory, prefix=key.stem + ".tar.tmp-")
            os.write(fd, b"half an archive")
            print("ready", flush=True)
            time.sleep(120)
"""


def test_killed_runs_leftovers_are_removed_and_its_lock_is_free(store):
    proc = run_script(HOLD_AND_WAIT, store.directory)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        leftovers = [n for n in os.listdir(store.directory) if ".tmp-" in n or ".staging-" in n]
        assert len(leftovers) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    with store.using(KEY, lambda: None):
        assert store.lookup(KEY) is None
        assert os.listdir(store.directory) == [KEY.stem + ".lock"]


def test_staging_cleanup_never_deletes_through_a_mount(store, tmp_path):
    proc_dir = None
    try:
        with store.using(KEY, lambda: None):
            with pytest.raises(CacheError, match="mount point"):
                with store.staging_dir(KEY) as root:
                    proc_dir = os.path.join(root, "proc")
                    os.makedirs(proc_dir)
                    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", proc_dir], check=True)
                    with open(os.path.join(proc_dir, "node-file"), "w") as f:
                        f.write("must survive")
        assert proc_dir is not None
        assert os.path.exists(os.path.join(proc_dir, "node-file"))
        # The leftover does not stop the next run; it stays until unmounted.
        with store.using(KEY, lambda: None):
            assert os.path.exists(os.path.join(proc_dir, "node-file"))
    finally:
        if proc_dir:
            subprocess.run(["umount", proc_dir], check=False)
    with store.using(KEY, lambda: None):
        assert os.listdir(store.directory) == [KEY.stem + ".lock"]
    assert os.listdir(store.directory) == []
