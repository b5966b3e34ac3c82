"""A real one-node Ganeti cluster for root tests, shut away in its own namespaces.

``GanetiCluster`` runs Debian's Ganeti 3.0 for real on this machine: daemons,
jobs, the node daemon calling our OS scripts, file-backed instance disks and
the fake hypervisor (it "runs" instances without booting them). Everything
Ganeti does happens inside private namespaces held by one reaper process:

- mount: scratch directories are bind-mounted over ``/etc/ganeti``,
  ``/var/lib/ganeti``, ``/var/log/ganeti``, ``/srv`` and ``/etc/hosts``, and
  ``/run`` is a fresh tmpfs. Ganeti keeps its state at these fixed paths;
  this way the node's own files are never written, so there is nothing to
  back up and nothing to restore when a run dies half-way. The fresh
  ``/run`` also matters because ``daemon-util`` hands the daemons to systemd
  when ``/run/systemd/system`` exists.
- network: an empty bridge is the master netdev and the NIC link, with
  addresses from the documentation range 198.51.100.0/24 that the host's
  interfaces never see. ``/sys`` is remounted because Ganeti looks for
  bridges in ``/sys/class/net``, which shows the mounting namespace's links.
- UTS: the hostname is the node name (Ganeti takes the node's identity from
  ``gethostname()`` and resolves it through ``/etc/hosts``).
- PID: the reaper is the namespace's init. Killing it kills every daemon and
  OS script inside, so teardown cannot miss a process; ``setpriv
  --pdeathsig`` kills it if the test process itself dies.

Ganeti finds our OS definition first through ``/srv/ganeti/os/<name>``, a
symlink to the installed definition (the first of its OS search path).
With ``package_root`` (a Debian package unpacked with ``dpkg-deb -x``) it
finds it where the package installs it instead: inside the mount namespace
the package's OS directory is bound at ``/usr/share/ganeti/os/<name>`` (the
rest of ``/usr/share/ganeti`` stays the node's), its ``/etc`` files are in
the cluster's ``/etc/ganeti`` and a scratch ``/etc/default``, and
``/var/cache/ganeti-instance-debootstrap`` is the given cache directory.
Instance disks live in the test's work directory at the same path inside
and outside, so a test can inspect them from the host.

Commands run through :mod:`subprocess` rather than the project's runner: the
daemons must start with a clean environment (the runner's inherits ours),
assertions need stdout and stderr merged in order, and a timed-out command
must be killed with its process group (``nsenter`` forks the command into
the PID namespace).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.debpackage import copy_clean_tree

NODE_NAME = "node1.gnt-test.example"
CLUSTER_NAME = "cluster.gnt-test.example"
NODE_IP = "198.51.100.1"
MASTER_IP = "198.51.100.2"
NETMASK_BITS = 24
BRIDGE = "gnt-br0"

# What Ganeti's own processes get: no variable of ours leaks into the
# daemons and, through them, into the OS scripts.
CLEAN_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
SYSTEM_PYTHON = "/usr/bin/python3"
DAEMON_UTIL = "/usr/lib/ganeti/daemon-util"

# Paths of the node that Ganeti writes and that the mount namespace covers.
# /run is not listed: it is a fresh tmpfs inside.
BOUND_DIRECTORIES = ("/etc/ganeti", "/var/lib/ganeti", "/var/log/ganeti", "/srv")

# What the package keeps in /etc/ganeti and the cluster's copy needs.
PACKAGE_LINKS = ("lib", "share")

# Where the Debian package of the OS definition puts it and its cache.
PACKAGE_OS_PARENT = "/usr/share/ganeti/os"
PACKAGE_CACHE_DIR = "/var/cache/ganeti-instance-debootstrap"
GANETI_SHARE = "/usr/share/ganeti"

SETUP_TIMEOUT = 120.0
COMMAND_TIMEOUT = 600.0
TEARDOWN_TIMEOUT = 60.0
OS_LOG_TAIL_LINES = 25

# The namespace's init: it reaps the daemons that daemon-util detaches (as
# PID 1 of the namespace it inherits them), so that a stopped daemon does not
# linger as a zombie that start-stop-daemon still sees.
_REAPER = """\
import os
import signal

