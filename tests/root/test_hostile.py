"""export, import and rename on a tenant's hostile instance (issue 11).

One real instance is created; each case copies its disk, plants what a
tenant could (tests/root/hostile.py: trap programs, symlinks out of the
root, special files and huge files where text is expected), and runs the
scripts on it as Ganeti would: export, import of a plain dump of it (each
partition style; GRUB on msdos and gpt), rename, and export of what import
made. Every run must end within a bound, exit 0 or with a final ERROR line
naming the hostile file, run no program of the instance, change nothing on
the node (canaries byte for byte, no new file) and leave nothing attached.

The matrix (case, script, result) is written to ``hostile-matrix.md`` in
the module's temporary directory and printed at the end (``pytest -s``).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.root import faultkit, hostile, scripts
from tests.root.hostile import DIRECTORIES, OLD_NAME, TEXT_FILES, Canaries, Run

DISK_MIB = 1024
# Imports of the full cases go round these layouts (variant, bootloader).
LAYOUTS = (("msdos", "none"), ("gpt", "none"), ("none", "none"))
GRUB_LAYOUTS = (("msdos", "grub"), ("gpt", "grub"))


@dataclass
class Corpus:
    """What every case shares: the OS tree, the created instance, the canaries."""

    base: str
    tree: scripts.OSTree
    disk: str
    canaries: Canaries
    marker: str
    recorder: str
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bootstrapped_localstatedir) -> Iterator[Corpus]:
    base = str(tmp_path_factory.mktemp("hostile"))
    tree = scripts.make_os_tree(os.path.join(base, "os"), bootstrapped_localstatedir)
    for style in ("msdos", "gpt", "none"):
        tree.variant(style, f'PARTITION_STYLE="{style}"\n')
    markers = os.path.join(base, "markers")
    os.makedirs(markers)
    marker = os.path.join(markers, "ran")
    recorder = hostile.build_recorder(base, marker)
    disk = scripts.sparse_disk(base, DISK_MIB, "created.img")
    scripts.run_script(tree, "create", scripts.create_env(OLD_NAME, disk), timeout=600)
    found = Corpus(base, tree, disk, Canaries(os.path.join(base, "canary")), marker,
                   recorder)
    yield found
    _report(found)


def _report(corpus: Corpus) -> None:
    """The matrix, as markdown, into the module's directory and on stdout."""
    lines = ["| case | script | result | exit | seconds |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
              for row in corpus.rows]
    path = os.path.join(corpus.base, "hostile-matrix.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nhostile matrix ({path}):\n" + "\n".join(lines))


# --- the cases -----------------------------------------------------------------------

Planter = Callable[[str, Corpus], tuple[str, ...]]


@dataclass(frozen=True)
class Case:
    name: str
    plant: Planter  # plants into the mounted root; returns the hostile paths
    scripts: tuple[str, ...] = ("export", "import", "rename", "export again")
    layouts: tuple[tuple[str, str], ...] = ()


def _traps(root: str, c: Corpus) -> tuple[str, ...]:
    hostile.plant_traps(root, c.recorder, c.marker)
    hostile.check_traps(root, c.marker)
    return ()


def _links(how_for: Callable[[int], str]) -> Planter:
    def plant(root: str, c: Corpus) -> tuple[str, ...]:
        for i, inner in enumerate(TEXT_FILES):
            hostile.plant_symlink(root, inner, c.canaries.file(inner), how_for(i))
        return TEXT_FILES
    return plant


def _directory_links(root: str, c: Corpus) -> tuple[str, ...]:
    hows = ("absolute", "relative", "proc")
    for i, inner in enumerate(DIRECTORIES):
        hostile.plant_symlink(root, inner, c.canaries.directory(inner), hows[i % 3])
    return DIRECTORIES + TEXT_FILES


def _special(kind: str, files: tuple[str, ...] = TEXT_FILES) -> Planter:
    def plant(root: str, c: Corpus) -> tuple[str, ...]:
        for inner in files:
            hostile.plant_special(root, inner, kind)
        return files
    return plant


