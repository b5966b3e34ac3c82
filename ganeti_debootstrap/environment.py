"""What Ganeti asked for: its variables (API 10+) or options (API 5), parsed once.

Ganeti runs each script with a cleaned environment. From API 10 on, the
instance, its disks, NICs and parameters come as environment variables; API
5 (Ganeti 1.2) passed ``-i NAME -b BLOCKDEV -s SWAPDEV [-o OLDNAME]``
instead. Everything is checked here and every missing or malformed variable
is reported in one error, so an administrator fixes them all in one go.
"""

from __future__ import annotations

import getopt
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError, UsageError
from .names import hostname_problem, is_number, line_break_problem

API_VERSIONS = (20, 15, 10, 5)
SCRIPTS = ("create", "import", "export", "rename", "verify")

USAGE = {
    "create": "create  (Ganeti API 10+: instance described by the environment)\n"
              "create -i NAME -b BLOCKDEV -s SWAPDEV  (API 5)",
    "import": "import  (API 10+; the dump stream on stdin)\n"
              "import -i NAME -b BLOCKDEV -s SWAPDEV  (API 5)",
    "export": "export  (API 10+; the dump stream goes to stdout)\n"
              "export -i NAME -b BLOCKDEV  (API 5)",
    "rename": "rename  (API 10+: OLD_INSTANCE_NAME and INSTANCE_NAME)\n"
              "rename -i NEWNAME -o OLDNAME -b BLOCKDEV -s SWAPDEV  (API 5)",
    "verify": "verify parameters  (checks the OSP_* variables)",
}


# Ganeti's own limits (src/Ganeti/HTools/Types.hs: maxDisks, maxNics; the
# same in lib/constants.py as MAX_DISKS, MAX_NICS): an instance never has
# more, so a larger count is not Ganeti's and is refused before any loop
# over it (a million NICs took seconds and as many checks).
MAX_DISKS = 16
MAX_NICS = 8
# Disk sizes come in MiB; 8 EiB (2**63 bytes) is the largest block device
# Linux can address.
MAX_DISK_MIB = 2**43
# The highest descriptor a process can have open unless fs.nr_open was
# raised: the kernel's default nr_open is 1048576. A larger EXP_SIZE_FD
# made os.fstat raise OverflowError (a traceback).
MAX_FD = 2**20 - 1
# A decimal number longer than this is refused before int() sees it:
# int() of a very long digit string is slow, and past 4300 digits raises.
_MAX_DIGITS = 20

# The serial console's speed when Ganeti gives none (the common PC UART
# speed; GRUB and the kernel need one).
DEFAULT_SERIAL_SPEED = "115200"

# The variables whose values are checked for line breaks and control
# characters (names.line_break_problem) before anything uses them: every
# per-NIC and per-disk variable (network files are made from NIC_N_*, and
# hooks get them all), the names and the variant, the disk paths.
_TEXT_VARIABLES = re.compile(
    r"(NIC|DISK)_[0-9]+_[A-Z0-9_]+|INSTANCE_NAME|OLD_INSTANCE_NAME|OS_VARIANT"
    r"|(IMPORT|EXPORT)_(DISK_PATH|DEVICE)")


def usage(script: str) -> str:
    """The usage text of one script."""
    return ("Usage:\n  " + USAGE[script].replace("\n", "\n  ") +
            "\n\nThis is a Ganeti OS definition script; Ganeti runs it with the "
            "variables described in ganeti-os-interface(7).")


@dataclass(frozen=True)
class Disk:
    """One of the instance's disks as Ganeti describes it."""

    index: int
    path: str
    uri: str = ""
    size_mib: int | None = None
    access: str = "rw"
    # Ganeti's UUID of the disk (DISK_N_UUID), lower case; empty when not
    # given or not a UUID. A data disk's filesystem gets it as its UUID, so
    # that fstab can name the filesystem before it exists (import).
    uuid: str = ""


@dataclass(frozen=True)
class Nic:
    """One of the instance's network interfaces as Ganeti describes it."""

    index: int
    mac: str = ""
    ip: str = ""
    mode: str = ""
    link: str = ""
    name: str = ""
    network_name: str = ""
    subnet: str = ""
    gateway: str = ""
    subnet6: str = ""
    gateway6: str = ""


