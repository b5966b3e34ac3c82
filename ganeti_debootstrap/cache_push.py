"""``push``: this node's cache entries copied to the other nodes of its Ganeti cluster.

Ganeti moves the bytes and runs the commands; this module decides what to
send and makes each node take it as if it had made it. What Ganeti 3.0's
tools do (``lib/client/gnt_cluster.py``, ``lib/ssh.py``) and what follows:

- ``gnt-cluster copyfile [-n NODE]... FILE`` runs ``scp -p`` from the
  master to the same path on each node, as root. scp writes the file in
  place (a reader could see it half-written), keeps modes and times to the
  second only (a record's ``mtime_ns`` would no longer vouch for the
  archive) and copyfile exits 0 even when a copy failed (it says so on
  stderr). So nothing is copied to its real name: each file of an entry
  goes under a push name (``.push-<token>-<name>``, which nothing in the
  cache takes for an entry), and a manifest goes last: every file's name,
  size, mode, exact mtime and SHA-256.
- ``gnt-cluster command [-n NODE]... LINE`` runs one shell line per node
  over ssh and prints each node's output (stdout and stderr) between
  ``node: NAME`` and ``return code = N``; it too exits 0 whatever the
  nodes returned. Our own commands on the nodes (the hidden ``key`` and
  ``receive`` subcommands) print their result as one JSON line behind
  :data:`REPORT_MARKER`, read back here per node.

A push, per entry: on the master, under the key's shared lock (a refresh
or expiry of the entry waits; creates go on), each file of the entry is
hard-linked to its push name, so what is sent cannot change under it;
images go first, then the record, the archive, the manifest. On each node,
``receive`` takes the key's exclusive lock (the node's creates wait for
it), checks every file against the manifest (a failed or partial copy
shows there), gives it root's ownership, its mode and its exact mtime,
and renames it to its real name, archive last, then syncs the directory:
a create sees the old entry or the whole new one, and its lookup vouches
for the archive through the record as on the master. Push names are
removed on both sides whatever happens (and on a node, those a killed
push left, after a day, as does expiry).

Before anything is copied, push refuses to run anywhere but on the master,
and refuses nodes whose settings give other keys for the variants (each
node's keys come from its own ``key`` subcommand, run by
``gnt-cluster command``): an entry pushed there would never be used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shlex
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import cache_images, progress, runner
from .cache_store import (INPUTS_SUFFIX, MANIFEST_SUFFIX, Cache, CacheEntry, CacheKey,
                          image_name, image_record_name, push_name, pushed_name)
from .errors import CacheError, ClusterError, DefinitionError
from .fsutil import atomic_write, fsync_path

logger = logging.getLogger(__name__)

GNT_CLUSTER = "gnt-cluster"
GNT_NODE = "gnt-node"
# What our commands on the nodes print before their one-line JSON result.
REPORT_MARKER = "ganeti-debootstrap-cache-report: "
# gnt-cluster command's separator between nodes and the line ending each.
_SEPARATOR = "-" * 48
_RETURN_CODE = "return code = "
MANIFEST_FORMAT = 1
_HASH_BLOCK = 1 << 20


# --- the cluster, through Ganeti's commands ------------------------------------------

@dataclass(frozen=True)
class ClusterView:
    """The master (this node) and the other online nodes."""

    master: str
    nodes: tuple[str, ...]


def this_node_names() -> set[str]:
    """The names this node goes by (Ganeti names a node by its FQDN)."""
    name = socket.gethostname()
    return {name, socket.getfqdn(name)}


def find_cluster(myself: set[str], program: str) -> ClusterView:
    """The cluster as seen from here; refuse (ClusterError) unless this is its master."""
    try:
        master = runner.output([GNT_CLUSTER, "getmaster"])
    except DefinitionError as exc:
        raise ClusterError(f"This node is not in a Ganeti cluster (gnt-cluster getmaster "
                           f"failed: {exc}). {program} push copies this node's cache "
                           f"to the other nodes of its cluster; run it on the master.") \
            from exc
    if master not in myself:
        raise ClusterError(
            f"This node ({', '.join(sorted(myself))}) is not the master of its Ganeti "
            f"cluster; {master} is. gnt-cluster copyfile copies only from the master: "
            f"run '{program} push' there (e.g. 'ssh {master} {program} push --all'), "
            f"after building or refreshing the entries there.")
    listed = runner.output([GNT_NODE, "list", "--no-headers", "--separator=|",
                            "--output=name,offline"])
    nodes = []
    for line in listed.splitlines():
        name, _, offline = line.strip().partition("|")
        if name and name != master and offline.strip() == "N":
            nodes.append(name)
    return ClusterView(master, tuple(nodes))


@dataclass
class NodeOutput:
    """What one node printed for a gnt-cluster command, and its exit status."""

    node: str
    lines: list[str] = field(default_factory=list)
    status: int | None = None

    def report(self) -> dict[str, Any] | None:
        """The JSON result our command printed there, or None."""
        for line in reversed(self.lines):
            if line.startswith(REPORT_MARKER):
                with contextlib.suppress(ValueError):
                    data = json.loads(line[len(REPORT_MARKER):])
                    if isinstance(data, dict):
                        return data
        return None

    def tail(self, count: int = 5) -> str:
        shown = [line for line in self.lines if not line.startswith(REPORT_MARKER)]
        return " / ".join(line.strip() for line in shown[-count:] if line.strip()) \
            or "no output"


def parse_command_output(text: str) -> dict[str, NodeOutput]:
    """gnt-cluster command's output, per node."""
    found: dict[str, NodeOutput] = {}
    current: NodeOutput | None = None
    for line in text.splitlines():
        if line == _SEPARATOR:
            current = None
        elif current is None and line.startswith("node: "):
            current = found.setdefault(line[len("node: "):].strip(),
                                       NodeOutput(line[len("node: "):].strip()))
        elif current is not None and line.startswith(_RETURN_CODE):
            with contextlib.suppress(ValueError):
                current.status = int(line[len(_RETURN_CODE):])
        elif current is not None:
            current.lines.append(line)
    return found