def reap(signum, frame):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

signal.signal(signal.SIGCHLD, reap)
while True:
    signal.pause()
"""

# Debian packages whose programs the harness runs itself.
_PROGRAMS = {
    "gnt-cluster": "ganeti", "nsenter": "util-linux", "unshare": "util-linux",
    "setpriv": "util-linux", "ip": "iproute2", "losetup": "mount",
}


class ClusterError(Exception):
    """The cluster could not be set up, or a command inside it failed."""


class CommandFailed(ClusterError):
    """A command inside the cluster failed; the message holds its output."""

    def __init__(self, argv: Sequence[str], returncode: int | None, output: str,
                 os_logs: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        status = ("timed out" if returncode is None
                  else f"failed with exit status {returncode}")
        text = f"{' '.join(argv)} {status}; its output:\n{output.rstrip()}"
        if os_logs:
            text += f"\n{os_logs}"
        super().__init__(text)


class TeardownError(ClusterError):
    """Teardown could not release everything, or found resources left behind."""


def run_bounded(argv: Sequence[str], *, timeout: float,
                env: dict[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """Run argv with stdout and stderr merged; kill its process group on timeout.

    Never raises for a non-zero exit; a timeout raises CommandFailed with
    the output so far.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = _kill_group(proc)
        raise CommandFailed(argv, None, _text(out)
                            + f"\n[killed after {timeout:.0f} s]") from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, _text(out))