@dataclass(frozen=True)
class Request:
    """One call of a script by Ganeti, fully parsed."""

    script: str
    api_version: int
    instance_name: str = ""
    old_instance_name: str = ""
    os_variant: str = ""
    hypervisor: str = ""
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    # The disk this call works on: disk 0 for create and rename, the
    # exported or imported one for export and import.
    disk_path: str = ""
    disk_index: int = 0
    swap_device: str = ""
    reinstall: bool = False
    hv_params: Mapping[str, str] = field(default_factory=dict)
    be_params: Mapping[str, str] = field(default_factory=dict)
    os_params: Mapping[str, str] = field(default_factory=dict)
    exp_size_fd: int | None = None
    verify_checks: tuple[str, ...] = ()
    # Ganeti's own variables, passed on to hooks unchanged.
    ganeti_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def serial_console(self) -> str | None:
        """The serial console device the instance should get a getty on."""
        if self.hypervisor == "xen-pvm":
            return "hvc0"
        if self.hv_params.get("serial_console", "").lower() == "true":
            return "ttyS0"
        return None

    @property
    def serial_speed(self) -> str:
        """INSTANCE_HV_serial_speed (KVM) when it is a number, else ""."""
        speed = self.hv_params.get("serial_speed", "")
        return speed if is_number(speed) else ""


def _whole_number(value: str) -> int | None:
    """The value of an ASCII decimal integer, or None.

    Stricter than int(), which also takes spaces, underscores and other
    scripts' digits ("１０"): Ganeti writes plain ASCII numbers.
    """
    if re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return None


