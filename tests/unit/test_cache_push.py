"""ganeti-debootstrap-cache push (cache_push.py): dispatch, refusals, what a node receives.

Two nodes are two scratch installations; Ganeti's commands are faked:
``gnt-cluster copyfile`` copies into the other node's cache directory as
``scp -p`` would (whole seconds of mtime, in place), ``gnt-cluster command``
runs our command's main() against the other node's installation and prints
what Ganeti prints around each node's output.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ganeti_debootstrap import cache_push, cacheadmin, settings
from ganeti_debootstrap.cache_store import Cache, CacheKey, image_name
from ganeti_debootstrap.paths import Paths
from tests.fakes import FakeRunner
from tests.scratch import make_paths
from tests.cacheentries import BIG, DEFAULT
from tests.cacheentries import stored_archive as stored

MASTER = "node1.gnt-test.example"
NODE2 = "node2.gnt-test.example"
PROGRAM = "/usr/sbin/ganeti-debootstrap-cache"

pytestmark = pytest.mark.usefixtures("process_state")


def make_install(base: Path) -> Paths:
    paths = make_paths(base, variants_list="default\nbig\n")
    conf = Path(paths.default_variants_dir, "big.conf")
    conf.write_text("EXTRA_PKGS=vim\n")
    conf.chmod(0o644)
    return paths


class TwoNodes:
    """The master's and node 2's installations, and Ganeti's commands between them."""

    def __init__(self, base: Path, runner: FakeRunner) -> None:
        self.master = make_install(base / "node1")
        self.node2 = make_install(base / "node2")
        os.makedirs(self.node2.cache_dir)
        self.runner = runner
        self.master_name = MASTER
        self.copy: Callable[[str, str], None] = self.scp
        runner.expect("gnt-cluster", "getmaster", output=lambda _: self.master_name + "\n")
        runner.expect("gnt-node", "list", stdout=f"{MASTER}|N\n{NODE2}|N\n")
        runner.expect("gnt-cluster", "copyfile", action=self.copyfile)
        runner.expect("gnt-cluster", "command", output=self.command)

    @staticmethod
    def scp(source: str, dest: str) -> None:
        """What scp -p leaves: the bytes, the mode, times to the second."""
        shutil.copyfile(source, dest)
        st = os.stat(source)
        os.chmod(dest, st.st_mode & 0o777)
        os.utime(dest, (int(st.st_atime), int(st.st_mtime)))

    def copyfile(self, argv: Sequence[str]) -> None:
        assert list(argv[2:4]) == ["-n", NODE2]
        source = argv[-1]
        assert os.path.dirname(source) == self.master.cache_dir
        self.copy(source, os.path.join(self.node2.cache_dir, os.path.basename(source)))

    def command(self, argv: Sequence[str]) -> str:
        assert list(argv[2:4]) == ["-n", NODE2]
        line = shlex.split(argv[-1])
        assert line[0] == PROGRAM
        # receive names the master's path of the manifest: the same on node 2.
        line = [a.replace(self.master.cache_dir, self.node2.cache_dir) for a in line]
        out = io.StringIO()
        status = cacheadmin.main(None, line[1:], paths=self.node2, euid=0, out=out,
                                 program=PROGRAM, myself=lambda: {NODE2})
        return (f"{'-' * 48}\nnode: {NODE2}\n{out.getvalue()}"
                f"some log line on stderr\nreturn code = {status}\n")

    def push(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        status = cacheadmin.main(None, ["push", *argv], paths=self.master, euid=0, out=out,
                                 program=PROGRAM, myself=lambda: {MASTER, "node1"})
        return status, out.getvalue()


@pytest.fixture
def nodes(tmp_path: Path, fake_runner: FakeRunner, monkeypatch) -> TwoNodes:
    fake_runner.expect(*settings.SHELL_COMMAND, real=True)
    fake_runner.expect("dpkg", "--print-architecture", stdout="amd64\n")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    return TwoNodes(tmp_path, fake_runner)


def ganeti_calls(runner: FakeRunner) -> list[str]:
    return [" ".join(c[:2]) for c in runner.calls if c[0].startswith("gnt-")]


def usable_on(paths: Paths, key: CacheKey) -> bool:
    """Whether create's lookup on that node vouches for the entry without checking it."""
    store = Cache(paths.cache_dir)
    with store.using(key, lambda: store.peek(key)) as use:
        return use.found is not None


def push_names(paths: Paths) -> list[str]:
    return sorted(n for n in os.listdir(paths.cache_dir) if n.startswith(".push-"))


def test_push_puts_the_entry_on_the_other_node_as_the_master_made_it(nodes):
    archive = stored(Cache(nodes.master.cache_dir), DEFAULT, images=("ext4",))
    status, out = nodes.push("default", "--json")
    assert status == 0
    [result] = json.loads(out)
    assert (result["node"], result["entry"], result["status"]) == \
        (NODE2, DEFAULT.stem, "pushed")
    # key first, then the files (data first, archive, manifest last), then receive.
    calls = ganeti_calls(nodes.runner)
    assert calls == ["gnt-cluster getmaster", "gnt-node list", "gnt-cluster command",
                     *["gnt-cluster copyfile"] * 5, "gnt-cluster command"]
    copied = [os.path.basename(c[-1]) for c in nodes.runner.calls if c[1:2] == ("copyfile",)]
    assert [n.split("-", 2)[2] for n in copied] == [
        image_name(DEFAULT.stem, "ext4"), image_name(DEFAULT.stem, "ext4") + ".json",
        DEFAULT.stem + ".inputs.json", DEFAULT.stem + ".tar",
        DEFAULT.stem + ".manifest.json"]
    there = os.path.join(nodes.node2.cache_dir, os.path.basename(archive))
    for name in (os.path.basename(archive), DEFAULT.stem + ".inputs.json",
                 image_name(DEFAULT.stem, "ext4")):
        mine, theirs = (os.stat(os.path.join(d, name))
                        for d in (nodes.master.cache_dir, nodes.node2.cache_dir))
        assert (theirs.st_mtime_ns, theirs.st_mode, theirs.st_size) == \
            (mine.st_mtime_ns, mine.st_mode, mine.st_size)
    assert Path(there).read_bytes() == Path(archive).read_bytes()
    assert usable_on(nodes.node2, DEFAULT)
    listed = json.loads(run_on(nodes.node2, "list", "--json"))
    assert [(e["name"], [i["fstype"] for i in e["images"]]) for e in listed] == \
        [(DEFAULT.stem, ["ext4"])]
    assert push_names(nodes.master) == push_names(nodes.node2) == []


def run_on(paths: Paths, *argv: str) -> str:
    out = io.StringIO()
    assert cacheadmin.main(None, list(argv), paths=paths, euid=0, out=out) == 0
    return out.getvalue()


def test_a_node_holding_the_entry_as_it_is_here_is_left_alone(nodes):
    stored(Cache(nodes.master.cache_dir), DEFAULT)
    assert nodes.push("default")[0] == 0
    before = len(nodes.runner.calls)
    status, out = nodes.push("default")
    assert (status, out) == (0, f"{NODE2}: up to date {DEFAULT.stem}\n")
    assert [c[1] for c in nodes.runner.calls[before:] if c[0] == "gnt-cluster"] == \
        ["getmaster", "command"]


def test_push_all_skips_variants_without_an_entry_and_named_ones_fail(nodes):
    stored(Cache(nodes.master.cache_dir), DEFAULT)
    status, out = nodes.push("--all", "--json")
    assert status == 0
    assert {(r["entry"], r["status"]) for r in json.loads(out)} == \
        {(DEFAULT.stem, "pushed"), (BIG.stem, "no entry")}
    status, out = nodes.push("big")
    assert status == 1
    assert f"{NODE2}: failed {BIG.stem}" in out


def test_push_refuses_to_run_anywhere_but_on_the_master(nodes, capsys):
    stored(Cache(nodes.master.cache_dir), DEFAULT)
    nodes.master_name = NODE2
    status, out = nodes.push("default")
    assert (status, out) == (1, "")
    err = capsys.readouterr().err
    assert "is not the master of its Ganeti cluster" in err
    assert f"{NODE2} is" in err
    assert ganeti_calls(nodes.runner) == ["gnt-cluster getmaster"]


def test_push_refuses_nodes_whose_settings_give_another_key(nodes, capsys):
    stored(Cache(nodes.master.cache_dir), DEFAULT)
    Path(nodes.node2.default_variants_dir, "default.conf").write_text("EXTRA_PKGS=emacs\n")
    status, _ = nodes.push("default", "big")
    assert status == 1
    err = capsys.readouterr().err
    assert f"Not pushing: {NODE2} would use other entries (default: cache-" in err
    assert "big" not in err.split("Not pushing:")[1].split(".")[0]
    assert "copyfile" not in " ".join(ganeti_calls(nodes.runner))
    assert os.listdir(nodes.node2.cache_dir) == []


def test_a_copy_cut_short_leaves_the_node_as_it_was(nodes, capsys):
    stored(Cache(nodes.master.cache_dir), DEFAULT)

    def cut_short(source: str, dest: str) -> None:
        TwoNodes.scp(source, dest)
        if source.endswith(".tar"):
            os.truncate(dest, os.path.getsize(dest) - 512)

    nodes.copy = cut_short
    status, out = nodes.push("default")
    assert status == 1
    assert "cut short" in out and "cut short" in capsys.readouterr().err
    assert os.listdir(nodes.node2.cache_dir) == []
    assert push_names(nodes.master) == []


def test_receive_refuses_a_manifest_outside_the_cache_directory(nodes, tmp_path, capsys):
    manifest = tmp_path / f".push-0a-{DEFAULT.stem}.manifest.json"
    manifest.write_text("{}")
    out = io.StringIO()
    status = cacheadmin.main(None, ["receive", str(manifest)], paths=nodes.node2, euid=0,
                             out=out)
    assert status == 1
    assert json.loads(out.getvalue().split(": ", 1)[1])["status"] == "failed"
    assert "is not a push manifest in the cache directory" in capsys.readouterr().err


def test_the_helpers_push_runs_on_the_nodes_are_hidden_from_help(capsys):
    with pytest.raises(SystemExit):
        cacheadmin.parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "push" in shown
    assert "receive" not in shown and " key " not in shown


def test_gnt_cluster_command_output_is_read_per_node():
    text = (f"{'-' * 48}\nnode: a\nx\n{cache_push.REPORT_MARKER}{{\"n\": 1}}\n"
            f"return code = 0\n{'-' * 48}\nnode: b\nbash: no such command\n"
            f"return code = 127\n")
    parsed = cache_push.parse_command_output(text)
    assert (parsed["a"].status, parsed["a"].report()) == (0, {"n": 1})
    assert (parsed["b"].status, parsed["b"].report(), parsed["b"].tail()) == \
        (127, None, "bash: no such command")


def test_expiry_removes_push_names_a_killed_push_left_after_a_day(tmp_path):
    store = Cache(str(tmp_path / "cache"))
    os.makedirs(store.directory)
    left = Path(store.directory, f".push-0a1b-{DEFAULT.stem}.tar")
    left.write_bytes(b"half")
    other = Path(store.directory, ".push-0a1b-not-ours")
    other.write_bytes(b"x")
    store.expire(time.time())
    assert left.exists()
    store.expire(time.time() + 2 * 86400)
    assert not left.exists() and other.exists()


def test_only_the_keys_of_entries_being_pushed_are_compared(nodes):
    # big has no entry on the master: node 2's other key for it is no reason
    # to refuse pushing default's.
    stored(Cache(nodes.master.cache_dir), DEFAULT)
    Path(nodes.node2.default_variants_dir, "big.conf").write_text("EXTRA_PKGS=emacs\n")
    status, out = nodes.push("--all", "--json")
    assert status == 0
    assert {(r["entry"], r["status"]) for r in json.loads(out)} == \
        {(DEFAULT.stem, "pushed"), (BIG.stem, "no entry")}
