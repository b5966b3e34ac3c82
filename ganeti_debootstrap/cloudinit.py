"""A cloud-init NoCloud seed in the instance (OS parameter ``cloud_init=nocloud``).

cloud-init finds the seed in /var/lib/cloud/seed/nocloud at its first boot:

- ``meta-data``: ``instance-id`` (Ganeti's instance UUID, so a reinstall is
  the same instance and a new instance a new one) and ``local-hostname``.
- ``network-config`` (version 2): the addresses our own network files would
  carry, from the same NIC variables (network.nic_configs), matched by MAC
  and named ``nicN`` as our .link files name them.
- ``user-data``: the private OS parameter ``user_data``, base64-encoded (an
  OS parameter holds neither line breaks nor, through ``gnt-instance add
  -O``, commas): ``#cloud-config`` (checked to be a YAML mapping) or a
  script (``#!``), at most 16 KiB decoded, as EC2 allows.

The tenant's values reach these files only inside JSON (which is YAML),
so no value can add a key or a line of its own. cloud-init owns the network
and the host keys then: our network step writes the loopback only, and a
drop-in in /etc/cloud/cloud.cfg.d limits cloud-init to the seed (no probing
of other data sources) and keeps the host keys create made (their
fingerprints are in the create log).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DefinitionError
from .network import NicConfig
from .target import Target

CLOUD_INIT_MODES = ("no", "nocloud")
SEED_DIR = "/var/lib/cloud/seed/nocloud"
CONFIG_DROPIN = "/etc/cloud/cloud.cfg.d/90-ganeti-instance-debootstrap.cfg"
MAX_USER_DATA = 16384
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class CloudInitError(DefinitionError):
    """The cloud-init seed cannot be written as the OS parameters ask."""


def decode_user_data(value: str) -> str:
    """The user-data text of the ``user_data`` parameter; raises ValueError with why."""
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64 (encode the file: base64 -w0 user-data.yaml)") \
            from None
    if len(data) > MAX_USER_DATA:
        raise ValueError(f"is {len(data)} bytes once decoded, more than {MAX_USER_DATA}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text once decoded") from None
    return text


def user_data_problem(value: str) -> str | None:
    """Why ``user_data`` is refused, or None; never quotes the data."""
    try:
        text = decode_user_data(value)
    except ValueError as exc:
        return str(exc)
    first = text.split("\n", 1)[0].rstrip()
    if first.startswith("#!"):
        return None
    if first != "#cloud-config":
        return ("does not start with '#cloud-config' or a script's '#!' line once "
                "decoded (other user-data formats are not accepted)")
    try:
        import yaml  # type: ignore[import]  # python3-yaml, for cloud-config only
    except ImportError:
        return ("is cloud-config, which this node cannot check: install the "
                "Debian package python3-yaml on the node (apt-get install python3-yaml)")

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        return f"is not valid YAML once decoded{at}"
    if loaded is not None and not isinstance(loaded, dict):
        return "is cloud-config whose YAML is not a mapping of keys"
    return None


@dataclass(frozen=True, repr=False)
class Seed:
    """What the seed is made from."""

    instance_id: str
    hostname: str
    nics: tuple[NicConfig, ...] = ()
    user_data: str = ""  # decoded; "" writes a bare "#cloud-config"
    network: bool = True  # False: network=none, cloud-init leaves it alone too

    def __repr__(self) -> str:
        return f"Seed({self.instance_id!r}, {self.hostname!r}, nics={len(self.nics)})"


def instance_id(uuid: str, name: str) -> str:
    """cloud-init's instance-id: Ganeti's instance UUID (checked), else from the name."""
    if uuid:
        if not _UUID.fullmatch(uuid):
            raise CloudInitError(
                f"INSTANCE_UUID={uuid[:40]!r} from Ganeti is not a UUID, so the "
                f"cloud-init seed has no instance-id; set cloud_init=no or fix "
                f"the call.")
        return uuid.lower()
    return f"ganeti-{name}"


def meta_data_text(seed: Seed) -> str:
    return json.dumps({"instance-id": seed.instance_id,
                       "local-hostname": seed.hostname}, indent=2) + "\n"


def network_config(nics: Sequence[NicConfig]) -> dict[str, object]:
    """Netplan-style version 2, for the NICs as our own files configure them."""
    ethernets: dict[str, object] = {}
    for nic in nics:
        entry: dict[str, object] = {"match": {"macaddress": nic.mac}, "set-name": nic.name}
        addresses = [str(a) for a in (nic.address4, nic.address6) if a is not None]
        if addresses:
            entry["addresses"] = addresses
        entry["dhcp4"] = nic.address4 is None
        entry["dhcp6"] = False
        if nic.slaac:
            entry["accept-ra"] = True
        # gateway4/gateway6, not routes: cloud-init's own parser refuses
        # netplan's "to: default", and its ifupdown renderer turns a route
        # into a net-tools "route add" command (not installed), but a
        # gateway into the stanza's "gateway" line, as our own files do.
        if nic.gateway4 is not None:
            entry["gateway4"] = str(nic.gateway4)
        if nic.gateway6 is not None:
            entry["gateway6"] = str(nic.gateway6)
        ethernets[nic.name] = entry
    return {"version": 2, "ethernets": ethernets}


def network_config_text(nics: Sequence[NicConfig]) -> str:
    return json.dumps(network_config(nics), indent=2) + "\n"


CONFIG_TEXT = (
    "# Written by ganeti-instance-debootstrap (OS parameter cloud_init=nocloud).\n"
    "# The seed is in " + SEED_DIR + "; no other data source is probed.\n"
    "datasource_list: [ NoCloud, None ]\n"
    "# The host keys create made are kept: their fingerprints are in its log.\n"
    "ssh_deletekeys: false\n"
    "# /etc/hostname keeps the instance name as create wrote it (the FQDN).\n"
    "prefer_fqdn_over_hostname: true\n")


NO_NETWORK_TEXT = ("# OS parameter network=none: cloud-init leaves the network alone.\n"
                   "network: {config: disabled}\n")


def write_seed(t: Target, seed: Seed) -> list[str]:
    """Write the seed and the drop-in; return the files written."""
    files = {f"{SEED_DIR}/meta-data": (meta_data_text(seed), 0o600),
             f"{SEED_DIR}/user-data": (seed.user_data or "#cloud-config\n", 0o600),
             CONFIG_DROPIN: (CONFIG_TEXT + ("" if seed.network else NO_NETWORK_TEXT),
                             0o644)}
    if seed.network:
        files[f"{SEED_DIR}/network-config"] = (network_config_text(seed.nics), 0o600)
    for inner, (text, mode) in files.items():
        t.write_text(inner, text, mode=mode)
    return list(files)


def require_installed(packages: frozenset[str]) -> None:
    if "cloud-init" not in packages:
        raise CloudInitError(_not_installed())


def refuse_without_cloud_init(mode: str, extra_pkgs: tuple[str, ...]) -> None:
    """Refuse cloud_init=nocloud before the disk is touched when cloud-init will be missing."""
    if mode == "nocloud" and "cloud-init" not in extra_pkgs:
        raise CloudInitError(_not_installed())


def _not_installed() -> str:
    return ("The OS parameter cloud_init=nocloud writes a seed for cloud-init, but "
            "cloud-init is not in the system's packages. Add cloud-init to "
            "EXTRA_PKGS in the variant or the defaults file (e.g. "
            'EXTRA_PKGS="$EXTRA_PKGS,cloud-init"), or set cloud_init=no.')
