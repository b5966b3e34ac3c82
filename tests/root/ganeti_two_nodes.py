"""A real two-node Ganeti cluster for root tests: ganeti_cluster.py plus a second node.

Node 1 is :class:`~tests.root.ganeti_cluster.GanetiCluster`'s node, the
master. Node 2 runs in namespaces of its own (mount, UTS, network, PID, held
by a reaper like node 1's), with its own scratch ``/etc/ganeti``,
``/var/lib/ganeti``, ``/var/log/ganeti``, ``/srv``, file storage and
``/var/cache/ganeti-instance-debootstrap`` (an empty cache given by the
test), the package's OS definition bound at the same paths as on node 1.

Network: node 1's bridge and a bridge of the same name on node 2 (Ganeti
checks that an instance's NIC link exists on its node) are joined by a veth
pair made inside node 1's network namespace, its far end moved into node
2's: nothing appears on the machine's own interfaces. Addresses come from
the documentation range 198.51.100.0/24, as node 1's.

SSH, which ``gnt-node add`` (node-daemon-setup through ssh), ``gnt-cluster
copyfile`` (scp), ``gnt-cluster command`` and ``gnt-cluster verify`` (each
node's daemon ssh-ing to the others) use: each node runs an sshd listening on
its own address, with a host key and root key pair made for the run in the
work directory. The cluster is initialised with ``--no-ssh-init``
(modify_ssh_setup off: Ganeti leaves root's SSH files alone), so the
harness does the setup Ganeti would otherwise do, all inside the mount
namespaces: the host key's public half is bound over
``/etc/ssh/ssh_host_rsa_key.pub`` (``gnt-cluster init`` writes it as the
cluster's key into Ganeti's known_hosts, checked with HostKeyAlias), and an
``ssh_config`` naming the run's root key is bound over
``/etc/ssh/ssh_config``. The machine's ``/root/.ssh`` is never used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.root.ganeti_cluster import (
    BRIDGE,
    CLEAN_ENVIRONMENT,
    DAEMON_UTIL,
    NETMASK_BITS,
    SETUP_TIMEOUT,
    TEARDOWN_TIMEOUT,
    ClusterError,
    CommandFailed,
    GanetiCluster,
    Namespaces,
    TeardownError,
    run_bounded,
)

NODE2_NAME = "node2.gnt-test.example"
NODE2_IP = "198.51.100.3"
# The veth pair: node 1's end (on its bridge), node 2's end (on its bridge).
LINK_NODE1 = "gnt-n2"
LINK_NODE2 = "gnt-n1"
SSHD = "/usr/sbin/sshd"

_SSH_PROGRAMS = {SSHD: "openssh-server", "/usr/bin/ssh": "openssh-client",
                 "/usr/bin/scp": "openssh-client", "/usr/bin/ssh-keygen": "openssh-client"}


class TwoNodeCluster(GanetiCluster):
    """A two-node cluster: node 1 (master, GanetiCluster's) and node 2.

    ``node2_cache_dir`` is node 2's /var/cache/ganeti-instance-debootstrap;
    a package installation (``package_root``) is required, as it puts the
    definition at the same paths on both nodes.
    """

    def __init__(self, os_dir: str | os.PathLike[str], workdir: str | os.PathLike[str],
                 *, package_root: str | os.PathLike[str],
                 cache_dir: str | os.PathLike[str],
                 node2_cache_dir: str | os.PathLike[str], os_name: str = "debootstrap",
                 ) -> None:
        super().__init__(os_dir, workdir, os_name=os_name, package_root=package_root,
                         cache_dir=cache_dir)
        self.node2 = NODE2_NAME
        self.node2_cache_dir = Path(node2_cache_dir).resolve()
        self._node2_ns = Namespaces(self.workdir / "namespaces-node2.log")
        self._node2_started = False
        self._node2_baseline: list[str] | None = None

    # --- where node 2's things are, seen from the host -------------------------------

    @property
    def node2_root(self) -> Path:
        return self.workdir / "node2"

    @property
    def node2_storage_dir(self) -> Path:
        """What node 2 sees at file_storage_dir (its own file disks)."""
        return self.node2_root / "storage"

    @property
    def node2_state_dir(self) -> Path:
        return self.node2_root / "var-lib-ganeti"

    @property
    def node2_os_log_dir(self) -> Path:
        return self.node2_root / "var-log-ganeti" / "os"

    @property
    def ssh_dir(self) -> Path:
        return self.workdir / "ssh"

    def node2_os_logs(self, since: float = 0.0) -> list[Path]:
        """Node 2's OS script logs modified at or after ``since``, oldest first."""
        if not self.node2_os_log_dir.is_dir():
            return []
        logs = [p for p in self.node2_os_log_dir.iterdir()
                if p.is_file() and p.stat().st_mtime >= since - 1]
        return sorted(logs, key=lambda p: p.stat().st_mtime)

    # --- commands on node 2 ---------------------------------------------------------

    def run_on_node2(self, *argv: str, check: bool = True, timeout: float | None = None,
                     ) -> subprocess.CompletedProcess[str]:
        """Like run(), on node 2."""
        start = time.monotonic()
        try:
            proc = self._probe(*argv, timeout=timeout or self.command_timeout,
                               where=self._node2_ns)
        finally:
            self.timings.append((f"[node2] {' '.join(argv)}", time.monotonic() - start))
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stdout)
        return proc

    def instance_disk_path(self, instance: str, index: int = 0) -> Path:
        """The file backing the disk, seen from the host on whichever node holds it."""
        path = super().instance_disk_path(instance, index)
        primary = self.run("gnt-instance", "list", "--no-headers", "--output=pnode",
                           instance).stdout.strip()
        if primary == NODE2_NAME:
            return self.node2_storage_dir / path.relative_to(self.file_storage_dir)
        return path

    def node2_leftover_mounts(self) -> list[str]:
        if self._node2_baseline is None:
            raise ClusterError("node 2's mount namespace is not set up")
        baseline = set(self._node2_baseline)
        return [m for m in self._node2_ns.mounts() if m not in baseline]

    def processes(self) -> list[int]:
        return super().processes() + self._node2_ns.processes()

    # --- setup ------------------------------------------------------------------------

    def _start(self) -> None:
        missing = [f"{prog} (Debian package {pkg})" for prog, pkg in _SSH_PROGRAMS.items()
                   if not os.access(prog, os.X_OK)]
        if missing:
            raise ClusterError("the two-node Ganeti test cluster needs " + ", ".join(missing))
        super()._start()
        start = time.monotonic()
        self._start_node2()
        self.timings.append(("node 2 setup and gnt-node add", time.monotonic() - start))

    def _host_names(self) -> list[tuple[str, str]]:
        return [*super()._host_names(), (NODE2_IP, NODE2_NAME)]

    def _write_scratch_tree(self) -> None:
        super()._write_scratch_tree()
        self._write_ssh_files()
        self._write_node_tree(self.node2_root)
        self.node2_storage_dir.mkdir()

    def _write_ssh_files(self) -> None:
        ssh = self.ssh_dir
        ssh.mkdir(mode=0o700)
        for key in ("host_rsa_key", "id_rsa"):
            proc = run_bounded(["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "",
                                "-C", f"gnt-test {key}", "-f", str(ssh / key)],
                               timeout=SETUP_TIMEOUT, env=CLEAN_ENVIRONMENT)
            if proc.returncode != 0:
                raise CommandFailed(["ssh-keygen"], proc.returncode, proc.stdout)
        (ssh / "authorized_keys").write_text((ssh / "id_rsa.pub").read_text())
        (ssh / "ssh_config").write_text(
            "# The two-node test cluster's client settings (ganeti_two_nodes.py).\n"
            "Host *\n"
            f"    IdentityFile {ssh / 'id_rsa'}\n"
            "    IdentitiesOnly yes\n")
        (ssh / "sshd_config").write_text(
            "# The two-node test cluster's sshd (ganeti_two_nodes.py).\n"
            f"HostKey {ssh / 'host_rsa_key'}\n"
            "PidFile /run/sshd.pid\n"
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # The work directory lies under /var/tmp (mode 1777).
            "StrictModes no\n"
            "Subsystem sftp internal-sftp\n")

    def _mount_scratch_tree(self) -> None:
        super()._mount_scratch_tree()
        self._mount_ssh_files(self._namespaces)

    def _mount_ssh_files(self, where: Namespaces) -> None:
        self._inside("mount", "--bind", str(self.ssh_dir / "host_rsa_key.pub"),
                     "/etc/ssh/ssh_host_rsa_key.pub", where=where)
        self._inside("mount", "--bind", str(self.ssh_dir / "ssh_config"),
                     "/etc/ssh/ssh_config", where=where)

    def _start_sshd(self, where: Namespaces, address: str) -> None:
        self._inside("mkdir", "-p", "-m", "755", "/run/sshd", where=where)
        self._inside(SSHD, "-f", str(self.ssh_dir / "sshd_config"),
                     "-o", f"ListenAddress={address}", where=where)

    def _start_node2(self) -> None:
        ns = self._node2_ns
        ns.start()
        self._node2_started = True
        self._mount_node_tree(ns, self.node2_root, NODE2_NAME, self.node2_cache_dir)
        self._inside("mount", "--bind", str(self.node2_storage_dir),
                     str(self.file_storage_dir), where=ns)
        self._mount_ssh_files(ns)
        self._node2_baseline = ns.mounts()
        self._link_nodes()
        node1_ip = self._host_names()[0][0]
        self._start_sshd(self._namespaces, node1_ip)
        self._start_sshd(ns, NODE2_IP)
        self.run("gnt-node", "add", NODE2_NAME, timeout=SETUP_TIMEOUT)
        self._wait_until(f"{NODE2_NAME} is an online node",
                         lambda: f"{NODE2_NAME}|N" in self._probe(
                             "gnt-node", "list", "--no-headers", "--separator=|",
                             "--output=name,offline").stdout)

    def _link_nodes(self) -> None:
        """A veth pair between node 1's bridge and a bridge of node 2's."""
        assert self._namespaces.init_pid is not None and self._node2_ns.init_pid is not None
        # Made inside node 1's network namespace (never on the machine's),
        # the far end moved straight into node 2's; the host's /proc names
        # node 2's init.
        argv = ["nsenter", f"--net=/proc/{self._namespaces.init_pid}/ns/net", "--",
                "ip", "link", "add", LINK_NODE1, "type", "veth", "peer", "name",
                LINK_NODE2, "netns", str(self._node2_ns.init_pid)]
        proc = run_bounded(argv, timeout=SETUP_TIMEOUT, env=CLEAN_ENVIRONMENT)
        if proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stdout)
        self._inside("ip", "link", "set", LINK_NODE1, "master", BRIDGE)
        self._inside("ip", "link", "set", LINK_NODE1, "up")
        ns = self._node2_ns
        for argv2 in (["ip", "link", "set", "lo", "up"],
                      ["ip", "link", "add", BRIDGE, "type", "bridge"],
                      ["ip", "link", "set", LINK_NODE2, "master", BRIDGE],
                      ["ip", "address", "add", f"{NODE2_IP}/{NETMASK_BITS}", "dev", BRIDGE],
                      ["ip", "link", "set", LINK_NODE2, "up"],
                      ["ip", "link", "set", BRIDGE, "up"]):
            self._inside(*argv2, where=ns)

    # --- teardown ---------------------------------------------------------------------

    def _teardown_steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("look for mounts left inside node 2", self._check_node2_mounts),
            ("stop node 2's Ganeti daemons", self._stop_node2_daemons),
            ("end node 2's namespaces", self._node2_ns.stop),
            *super()._teardown_steps(),
        ]

    def _check_node2_mounts(self) -> None:
        if self._node2_baseline is not None and self._node2_ns.init_pid is not None:
            leftovers = self.node2_leftover_mounts()
            if leftovers:
                raise TeardownError(f"mounts left inside node 2 (released with its "
                                    f"mount namespace): {leftovers}")

    def _stop_node2_daemons(self) -> None:
        if self._node2_started and self._node2_ns.init_pid is not None:
            proc = run_bounded(self._node2_ns.command([DAEMON_UTIL, "stop-all"]),
                               timeout=TEARDOWN_TIMEOUT, env=CLEAN_ENVIRONMENT)
            if proc.returncode != 0:
                raise CommandFailed([DAEMON_UTIL, "stop-all"], proc.returncode,
                                    proc.stdout)

    def _delete_storage(self) -> None:
        super()._delete_storage()
        for directory in (self.node2_storage_dir, self.node2_state_dir / "export"):
            if directory.exists():
                shutil.rmtree(directory)