def node_option(nodes: Sequence[str]) -> list[str]:
    return [arg for node in nodes for arg in ("-n", node)]


def run_on_nodes(nodes: Sequence[str], argv: Sequence[str]) -> dict[str, NodeOutput]:
    """Run argv on ``nodes`` through gnt-cluster command; each node's output."""
    out = runner.output([GNT_CLUSTER, "command", *node_option(nodes), shlex.join(argv)])
    parsed = parse_command_output(out)
    return {node: parsed.get(node, NodeOutput(node)) for node in nodes}


def print_report(data: dict[str, Any]) -> str:
    """The line our commands on a node print for push to read."""
    return REPORT_MARKER + json.dumps(data, sort_keys=True) + "\n"


# --- on every node: its keys and entries (the hidden ``key`` subcommand) ------------

def node_entries(store: Cache) -> dict[str, dict[str, Any]]:
    """The node's entries whose records vouch for their archives: size, mtime, images."""
    entries = {}
    for a in store.archives():
        record = a.record or {}
        if a.key is None:
            continue
        st = os.stat(a.path)
        if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
            continue
        entries[a.stem] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "refreshed": a.refreshed,
                           "images": [i.fstype for i in a.images]}
    return entries


def key_report(labels: dict[str, str], store: Cache) -> dict[str, Any]:
    """What ``key`` prints: this node's key per variant label, its entries."""
    return {"node": socket.getfqdn(), "cache_dir": store.directory,
            "cache_dir_exists": os.path.isdir(store.directory), "keys": labels,
            "entries": node_entries(store) if store.exists() else {}}


# --- on the master: what an entry is made of --------------------------------------------

@dataclass(frozen=True)
class EntryFile:
    """One file of an entry as the manifest describes it."""

    name: str
    size: int
    mode: int
    mtime_ns: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "mode": self.mode,
                "mtime_ns": self.mtime_ns, "sha256": self.sha256}


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def entry_names(entry: CacheEntry, fstypes: Sequence[str]) -> list[str]:
    """The entry's files in the order they are sent and put in place: data first,
    its record after it, the archive (what makes the entry usable) last."""
    stem = entry.key.stem
    names = []
    for fstype in fstypes:
        names += [image_name(stem, fstype), image_record_name(stem, fstype)]
    return names + [stem + INPUTS_SUFFIX, os.path.basename(entry.path)]


def usable_images(entry: CacheEntry, store: Cache) -> list[str]:
    """The filesystem types whose images were made from the archive as it is."""
    return [t for t in store.image_types(entry.key)
            if cache_images.lookup(entry, t) is not None]


@dataclass
class Outgoing:
    """An entry's files linked to their push names on the master, and the manifest."""

    directory: str
    token: str
    stem: str
    files: list[EntryFile]
    manifest: str

    @property
    def paths(self) -> list[str]:
        """The push names, in sending order, manifest last."""
        return [os.path.join(self.directory, push_name(f.name, self.token))
                for f in self.files] + [self.manifest]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@contextlib.contextmanager