def _identity_files(root: str, c: Corpus) -> tuple[str, ...]:
    """What import adapts after fstab, each hostile in its own way."""
    planted = {"/etc/machine-id": "fifo", "/var/lib/dbus/machine-id": "chardev",
               "/etc/udev/rules.d/70-persistent-net.rules": "directory",
               "/var/lib/systemd/random-seed": "huge", "/etc/os-release": "socket",
               "/boot/grub/grub.cfg": "fifo"}
    for inner, kind in planted.items():
        hostile.plant_special(root, inner, kind)
    return tuple(planted)


CASES = [
    Case("trap programs", _traps, layouts=LAYOUTS[:1] + GRUB_LAYOUTS),
    Case("symlinks absolute", _links(lambda i: ("absolute", "proc")[i % 2]),
         layouts=LAYOUTS[1:2] + GRUB_LAYOUTS[:1]),
    Case("symlinks relative", _links(lambda i: "relative"), layouts=LAYOUTS[2:3]),
    Case("directory symlinks", _directory_links, layouts=LAYOUTS[1:2] + GRUB_LAYOUTS[1:]),
    Case("FIFOs", _special("fifo"), layouts=LAYOUTS[:1]),
    Case("char devices (1,5)", _special("chardev"), layouts=LAYOUTS[1:2]),
    Case("block devices (the node's root disk)", _special("blockdev"), layouts=LAYOUTS[2:3]),
    Case("sockets", _special("socket"), layouts=LAYOUTS[:1]),
    Case("directories", _special("directory"), layouts=LAYOUTS[1:2]),
    Case("4 GiB sparse files", _special("huge", hostile.READ_FILES), layouts=LAYOUTS[2:3]),
    Case("identity files", _identity_files, scripts=("import", "export again"),
         layouts=GRUB_LAYOUTS[:1]),
] + [
    Case(f"{inner} {kind}", _special(kind, (inner,)), scripts=("rename",))
    for inner in ("/etc/mailname", "/etc/hosts")
    for kind in ("fifo", "chardev", "directory", "huge")
]


# --- running one case -------------------------------------------------------------------

def _leftovers(case_dir: str) -> list[str]:
    loops = faultkit.loops_backed_under(case_dir)
    with open("/proc/self/mountinfo") as f:
        fields = [line.split() for line in f]
    mounts = [fl[4] for fl in fields
              if fl[fl.index("-") + 2] in loops or fl[4].startswith(os.environ["TMPDIR"] + "/")]
    return [f"mount {m}" for m in mounts] + [f"loop {d}" for d in loops]


class Runner:
    """Runs one case's scripts, judging each run and recording the matrix rows."""

    def __init__(self, corpus: Corpus, case: Case, case_dir: str, names: tuple[str, ...]):
        self.corpus, self.case, self.case_dir, self.names = corpus, case, case_dir, names
        self.failures: list[str] = []

    def run(self, label: str, script: str, env: dict[str, str], written: str = "",
            stdin_path: str | None = None, stdout_path: str | None = None) -> Run:
        """One run; ``written`` is the disk it writes, checked for traps that ran."""
        before = self.corpus.canaries.snapshot()
        node_before = hostile.node_state()
        tmp_before = sorted(os.listdir(os.environ["TMPDIR"]))
        with open(stdin_path or os.devnull, "rb") as inp, \
                open(stdout_path or os.devnull, "wb") as out:
            result = hostile.run_bounded(self.corpus.tree, script, env, stdin=inp.fileno(),
                                         stdout=out.fileno())
        changes = hostile.snapshot_changes(before, self.corpus.canaries.snapshot())
        changes += hostile.snapshot_changes(node_before, hostile.node_state())
        changes += [f"new in TMPDIR: {n}" for n in
                    sorted(set(os.listdir(os.environ["TMPDIR"])) - set(tmp_before))
                    if not _private_and_empty(os.path.join(os.environ["TMPDIR"], n))]
        left = _leftovers(self.case_dir)
        if left:  # release, so that the next run starts clean
            _release(left)
        inside = hostile.ran_inside(written) if written else ""
        verdict = hostile.judge(result, names=self.names, marker=self.corpus.marker,
                                canary_changes=changes, leftovers=left, inside=inside)
        self.corpus.rows.append((self.case.name, label, verdict.result,
                                 hostile.exit_summary(result), f"{result.seconds:.1f}"))
        if verdict.problems:
            self.failures.append(f"{label}: {verdict.result}\n    last lines: "
                                 + result.tail(6).replace("\n", "\n      "))
        return result