def _shown(value: str, limit: int = 40) -> str:
    """``value`` for a message: repr, cut short (a value may be megabytes)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _int(env: Mapping[str, str], name: str, problems: list[str], low: int, high: int,
         limit: str, default: int | None = None) -> int | None:
    """``name`` as a whole number from ``low`` to ``high``, or ``default``.

    A value that is not a number, or is out of range, is a problem (naming
    the variable and, in ``limit``, why the range is what it is).
    """
    value = env.get(name, "")
    if value == "":
        return default
    digits = value.lstrip("-")
    if re.fullmatch(r"-?[0-9]+", value) and len(digits.lstrip("0")) > _MAX_DIGITS:
        problems.append(f"{name}={_shown(value)} is out of range: it must be "
                        f"{low} to {high}; {limit}")
        return default
    number = _whole_number(value)
    if number is None:
        problems.append(f"{name}={_shown(value)} is not a whole number")
        return default
    if not low <= number <= high:
        problems.append(f"{name}={number} is out of range: it must be {low} to "
                        f"{high}; {limit}")
        return default
    return number


def _check_text(label: str, value: str, problems: list[str]) -> bool:
    """Whether ``value`` is free of line breaks and control characters.

    Checked once here, where Ganeti's variables are read, so that whatever
    writes a value into a file of the instance (network files, hosts) can
    rely on it: a newline in a value would add a line of its author's.
    """
    why = line_break_problem(value)
    if why is None:
        return True
    problems.append(f"{label}={_shown(value)} {why}: Ganeti never passes such a "
                    f"value, and written into the instance's files it would add "
                    f"lines to them")
    return False


def _check_texts(env: Mapping[str, str], problems: list[str]) -> None:
    for name in sorted(env):
        if _TEXT_VARIABLES.fullmatch(name):
            _check_text(name, env[name], problems)


def _api_version(env: Mapping[str, str]) -> int:
    raw = env.get("OS_API_VERSION", "")
    if raw == "":
        return 5
    version = _whole_number(raw)
    if version not in API_VERSIONS:
        raise ConfigError(
            f"OS_API_VERSION={raw!r} is not supported: this OS definition "
            f"speaks Ganeti OS API versions "
            f"{', '.join(str(v) for v in API_VERSIONS)} (see "
            f"ganeti_api_version). Upgrade the OS definition or Ganeti.")
    return version


def _prefixed(env: Mapping[str, str], prefix: str, lower: bool) -> dict[str, str]:
    out = {}
    for key, value in env.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            name = key[len(prefix):]
            out[name.lower() if lower else name] = value
    return out


_DISK_LIMIT = f"Ganeti gives an instance at most {MAX_DISKS} disks"


def _disks(env: Mapping[str, str], problems: list[str]) -> tuple[Disk, ...]:
    count = _int(env, "DISK_COUNT", problems, 0, MAX_DISKS, _DISK_LIMIT, 0) or 0
    disks = []
    for n in range(count):
        disks.append(Disk(
            index=n, path=env.get(f"DISK_{n}_PATH", ""),
            uri=env.get(f"DISK_{n}_URI", ""),
            size_mib=_int(env, f"DISK_{n}_SIZE", problems, 0, MAX_DISK_MIB,
                          "sizes are in MiB, and 8 EiB is the largest block "
                          "device Linux addresses"),
            access=env.get(f"DISK_{n}_ACCESS", "rw"),
            uuid=_uuid(env.get(f"DISK_{n}_UUID", ""))))
    return tuple(disks)


def _uuid(text: str) -> str:
    """``text`` as a canonical lower-case UUID, or "" when it is none."""
    try:
        return str(uuid.UUID(text)) if text else ""
    except ValueError:
        return ""


def _nics(env: Mapping[str, str], problems: list[str]) -> tuple[Nic, ...]:
    count = _int(env, "NIC_COUNT", problems, 0, MAX_NICS,
                 f"Ganeti gives an instance at most {MAX_NICS} NICs", 0) or 0
    nics = []
    for n in range(count):
        def var(suffix: str, n: int = n) -> str:
            return env.get(f"NIC_{n}_{suffix}", "")
        nics.append(Nic(
            index=n, mac=var("MAC"), ip=var("IP"), mode=var("MODE"),
            link=var("LINK") or var("BRIDGE"), name=var("NAME"),
            network_name=var("NETWORK_NAME"), subnet=var("NETWORK_SUBNET"),
            gateway=var("NETWORK_GATEWAY"), subnet6=var("NETWORK_SUBNET6"),
            gateway6=var("NETWORK_GATEWAY6")))
    return tuple(nics)


def _check_name(label: str, name: str, problems: list[str]) -> None:
    # A line break was reported by _check_text already.
    if line_break_problem(name) is not None:
        return
    why = hostname_problem(name)
    if why:
        problems.append(f"{label}={_shown(name)} is not a valid host name: {why}")


def _usage_then(script: str, problem: str) -> str:
    """The usage text, then the problem: the last line of the log names it."""
    return f"{usage(script)}\n{problem}"


def _parse_api5(script: str, argv: Sequence[str],
                env: Mapping[str, str]) -> Request:
    try:
        opts, rest = getopt.getopt(list(argv), "i:n:b:s:o:h", ["help"])
    except getopt.GetoptError as exc:
        raise UsageError(_usage_then(script, f"{exc}.")) from None
    values = {}
    for opt, val in opts:
        if opt in ("-h", "--help"):
            raise UsageError(usage(script))
        values["-i" if opt == "-n" else opt] = val
    if rest:
        raise UsageError(_usage_then(script, f"Unexpected arguments {rest!r}."))
    needed = ["-i", "-b"]
    if script != "export":
        needed.append("-s")
    if script == "rename":
        needed.append("-o")
    missing = [o for o in needed if not values.get(o)]
    if missing:
        raise UsageError(_usage_then(script, f"Missing option(s) {' '.join(missing)} "
                                             f"(Ganeti OS API 5, OS_API_VERSION unset)."))
    problems: list[str] = []
    # A control character (a newline) in a device path is never Ganeti's,
    # and would split every message naming the path over several lines.
    for opt in ("-i", "-o", "-b", "-s"):
        if opt in values:
            _check_text(opt, values[opt], problems)
    _check_name("-i", values["-i"], problems)
    if script == "rename":
        _check_name("-o", values["-o"], problems)
    if problems:
        raise ConfigError("Invalid arguments from Ganeti:\n  " + "\n  ".join(problems))
    return Request(script=script, api_version=5, instance_name=values["-i"],
                   old_instance_name=values.get("-o", ""),
                   disks=(Disk(0, values["-b"]),), disk_path=values["-b"],
                   swap_device=values.get("-s", ""),
                   ganeti_env=_ganeti_env(env))


def _ganeti_env(env: Mapping[str, str]) -> dict[str, str]:
    """Ganeti's variables as given (everything but the few we must not pass)."""
    return {k: v for k, v in env.items() if k not in ("PWD", "OLDPWD", "SHLVL", "_")}


def debug_requested(env: Mapping[str, str]) -> bool:
    """Whether Ganeti asks for debugging output (DEBUG_LEVEL other than 0).

    Read before anything else is parsed: a refused variable is reported
    with its traceback then too.
    """
    return env.get("DEBUG_LEVEL", "0") not in ("", "0")