def outgoing(store: Cache, entry: CacheEntry, fstypes: Sequence[str]) -> Iterator[Outgoing]:
    """Link the entry's files to push names and write the manifest; removed after.

    The caller holds the key's lock: the files cannot be replaced meanwhile,
    and a link keeps what it linked even when one is replaced later.
    """
    token = secrets.token_hex(6)
    directory = store.directory
    made: list[str] = []
    try:
        files = []
        for name in entry_names(entry, fstypes):
            real = os.path.join(directory, name)
            link = os.path.join(directory, push_name(name, token))
            os.link(real, link)
            made.append(link)
            st = os.stat(link)
            files.append(EntryFile(name, st.st_size, stat.S_IMODE(st.st_mode),
                                   st.st_mtime_ns, file_digest(link)))
        manifest = os.path.join(directory, push_name(entry.key.stem + MANIFEST_SUFFIX, token))
        data = {"format": MANIFEST_FORMAT, "stem": entry.key.stem,
                "key": entry.key.inputs(), "files": [f.as_json() for f in files]}
        made.append(manifest)
        atomic_write(manifest, json.dumps(data, indent=2) + "\n", mode=0o600,
                     tmp_prefix=push_name(entry.key.stem + MANIFEST_SUFFIX + ".", token))
        yield Outgoing(directory, token, entry.key.stem, files, manifest)
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def copy_to_nodes(sending: Outgoing, nodes: Sequence[str],
                  terminal: progress.Terminal | None) -> None:
    """gnt-cluster copyfile of every push name to ``nodes``, manifest last."""
    for n, path in enumerate(sending.paths, 1):
        label = (f"{sending.stem}: copying file {n}/{len(sending.paths)} to "
                 f"{len(nodes)} node(s)")
        with progress.status(terminal, label):
            # Its exit status says nothing of the nodes' copies (see above):
            # receive checks every file against the manifest.
            runner.run([GNT_CLUSTER, "copyfile", *node_option(nodes), path],
                       hint="gnt-cluster copyfile failed; 'gnt-cluster verify' "
                            "checks the nodes' ssh set-up.")


# --- on every other node: taking a pushed entry in (the hidden ``receive``) -----------

def _manifest_files(data: object, stem: str) -> list[EntryFile]:
    """The manifest's files, each checked to be one of the entry ``stem``'s."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT \
            or not isinstance(data.get("files"), list):
        raise CacheError("The push manifest is not one this version reads; push "
                         "from a master running the same version.")
    files = []
    for item in data["files"]:
        try:
            f = EntryFile(str(item["name"]), int(item["size"]), int(item["mode"]),
                          int(item["mtime_ns"]), str(item["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"The push manifest has an unreadable file entry: {exc}") \
                from exc
        parsed = pushed_name(push_name(f.name, "0"))
        if parsed is None or parsed[1] != stem or f.name.endswith(MANIFEST_SUFFIX) \
                or f.mode & ~0o777:
            raise CacheError(f"The push manifest names {f.name!r}, which is not a file "
                             f"of the cache entry {stem}.")
        files.append(f)
    if not files or not files[-1].name.endswith(".tar"):
        raise CacheError(f"The push manifest of {stem} does not end with its archive.")
    return files


def _check_received(path: str, f: EntryFile) -> str:
    """What is wrong with the received file ``path`` (a push name), or ""."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{f.name} did not arrive (gnt-cluster copyfile failed for this node?)"
    if not stat.S_ISREG(st.st_mode):
        return f"{f.name} arrived as something other than a file"
    if st.st_size != f.size:
        return f"{f.name} arrived with {st.st_size} bytes of {f.size} (a copy cut short?)"
    if file_digest(path) != f.sha256:
        return f"{f.name} arrived with other contents than the master's (SHA-256 differs)"
    return ""


def receive(store: Cache, manifest_path: str) -> dict[str, Any]:
    """Put the pushed entry described by ``manifest_path`` in place; its report.

    Every push name of the manifest is removed at the end, used or not.
    """
    directory = store.directory
    name = os.path.basename(manifest_path)
    parsed = pushed_name(name)
    if os.path.dirname(os.path.abspath(manifest_path)) != os.path.abspath(directory) \
            or parsed is None or not name.endswith(MANIFEST_SUFFIX):
        raise CacheError(f"{manifest_path} is not a push manifest in the cache "
                         f"directory {directory}.")
    token, stem, _ = parsed
    start = time.monotonic()
    try:
        st = os.lstat(manifest_path)
        # receive runs as root (the command refuses anyone else): the
        # manifest and the files come from the master's root through scp.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise CacheError(f"{manifest_path} is not a file of root's alone; not "
                             f"trusting it.")
        with open(manifest_path, encoding="utf-8") as fh:
            data = json.load(fh)
        files = _manifest_files(data, stem)
        key = CacheKey.from_inputs(data.get("key"))
        if key is None or key.stem != stem:
            raise CacheError(f"The push manifest of {stem} records another key.")
        with store.using(key, lambda: None):
            problems = [p for f in files
                        if (p := _check_received(os.path.join(directory,
                                                              push_name(f.name, token)), f))]
            if problems:
                raise CacheError("; ".join(problems))
            for f in files:
                path = os.path.join(directory, push_name(f.name, token))
                os.chown(path, os.geteuid(), os.getegid())
                os.chmod(path, f.mode)
                os.utime(path, ns=(f.mtime_ns, f.mtime_ns))
                fsync_path(path)
            for f in files:
                os.replace(os.path.join(directory, push_name(f.name, token)),
                           os.path.join(directory, f.name))
            fsync_path(directory)
        logger.info("Received the cache %s (%d files, %.0f MiB)", stem, len(files),
                    sum(f.size for f in files) / 2**20)
        return {"node": socket.getfqdn(), "entry": stem, "status": "received",
                "bytes": sum(f.size for f in files),
                "seconds": round(time.monotonic() - start, 1), "error": None}
    finally:
        for other in os.listdir(directory):
            ours = pushed_name(other)
            if ours is not None and ours[0] == token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, other))
        store.remove_stale_pushes(time.time())