def _private_and_empty(path: str) -> bool:
    """Whether ``path`` is a root-only directory holding nothing but directories:
    a place a script may keep for its mount points (what is mounted there is
    checked as a leftover)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        return False
    return all(not files for _, _, files in os.walk(path))


def _release(left: list[str]) -> None:
    for item in left:
        kind, what = item.split(" ", 1)
        if kind == "mount":
            subprocess.run(["umount", "-l", what], capture_output=True)
    for item in left:
        kind, what = item.split(" ", 1)
        if kind == "loop":
            subprocess.run(["losetup", "-d", what], capture_output=True)


@pytest.mark.parametrize("case", CASES, ids=[re.sub(r"[^a-z0-9]+", "-", c.name.lower())
                                              for c in CASES])
def test_scripts_are_safe_on_a_hostile_instance(corpus, tmp_path, record_testsuite_property,
                                                case):
    case_dir = str(tmp_path)
    disk = os.path.join(case_dir, "hostile.img")
    subprocess.run(["cp", "--sparse=always", corpus.disk, disk], check=True)
    with scripts.mounted_root(disk, read_only=False) as root:
        hostile.plant_kernel(root)
        hostile.plant_setuid(root)
        names = case.plant(root, corpus)
    runner = Runner(corpus, case, case_dir, names)
    imported = ""
    if "export" in case.scripts:
        runner.run("export", "export", hostile.export_env(disk),
                   stdout_path=os.path.join(case_dir, "export.dump"))
        os.unlink(os.path.join(case_dir, "export.dump"))
    if "import" in case.scripts:
        stream = os.path.join(case_dir, "tenant.dump")
        hostile.dump_by_hand(disk, stream)
        for variant, loader in case.layouts:
            target = scripts.sparse_disk(case_dir, DISK_MIB, f"import-{variant}-{loader}.img")
            result = runner.run(f"import {variant} bootloader={loader}", "import",
                                hostile.import_env(target, OS_VARIANT=variant,
                                                   OSP_BOOTLOADER=loader),
                                written=target, stdin_path=stream)
            if result.returncode == 0 and not imported:
                imported = target
            else:
                os.unlink(target)
        os.unlink(stream)
    if "rename" in case.scripts:
        runner.run("rename", "rename", hostile.rename_env(disk), written=disk)
    if "export again" in case.scripts:
        if imported:
            runner.run("export again", "export", hostile.export_env(imported),
                       stdout_path=os.devnull)
        else:
            corpus.rows.append((case.name, "export again", "n/a (no import succeeded)", "", ""))
    for row in corpus.rows:
        if row[0] == case.name:  # the matrix in the junit report too
            record_testsuite_property(f"hostile: {row[0]}: {row[1]}", f"{row[2]} ({row[3]})")
    if runner.failures:
        pytest.fail(f"{case.name}: unsafe on a hostile instance:\n  "
                    + "\n  ".join(runner.failures), pytrace=False)


# --- the mounted instance is never exposed ---------------------------------------------

def _mount_of(disk: str, pid: int) -> tuple[str, list[str]]:
    """The mount point and options of the filesystem on a loop device over
    ``disk``, as process ``pid`` sees them (it may have its own mount namespace)."""
    loops = set(faultkit.loops_backed_under(os.path.dirname(disk)))
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fl = line.split()
            if fl[fl.index("-") + 2] in loops:
                return fl[4], fl[5].split(",")
    raise AssertionError(f"nothing of {disk} is mounted")


def _private_ancestor(path: str, pid: int) -> str:
    """An ancestor of ``path`` the script made, root's own with mode 0700 ('' if
    none), as process ``pid`` sees it.

    TMPDIR and its parents do not count: on a node TMPDIR is /tmp.
    """
    shared = os.environ["TMPDIR"]
    parent = os.path.dirname(path)
    while parent not in ("/", "") and not (shared == parent or shared.startswith(parent + "/")):
        st = os.stat(f"/proc/{pid}/root{parent}")
        if st.st_uid == 0 and st.st_mode & 0o077 == 0:
            return parent
        parent = os.path.dirname(parent)
    return ""


@pytest.mark.parametrize("script,phase", [("rename", "rename"), ("import", "adapt instance")])
def test_a_mounted_instance_is_private_nosuid_and_nodev(corpus, tmp_path, script, phase):
    disk = os.path.join(str(tmp_path), "hostile.img")
    subprocess.run(["cp", "--sparse=always", corpus.disk, disk], check=True)
    with scripts.mounted_root(disk, read_only=False) as root:
        suid = hostile.plant_setuid(root)
        os.mknod(os.path.join(root, "root", "zero"), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        suid_inner = "/" + os.path.relpath(suid, root)
    stream = os.path.join(str(tmp_path), "tenant.dump")
    if script == "import":
        hostile.dump_by_hand(disk, stream)
        target = scripts.sparse_disk(str(tmp_path), DISK_MIB, "imported.img")
        env = hostile.import_env(target)
    else:
        target = disk
        env = hostile.rename_env(disk)
    with open(stream if script == "import" else os.devnull, "rb") as inp:
        bg = faultkit.start(corpus.tree, script, env, pause_at=phase, stdin=inp.fileno())
        try:
            bg.wait_for(f"^PAUSED {phase}", timeout=hostile.RUN_TIMEOUT)
            pid = bg.proc.pid
            point, options = _mount_of(target, pid)
            private = _private_ancestor(point, pid)
            suid_mode = os.stat(f"/proc/{pid}/root{point}{suid_inner}").st_mode
        finally:
            bg.signal(15)
            bg.wait()
    assert suid_mode & 0o4000, "the premise: the tenant's setuid program is there"
    problems = [f"mounted without {o}" for o in ("nosuid", "nodev") if o not in options]
    if not private:
        problems.append("no root-only 0700 directory of the script's above it (only "
                        "the shared TMPDIR, /tmp on a node)")
    if problems:
        pytest.fail(f"{script}: the instance's root at {point} ({','.join(options)}): "
                    + "; ".join(problems), pytrace=False)


# --- a value from Ganeti never adds a line ------------------------------------------------

@pytest.mark.parametrize("variable", ["INSTANCE_NAME", "OLD_INSTANCE_NAME"])
@pytest.mark.parametrize("value", [f"{OLD_NAME}\n10.0.0.1 evil.example.org",
                                   f"{OLD_NAME}\r", f"{OLD_NAME}\t#"],
                         ids=["newline", "carriage-return", "tab"])
def test_rename_refuses_a_name_with_a_control_character(corpus, tmp_path, variable, value):
    disk = os.path.join(str(tmp_path), "instance.img")
    subprocess.run(["cp", "--sparse=always", corpus.disk, disk], check=True)
    files = ("/etc/hostname", "/etc/mailname", "/etc/hosts")

    def contents() -> dict[str, str]:
        with scripts.mounted_root(disk) as root:
            return {f: scripts.read(root, f) for f in files}
    before = contents()
    env = hostile.rename_env(disk, new="renamed.example.org")
    env[variable] = value
    case = Case(f"{variable} ending in {value[len(OLD_NAME):]!r}", _traps)
    # Any clear final error will do: the exact wording is the fix's to choose.
    runner = Runner(corpus, case, str(tmp_path), ())
    result = runner.run("rename", "rename", env, written=disk)
    assert result.returncode not in (0, None), "a name with a control character was used"
    assert contents() == before
    if runner.failures:
        pytest.fail("\n".join(runner.failures), pytrace=False)