def _kill_group(proc: subprocess.Popen[bytes]) -> bytes:
    """Kill proc's process group; return what it wrote meanwhile."""
    # nsenter forked the command into the PID namespace: only the whole
    # process group takes both down.
    with _ignoring(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        # A daemon that left the group still holds the pipe: stop reading.
        proc.kill()
        out = b""
    return out or b""


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


@contextmanager
def _ignoring(*errors: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except errors:
        pass


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: split after
            # the last ")".
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    # /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, which this
    # kernel lacks: scan the process table instead.
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and _parent_pid(int(name)) == pid]


def _namespace_id(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


class Namespaces:
    """Private mount, UTS, network and PID namespaces held by a reaper init."""

    def __init__(self, log_file: Path) -> None:
        self._log_file = log_file
        self._holder: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.pid_namespace: str | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Create the namespaces; returns once their init is running."""
        with open(self._log_file, "ab") as log:
            self._holder = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL",
                 "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "--mount", "--uts", "--net", "--propagation", "private",
                 "--", SYSTEM_PYTHON, "-c", _REAPER],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=CLEAN_ENVIRONMENT, start_new_session=True)
        own_mnt = _namespace_id("self", "mnt")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._holder.poll() is not None:
                raise ClusterError(
                    f"unshare exited with status {self._holder.returncode} "
                    f"before the namespaces were up; see {self._log_file}")
            for child in _children(self._holder.pid):
                # Ready once the child has exec'd the reaper: unshare mounts
                # the namespace's /proc before that.
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                if (cmdline.startswith(SYSTEM_PYTHON.encode())
                        and _namespace_id(child, "mnt") != own_mnt):
                    self.init_pid = child
                    self.pid_namespace = _namespace_id(child, "pid")
                    return
            time.sleep(0.02)
        raise ClusterError(f"the namespaces' init did not start within {timeout:.0f} s")

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside all the namespaces."""
        if self.init_pid is None:
            raise ClusterError("the namespaces are not running")
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--uts",
                "--net", "--pid", "--wd=/", "--", *argv]

    def processes(self) -> list[int]:
        """PIDs (as the host sees them) of every process inside."""
        if self.pid_namespace is None:
            return []
        return [int(name) for name in os.listdir("/proc") if name.isdigit()
                and _namespace_id(name, "pid") == self.pid_namespace]

    def mounts(self) -> list[str]:
        """The mount table inside, as "source mountpoint type" lines."""
        if self.init_pid is None:
            return []
        with open(f"/proc/{self.init_pid}/mounts") as f:
            return [" ".join(line.split()[:3]) for line in f]

    def stop(self, timeout: float = TEARDOWN_TIMEOUT) -> None:
        """Kill everything inside; the namespaces and their mounts go with it."""
        if self._holder is None:
            return
        if self.init_pid is not None and self._holder.poll() is None:
            # SIGKILL to a PID namespace's init kills every process in it;
            # unshare (--kill-child) then exits.
            with _ignoring(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        else:
            with _ignoring(ProcessLookupError):
                self._holder.kill()
        try:
            self._holder.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._holder.kill()
            self._holder.wait(timeout=timeout)
        left = self.processes()
        if left:
            raise TeardownError(f"processes still alive in the cluster's PID "
                                f"namespace after {timeout:.0f} s: {left}")
        self.init_pid = None


class GanetiCluster:
    """A one-node Ganeti cluster with a file storage dir and the fake hypervisor.

    Usage::

        with GanetiCluster(os_dir=..., workdir=tmp) as cluster:
            cluster.run("gnt-os", "diagnose")
            cluster.instance_disk_path("inst1")

    ``os_dir`` is the installed OS definition (the directory holding
    ``create`` ...); Ganeti sees it as ``/srv/ganeti/os/<os_name>``.
    ``workdir`` receives the cluster's state, logs and instance disks; the
    disks and exports are deleted at teardown, the logs are kept.
    ``init_options`` are added to ``gnt-cluster init`` (later ones win).
    ``extra_os`` maps further OS names to their directories (seen as
    ``/srv/ganeti/os/<name>`` too), e.g. Debian's shell edition beside ours;
    ``binds`` maps node paths to directories bound over them inside the
    mount namespace only (a scratch ``/etc/default`` or ``/var/cache`` for
    such a definition, whose paths are fixed).
    """

    def __init__(self, os_dir: str | os.PathLike[str], workdir: str | os.PathLike[str],
                 *, os_name: str = "debootstrap", init_options: Sequence[str] = (),
                 command_timeout: float = COMMAND_TIMEOUT,
                 package_root: str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None,
                 extra_os: Mapping[str, str | os.PathLike[str]] | None = None,
                 binds: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        self.os_dir = Path(os_dir).resolve()
        self.extra_os = {name: Path(d).resolve() for name, d in (extra_os or {}).items()}
        self.extra_binds = {target: Path(d).resolve() for target, d in (binds or {}).items()}
        self.os_name = os_name
        self.package_root = Path(package_root).resolve() if package_root else None
        self.cache_dir = Path(cache_dir).resolve() if cache_dir else None
        if self.package_root is not None:
            if self.cache_dir is None:
                raise ClusterError("package_root needs cache_dir: the package's "
                                   "scripts keep their cache in " + PACKAGE_CACHE_DIR)
            self.os_dir = self.package_root / PACKAGE_OS_PARENT.lstrip("/") / os_name
        # Where Ganeti finds the definition, inside the namespaces.
        self.os_path = (f"{PACKAGE_OS_PARENT}/{os_name}" if self.package_root
                        else f"/srv/ganeti/os/{os_name}")
        self.workdir = Path(workdir).resolve()
        self.init_options = tuple(init_options)
        self.command_timeout = command_timeout
        self.node = NODE_NAME
        self.name = CLUSTER_NAME
        self.bridge = BRIDGE
        self.timings: list[tuple[str, float]] = []
        self._namespaces = Namespaces(self.workdir / "namespaces.log")
        self._baseline_mounts: list[str] | None = None
        self._started = False

    # --- where things are, seen from the host -------------------------------

    @property
    def file_storage_dir(self) -> Path:
        """Where Ganeti keeps file disks: <dir>/<instance>/<uuid>.file.diskN."""
        return self.workdir / "storage"

    @property
    def state_dir(self) -> Path:
        """What Ganeti sees as /var/lib/ganeti."""
        return self.workdir / "var-lib-ganeti"

    @property
    def export_dir(self) -> Path:
        """What Ganeti sees as /var/lib/ganeti/export (gnt-backup)."""
        return self.state_dir / "export"

    @property
    def log_dir(self) -> Path:
        """What Ganeti sees as /var/log/ganeti."""
        return self.workdir / "var-log-ganeti"

    @property
    def os_log_dir(self) -> Path:
        """Where the OS scripts' stdout and stderr end up, one file per call."""
        return self.log_dir / "os"

    @property
    def hosts_file(self) -> Path:
        return self.workdir / "hosts"

    # --- context manager ----------------------------------------------------

    def __enter__(self) -> Self:
        start = time.monotonic()
        try:
            self._start()
        except BaseException:
            self._teardown(failing=True)
            raise
        self.timings.append(("cluster setup", time.monotonic() - start))
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self._teardown(failing=exc_type is not None)

    # --- commands -----------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the cluster's namespaces with a clean environment.

        Returns the CompletedProcess (stdout holds stdout and stderr, in
        order). With ``check``, a non-zero exit raises CommandFailed with
        the output and the tail of every OS script log written meanwhile.
        """
        since = time.time()
        start = time.monotonic()
        try:
            proc = self._probe(*argv, timeout=timeout or self.command_timeout)
        finally:
            self.timings.append((" ".join(argv), time.monotonic() - start))
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stdout,
                                self.os_log_tails(since))
        return proc

    @contextmanager
    def serving(self, *argv: str) -> Iterator[subprocess.Popen[bytes]]:
        """Run a long-lived command (a test's server) inside node 1's
        namespaces while the block runs; its process group is killed after."""
        proc = subprocess.Popen(self._namespaces.command(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=CLEAN_ENVIRONMENT, start_new_session=True)
        try:
            yield proc
        finally:
            _kill_group(proc)

    def _probe(self, *argv: str, timeout: float = SETUP_TIMEOUT,
               where: Namespaces | None = None) -> subprocess.CompletedProcess[str]:
        """run() without the check and without a timing entry (for polling);
        in ``where`` (another node's namespaces) if given."""
        return run_bounded((where or self._namespaces).command(argv), timeout=timeout,
                           env=CLEAN_ENVIRONMENT)

    def instance_disk_path(self, instance: str, index: int = 0) -> Path:
        """The file backing the instance's disk ``index``, as Ganeti records it."""
        info = self.run("gnt-instance", "info", instance).stdout
        paths = []
        for match in re.finditer(r"logical_id: (\[.*\])", info):
            logical_id = ast.literal_eval(match.group(1))
            if len(logical_id) == 2 and isinstance(logical_id[1], str):
                paths.append(Path(logical_id[1]))
        if index >= len(paths):
            raise ClusterError(f"instance {instance} has no file disk {index}; "
                               f"gnt-instance info says:\n{info}")
        path = paths[index]
        if self.file_storage_dir not in path.parents:
            raise ClusterError(f"disk {index} of {instance} is {path}, outside "
                               f"the cluster's storage {self.file_storage_dir}")
        return path

    def os_logs(self, since: float = 0.0) -> list[Path]:
        """OS script logs modified at or after ``since`` (a time.time()), oldest first."""
        if not self.os_log_dir.is_dir():
            return []
        logs = [p for p in self.os_log_dir.iterdir()
                if p.is_file() and p.stat().st_mtime >= since - 1]
        return sorted(logs, key=lambda p: p.stat().st_mtime)

    def os_log_tails(self, since: float = 0.0,
                     lines: int = OS_LOG_TAIL_LINES) -> str:
        """The last lines of each OS log written since ``since``, for messages."""
        parts = []
        for log in self.os_logs(since):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last {len(tail)} lines of {log.name}:\n"
                         + "\n".join(tail))
        return "\n".join(parts)

    def leftover_mounts(self) -> list[str]:
        """Mounts inside the namespaces that were not there after setup.

        OS scripts mount instance filesystems inside the mount namespace,
        where the host's leak check cannot see them.
        """
        if self._baseline_mounts is None:
            raise ClusterError("the cluster's mount namespace is not set up")
        baseline = set(self._baseline_mounts)
        return [m for m in self._namespaces.mounts() if m not in baseline]

    def processes(self) -> list[int]:
        """PIDs, as the node sees them, of every process inside the cluster."""
        return self._namespaces.processes()

    def format_timings(self) -> str:
        """One line per measured step: seconds and what it was."""
        return "\n".join(f"{seconds:8.2f} s  {label}" for label, seconds in self.timings)

    # --- setup --------------------------------------------------------------

    def _start(self) -> None:
        _check_prerequisites()
        self._write_scratch_tree()
        self._namespaces.start()
        self._started = True
        self._mount_scratch_tree()
        self._baseline_mounts = self._namespaces.mounts()
        self._set_up_network()
        self._init_cluster()

    def _write_scratch_tree(self) -> None:
        if (self.workdir / "etc-ganeti").exists():
            raise ClusterError(f"{self.workdir} already holds a cluster; give "
                               f"each GanetiCluster an empty work directory")
        self.file_storage_dir.mkdir(parents=True)
        self._write_node_tree(self.workdir)
        if self.package_root is not None:
            self._write_shared_package_tree()
        self.hosts_file.write_text(
            "127.0.0.1 localhost\n"
            "::1 localhost ip6-localhost ip6-loopback\n"
            + "".join(f"{ip} {name} {name.split('.')[0]}\n"
                      for ip, name in self._host_names()))

    def _host_names(self) -> list[tuple[str, str]]:
        """(address, name) of every node and of the cluster, for /etc/hosts."""
        return [(NODE_IP, NODE_NAME), (MASTER_IP, CLUSTER_NAME)]

    def _write_node_tree(self, root: Path) -> None:
        """A node's own /etc/ganeti, /var/lib/ganeti, /var/log/ganeti and /srv
        (and the package's /etc/ganeti files and cache directory) under ``root``."""
        # Only the package's symlinks through which daemon-util and the
        # Python library are found (/usr/lib/ganeti/default -> /etc/ganeti/lib):
        # a real node's hooks or settings there must not act on this cluster.
        etc_ganeti = root / "etc-ganeti"
        etc_ganeti.mkdir(parents=True)
        for name in PACKAGE_LINKS:
            host_link = os.path.join("/etc/ganeti", name)
            if not os.path.islink(host_link):
                raise ClusterError(f"{host_link} is not the symlink the ganeti "
                                   f"package installs; reinstall the package")
            (etc_ganeti / name).symlink_to(os.readlink(host_link))
        # Ganeti refuses file storage outside the paths listed here.
        (etc_ganeti / "file-storage-paths").write_text(f"{self.file_storage_dir}\n")
        (root / "var-lib-ganeti").mkdir()
        (root / "var-log-ganeti").mkdir()
        if self.package_root is None:
            os_link = root / "srv" / "ganeti" / "os" / self.os_name
            os_link.parent.mkdir(parents=True)
            os_link.symlink_to(self.os_dir)
        else:
            (root / "srv").mkdir()
            shutil.copytree(self.package_root / "etc/ganeti/instance-debootstrap",
                            etc_ganeti / "instance-debootstrap", symlinks=True)
            (root / "var-cache" / "ganeti-instance-debootstrap").mkdir(parents=True)
        for name, directory in self.extra_os.items():
            os_link = root / "srv" / "ganeti" / "os" / name
            os_link.parent.mkdir(parents=True, exist_ok=True)
            os_link.symlink_to(directory)

    def _write_shared_package_tree(self) -> None:
        """The scratch directories every node shows the package's files through."""
        assert self.package_root is not None
        # /etc/default as the node has it (Ganeti reads /etc/default/ganeti),
        # plus the package's settings file.
        etc_default = self.workdir / "etc-default"
        shutil.copytree("/etc/default", etc_default, symlinks=True)
        shutil.copy2(self.package_root / "etc/default/ganeti-instance-debootstrap",
                     etc_default / "ganeti-instance-debootstrap")
        # /usr/share/ganeti: the node's entries (directories bound in at
        # mount time) and os/<name>, where the package's OS dir is bound.
        share = self.workdir / "usr-share-ganeti"
        share.mkdir()
        for entry in sorted(os.listdir(GANETI_SHARE)):
            host = os.path.join(GANETI_SHARE, entry)
            if os.path.islink(host):
                (share / entry).symlink_to(os.readlink(host))
            elif os.path.isdir(host):
                (share / entry).mkdir()
        (share / "os" / self.os_name).mkdir(parents=True)

    def _mount_package_tree(self, where: Namespaces, root: Path, cache_dir: Path) -> None:
        """Bind the package's files at its paths, inside ``where``'s mount namespace only."""
        share = self.workdir / "usr-share-ganeti"
        for entry in sorted(os.listdir(share)):
            if (share / entry).is_dir() and not (share / entry).is_symlink() \
                    and entry != "os":
                self._inside("mount", "--bind", os.path.join(GANETI_SHARE, entry),
                             str(share / entry), where=where)
        self._inside("mount", "--bind", str(self.os_dir),
                     str(share / "os" / self.os_name), where=where)
        var_cache = root / "var-cache"
        self._inside("mount", "--bind", str(cache_dir),
                     str(var_cache / "ganeti-instance-debootstrap"), where=where)
        self._inside("mount", "--rbind", str(share), GANETI_SHARE, where=where)
        self._inside("mount", "--rbind", str(var_cache), "/var/cache", where=where)
        self._inside("mount", "--bind", str(self.workdir / "etc-default"), "/etc/default",
                     where=where)

    def _inside(self, *argv: str, where: Namespaces | None = None) -> None:
        proc = self._probe(*argv, where=where)
        if proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stdout)

    def _mount_scratch_tree(self) -> None:
        self._mount_node_tree(self._namespaces, self.workdir, NODE_NAME, self.cache_dir)

    def _mount_node_tree(self, where: Namespaces, root: Path, hostname: str,
                         cache_dir: Path | None) -> None:
        """Show the node's scratch tree under ``root`` at Ganeti's paths, in ``where``."""
        self._inside("mount", "-t", "sysfs", "sysfs", "/sys", where=where)
        self._inside("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run", where=where)
        # /var/lock is /run/lock: Ganeti's lock files go there.
        self._inside("mkdir", "-m", "1777", "/run/lock", where=where)
        binds = {
            "/etc/ganeti": root / "etc-ganeti",
            "/var/lib/ganeti": root / "var-lib-ganeti",
            "/var/log/ganeti": root / "var-log-ganeti",
            "/srv": root / "srv",
            "/etc/hosts": self.hosts_file,
        }
        for target, source in binds.items():
            self._inside("mount", "--bind", str(source), target, where=where)
        if self.package_root is not None:
            assert cache_dir is not None
            self._mount_package_tree(where, root, cache_dir)
        for target, source in self.extra_binds.items():
            self._inside("mount", "--rbind", str(source), target, where=where)
        self._inside("hostname", hostname, where=where)

    def _set_up_network(self) -> None:
        self._inside("ip", "link", "set", "lo", "up")
        self._inside("ip", "link", "add", BRIDGE, "type", "bridge")
        self._inside("ip", "address", "add", f"{NODE_IP}/{NETMASK_BITS}", "dev", BRIDGE)
        self._inside("ip", "link", "set", BRIDGE, "up")

    def _init_cluster(self) -> None:
        self.run("gnt-cluster", "init", "--enabled-hypervisors=fake",
                 "--enabled-disk-templates=file",
                 f"--file-storage-dir={self.file_storage_dir}",
                 f"--master-netdev={BRIDGE}",
                 f"--nic-parameters=mode=bridged,link={BRIDGE}",
                 "--no-ssh-init", "--no-etc-hosts", *self.init_options,
                 CLUSTER_NAME, timeout=SETUP_TIMEOUT)
        # init returns once daemon-util started the daemons: wait until the
        # master daemon answers and the node daemon has brought the master
        # IP up (it first pings the address to see that it is free).
        self._wait_until("gnt-cluster getmaster names this node",
                         lambda: NODE_NAME in self._probe(
                             "gnt-cluster", "getmaster", timeout=30).stdout)
        self._wait_until(f"the master IP {MASTER_IP} is up on {BRIDGE}",
                         lambda: f" {MASTER_IP}/" in self._probe(
                             "ip", "-o", "address", "show", "dev", BRIDGE).stdout)

    def _wait_until(self, what: str, condition: Callable[[], bool],
                    timeout: float = SETUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise ClusterError(f"gave up after {timeout:.0f} s waiting until {what}")
            time.sleep(0.25)

    # --- teardown -----------------------------------------------------------

    def _teardown(self, failing: bool) -> None:
        """Release everything; keep going past failures; never mask ``failing``."""
        start = time.monotonic()
        problems: list[str] = []
        interrupted: BaseException | None = None
        steps = self._teardown_steps()
        for what, step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - collected and reported below
                problems.append(f"{what}: {err}")
            except BaseException as err:
                # Ctrl-C: finish releasing first, then let it through.
                interrupted = interrupted or err
        self.timings.append(("teardown", time.monotonic() - start))
        if interrupted is not None:
            raise interrupted
        if not problems:
            return
        message = "cluster teardown: " + "\n".join(problems)
        if failing:
            # The test's own error is what matters; do not replace it.
            print(message, file=sys.stderr)
        else:
            raise TeardownError(message)

    def _teardown_steps(self) -> list[tuple[str, Callable[[], None]]]:
        """What teardown does, in order: (what, how)."""
        return [
            ("look for mounts left inside", self._check_inside_mounts),
            ("stop the Ganeti daemons", self._stop_daemons),
            ("end the namespaces", self._namespaces.stop),
            ("release loop devices on the cluster's files", self._release_loops),
            ("delete instance disks and exports", self._delete_storage),
        ]

    def _check_inside_mounts(self) -> None:
        if self._baseline_mounts is not None and self._namespaces.init_pid is not None:
            leftovers = self.leftover_mounts()
            if leftovers:
                raise TeardownError(f"mounts left inside the cluster (released "
                                    f"with its mount namespace): {leftovers}")

    def _stop_daemons(self) -> None:
        # Orderly first, so that a daemon's own errors show in its log; the
        # namespace's end kills whatever remains.
        if self._started and self._namespaces.init_pid is not None:
            proc = run_bounded(self._namespaces.command([DAEMON_UTIL, "stop-all"]),
                               timeout=TEARDOWN_TIMEOUT, env=CLEAN_ENVIRONMENT)
            if proc.returncode != 0:
                raise CommandFailed([DAEMON_UTIL, "stop-all"], proc.returncode,
                                    proc.stdout)

    def _release_loops(self) -> None:
        leaked = loops_backed_by(self.workdir)
        for device in leaked:
            subprocess.run(["losetup", "--detach", device], capture_output=True,
                           timeout=TEARDOWN_TIMEOUT)
        if leaked:
            raise TeardownError(f"loop devices left on the cluster's files "
                                f"(now detached): {leaked}")

    def _delete_storage(self) -> None:
        # Instance disks are sparse but hold a whole Debian each; the logs
        # and the configuration stay for inspection.
        for directory in (self.file_storage_dir, self.export_dir):
            if directory.exists():
                shutil.rmtree(directory)


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ClusterError("a Ganeti cluster needs root")
    missing = [f"{prog} (Debian package {pkg})" for prog, pkg in _PROGRAMS.items()
               if shutil.which(prog, path=CLEAN_ENVIRONMENT["PATH"]) is None]
    if not os.access(DAEMON_UTIL, os.X_OK):
        missing.append(f"{DAEMON_UTIL} (Debian package ganeti)")
    missing += [f"directory {d} (Debian package ganeti)"
                for d in BOUND_DIRECTORIES if not os.path.isdir(d)]
    if missing:
        raise ClusterError(
            "the Ganeti test cluster needs: " + ", ".join(missing) + ". Install "
            "with apt-get install --no-install-recommends ganeti (without "
            "recommends, so that Debian's shell edition of "
            "ganeti-instance-debootstrap is not pulled in).")


def loops_backed_by(directory: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--raw",
                          "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, timeout=30).stdout
    prefix = os.path.join(os.fspath(directory), "")
    found = []
    for line in out.splitlines():
        name, _, back = line.partition(" ")
        if back.startswith(prefix):
            found.append(name)
    return found


# --- what a cluster could leave on the node, for before/after checks --------

# Node paths the cluster must leave untouched (the mount namespace covers
# them): where Ganeti keeps state, /srv/ganeti rather than all of /srv,
# and what Ganeti edits when asked to (hosts, hostname, root's SSH setup).
WATCHED_PATHS = ("/etc/ganeti", "/var/lib/ganeti", "/var/log/ganeti", "/srv/ganeti",
                 "/run/ganeti", "/etc/hosts", "/etc/hostname",
                 os.path.expanduser("~root/.ssh"))


def _entry(path: str) -> str:
    st = os.lstat(path)
    link = f" -> {os.readlink(path)}" if os.path.islink(path) else ""
    return f"{path} {st.st_mode:o} {st.st_size} {st.st_mtime_ns}{link}"


def _tree(path: str) -> list[str]:
    """path and everything under it, with type, mode, size and mtime."""
    if not os.path.lexists(path):
        return [f"{path} absent"]
    entries = [_entry(path)]
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirnames, filenames in os.walk(path):
            entries += [_entry(os.path.join(dirpath, n)) for n in dirnames + filenames]
    return sorted(entries)


def _under(path: str, directories: Sequence[str]) -> bool:
    return any(path == d or path.startswith(os.path.join(d, "")) for d in directories)


def host_state(*related: str | os.PathLike[str]) -> dict[str, list[str]]:
    """What a Ganeti run could change on the node, for before/after comparison.

    Other tests may run at the same time and attach loop devices or mount
    things of their own: only loop devices backed by files under ``related``
    directories, and mounts on or from them or the watched paths, count.
    Ganeti processes count only in the node's own PID namespace (ours run in
    the cluster's, which ends with it).
    """
    related_dirs = [os.fspath(Path(d).resolve()) for d in related]
    watched = [*related_dirs, *WATCHED_PATHS]

    def lines(argv: list[str]) -> list[str]:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        return sorted(line.strip() for line in out.splitlines() if line.strip())

    own_pid_namespace = _namespace_id("self", "pid")
    processes = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _namespace_id(name, "pid") == own_pid_namespace:
            try:
                comm = Path(f"/proc/{name}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("ganeti-"):
                processes.append(f"{name} {comm}")
    with open("/proc/self/mounts") as f:
        mounts = sorted(" ".join(fields[:3]) for fields in (line.split() for line in f)
                        if _under(fields[1], watched) or _under(fields[0], related_dirs))
    loops = [line for line in lines(["losetup", "--list", "--noheadings", "--raw",
                                     "--output", "NAME,BACK-FILE"])
             if _under(line.partition(" ")[2], related_dirs)]
    files = [entry for path in WATCHED_PATHS for entry in _tree(path)]
    return {
        "mounts": mounts,
        "loop devices": loops,
        "network namespaces": lines(["ip", "netns", "list"]),
        "addresses": lines(["ip", "-o", "address", "show"]),
        "hostname": [os.uname().nodename],
        "ganeti processes": sorted(processes),
        "files": files,
    }


def state_differences(before: dict[str, list[str]],
                      after: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """What was added or removed between two host_state() snapshots."""
    diff = {}
    for key in before.keys() | after.keys():
        old, new = set(before.get(key, [])), set(after.get(key, []))
        if old != new:
            diff[key] = {"added": sorted(new - old), "removed": sorted(old - new)}
    return diff


# --- building and installing the OS definition ------------------------------

def install_os_definition(source_root: Path, workdir: Path, localstatedir: Path,
                          *, timeout: float = 600.0) -> Path:
    """Build a copy of the source and ``make install`` it under ``workdir``.

    sysconfdir is scratch (the node's /etc/default stays untouched);
    ``localstatedir`` is where the scripts keep their bootstrap cache.
    Returns the installed OS directory (the one holding ``create``).
    """
    srcdir = workdir / "source"
    prefix = workdir / "prefix"
    copy_clean_tree(source_root, srcdir)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DESTDIR", "PYTHON",
                        "CONFIG_SITE", "PYTHONPATH")}
    env["LC_ALL"] = "C"
    steps = [
        ["./autogen.sh"],
        ["./configure", f"--prefix={prefix}", f"--sysconfdir={prefix}/etc",
         f"--localstatedir={localstatedir}", f"--with-os-dir={prefix}/os"],
        ["make"],
        ["make", "install"],
    ]
    for argv in steps:
        proc = run_bounded(argv, timeout=timeout, env=env, cwd=srcdir)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise ClusterError(f"{' '.join(argv)} in {srcdir} failed with exit "
                               f"status {proc.returncode}:\n{tail}")
    os_dir = prefix / "os" / "debootstrap"
    if not (os_dir / "create").is_file():
        raise ClusterError(f"make install left no {os_dir}/create")
    return os_dir