def parse(script: str, argv: Sequence[str], env: Mapping[str, str]) -> Request:
    """Parse one call of ``script``; raises UsageError or ConfigError."""
    if any(a in ("-h", "--help") for a in argv):
        raise UsageError(usage(script))
    api = _api_version(env)
    if script == "verify":
        return _parse_verify(argv, env, api)
    if api == 5:
        return _parse_api5(script, argv, env)
    if argv:
        raise UsageError(_usage_then(script, f"Unexpected arguments {list(argv)!r}: with "
                                             f"OS_API_VERSION={api} everything comes "
                                             f"from the environment."))
    problems: list[str] = []
    missing: list[str] = []
    _check_texts(env, problems)
    disks = _disks(env, problems)
    nics = _nics(env, problems)
    name = env.get("INSTANCE_NAME", "")
    if not name:
        missing.append("INSTANCE_NAME")
    else:
        _check_name("INSTANCE_NAME", name, problems)
    old_name = ""
    disk_path = ""
    disk_index = 0
    exp_size_fd = None
    if script in ("create", "rename"):
        if env.get("DISK_COUNT", "") == "":
            missing.append("DISK_COUNT")
        elif not disks and not any(p.startswith("DISK_COUNT=") for p in problems):
            problems.append(f"DISK_COUNT={env['DISK_COUNT']}: the instance needs at "
                            f"least one disk for its root filesystem")
        if disks:
            disk_path = disks[0].path
            if not disk_path:
                if disks[0].uri:
                    problems.append(
                        f"disk 0 is only reachable by URI ({disks[0].uri!r}); "
                        f"this OS definition needs a block device or file "
                        f"(DISK_0_PATH): use a disk template with kernel access")
                else:
                    missing.append("DISK_0_PATH")
    if script == "rename":
        old_name = env.get("OLD_INSTANCE_NAME", "")
        if not old_name:
            missing.append("OLD_INSTANCE_NAME")
        else:
            _check_name("OLD_INSTANCE_NAME", old_name, problems)
    if script in ("import", "export"):
        prefix = script.upper()
        disk_index = _int(env, f"{prefix}_INDEX", problems, 0, MAX_DISKS - 1,
                          f"disks are numbered from 0, and {_DISK_LIMIT}", 0) or 0
        disk_path = (env.get(f"{prefix}_DISK_PATH") or env.get(f"{prefix}_DEVICE")
                     or "")
        if not disk_path:
            missing.append(f"{prefix}_DISK_PATH (or {prefix}_DEVICE)")
    if script == "export":
        # Standard output carries the backup itself: a size line written
        # there would corrupt it (and standard input is not for writing).
        exp_size_fd = _int(env, "EXP_SIZE_FD", problems, 2, MAX_FD,
                           f"the descriptor opened for the size is never 0 or 1 "
                           f"(1 is standard output, which carries the backup), and "
                           f"descriptors above {MAX_FD} exceed the kernel's "
                           f"default limit of open files per process (fs.nr_open)")
    if missing or problems:
        # The general advice first: Ganeti shows the last lines of the log,
        # and the last line must name what is wrong.
        lines = [f"The {script} script expects to be run by Ganeti (OS API {api}) "
                 f"with the variables ganeti-os-interface(7) describes; if you "
                 f"run it by hand, set them so."]
        lines.extend(p + "." for p in problems)
        if missing:
            lines.append("Missing variable(s) from Ganeti: " + ", ".join(missing) + ".")
        raise ConfigError("\n".join(lines))
    return Request(
        script=script, api_version=api, instance_name=name,
        old_instance_name=old_name, os_variant=env.get("OS_VARIANT", ""),
        hypervisor=env.get("HYPERVISOR", ""), disks=disks, nics=nics,
        disk_path=disk_path, disk_index=disk_index,
        reinstall=env.get("INSTANCE_REINSTALL", "") == "1",
        hv_params=_prefixed(env, "INSTANCE_HV_", lower=False),
        be_params=_prefixed(env, "INSTANCE_BE_", lower=False),
        os_params=_prefixed(env, "OSP_", lower=True),
        exp_size_fd=exp_size_fd, ganeti_env=_ganeti_env(env))


# The checks ``verify`` knows (verify.py runs them; "parameters" checks the
# OS parameters of osparams.py).
KNOWN_CHECKS = ("parameters",)


def _parse_verify(argv: Sequence[str], env: Mapping[str, str], api: int) -> Request:
    if not argv:
        raise UsageError(_usage_then("verify", "verify needs the checks to run as "
                                               "arguments."))
    unknown = [a for a in argv if a not in KNOWN_CHECKS]
    if unknown:
        raise UsageError(_usage_then(
            "verify", f"Unknown verify check(s): {', '.join(repr(a) for a in unknown)}; "
                      f"this OS definition knows: {', '.join(KNOWN_CHECKS)}."))
    return Request(script="verify", api_version=api,
                   os_variant=env.get("OS_VARIANT", ""),
                   os_params=_prefixed(env, "OSP_", lower=True),
                   verify_checks=tuple(argv), ganeti_env=_ganeti_env(env))
