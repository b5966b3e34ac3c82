"""The administrator's settings: the defaults file, then the variant file.

Both are shell fragments, and sites write them as such (``EXTRA_PKGS=
"$EXTRA_PKGS,openssh-server"`` in a variant is common), so they are read by
a real POSIX shell in a clean environment (through the runner, like every
command), exactly as the shell edition sourced them, and the known
variables are collected from it. Python then validates each value and
names the file and setting in every error.

Every setting is declared once, as a field of :class:`Settings`: its type,
name, default, parse function and help. The names collected from the
shell, the shell edition's defaults and the validation are derived from
these declarations (:data:`SETTINGS`). To add a setting, add a field there
and document it in the shipped ``defaults`` file and the README.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from . import runner, trust
from .filesystems import ROOT_TYPES, RootType
from .errors import CommandError, ConfigError
from .names import (is_arch_name, is_component_name, is_number, is_package_name,
                    is_suite_name, is_variant_name, line_break_problem)
from .paths import Paths

# A current Debian release that the debootstrap in bookworm and later knows.
DEFAULT_SUITE = "trixie"

SHELL = "/bin/sh"
# The settings files are sourced in a clean environment, so that nothing of
# the node's (a SUITE or MIRROR exported by whoever started Ganeti) leaks
# into them; env(1) starts the shell with only these variables.
SHELL_COMMAND = ("env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C",
                 SHELL, "-c")

# The accepted values of the settings that are a choice, each defined once
# here (and used by the OS parameter bootloader, partitions, bootstrap).
PartitionStyle = Literal["none", "msdos", "gpt"]
PARTITION_STYLES: tuple[PartitionStyle, ...] = get_args(PartitionStyle)
BootstrapTool = Literal["auto", "debootstrap", "mmdebstrap"]
BOOTSTRAP_TOOLS: tuple[BootstrapTool, ...] = get_args(BootstrapTool)
# none: Ganeti boots the node's kernel (kernel_path); grub: GRUB on disk 0.
Bootloader = Literal["none", "grub", "grub-efi"]
BOOTLOADERS: tuple[Bootloader, ...] = get_args(Bootloader)

# Seconds a customisation hook may run. A hook that hangs (a prompt nobody
# answers, a download that never ends) would otherwise keep the instance's
# disk mounted and Ganeti's job and locks held forever; an hour leaves room
# for hooks that install many packages over a slow link.
DEFAULT_HOOK_TIMEOUT = 3600


class Invalid(Exception):
    """A setting's value is refused; each argument says why (one problem each)."""

    def __init__(self, *whys: str) -> None:
        super().__init__(*whys)
        self.whys = whys


@dataclass(frozen=True)
class Setting:
    """One setting as the administrator writes it, declared once.

    ``parse`` turns the text into the typed value of its Settings field or
    raises :class:`Invalid`. ``default`` is the text an unset setting has,
    and an empty one too unless ``empty_is_value`` (``CLEAN_CACHE=""``:
    never). ``shell_default`` is what the shell edition set before a
    variant file is read (so a variant's ``$NAME`` sees it): a text, or
    one derived from the installation's paths; None: nothing set.
    """

    name: str
    default: str
    parse: Callable[[str], object]
    help: str
    empty_is_value: bool = False
    shell_default: str | Callable[[Paths], str] | None = None
    api5_default: str | None = None  # Ganeti 1.2 (OS API 5) differs
    dest: str = ""  # the Settings field, filled in from the dataclass

    def text(self, raw: Mapping[str, str], api_version: int) -> str:
        """The text of this setting in ``raw``, or its default."""
        value = raw.get(self.name)
        if value is None or (value == "" and not self.empty_is_value):
            if api_version == 5 and self.api5_default is not None:
                return self.api5_default
            return self.default
        return value

    def shell_line(self, paths: Paths) -> str:
        """The shell line giving it the shell edition's default ("" for none)."""
        if self.shell_default is None:
            return ""
        value = (self.shell_default if isinstance(self.shell_default, str)
                 else self.shell_default(paths))
        # ${NAME:=x} also replaces an empty value, ${NAME=x} only an unset
        # one. Not inside double quotes on purpose: there the single quotes
        # that protect the value would become part of it.
        op = "=" if self.empty_is_value else ":="
        return f": ${{{self.name}{op}{_sh_quote(value)}}}; "


_SETTING = "setting"  # the key of a Settings field's metadata holding its Setting


def setting(name: str, default: str, parse: Callable[[str], object], help: str, *,
            empty_is_value: bool = False,
            shell_default: str | Callable[[Paths], str] | None = None,
            api5_default: str | None = None) -> Any:
    """A field of Settings declaring the setting ``name`` (see :class:`Setting`).

    The field's own default is ``default`` parsed, so that ``Settings()``
    holds the built-in defaults.
    """
    spec = Setting(name, default, parse, help, empty_is_value, shell_default, api5_default)
    return field(default=parse(default), metadata={_SETTING: spec})


# --- what a value may be ---------------------------------------------------------

def _checked(ok: Callable[[str], bool], refused: str, *,
             empty_ok: bool = False) -> Callable[[str], str]:
    """A text ``ok`` accepts (and "" with ``empty_ok``); else "<value> <refused>"."""
    def parse(value: str) -> str:
        if not (empty_ok and value == "") and not ok(value):
            raise Invalid(f"{value!r} {refused}")
        return value
    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    return _checked(choices.__contains__, f"must be one of {', '.join(choices)}")


def _yes_no(value: str) -> bool:
    if value not in ("yes", "no"):
        raise Invalid(f"{value!r} must be yes or no")
    return value == "yes"


def _url(schemes: tuple[str, ...], refused: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value and not value.startswith(schemes):
            raise Invalid(f"{value!r} is not {refused}")
        if " " in value:
            # One word of an APT source line: a space would add a field to it.
            raise Invalid(f"{value!r} contains a space; write it as %20 in a URL")
        return value
    return parse


def _list(check: Callable[[str], bool], what: str) -> Callable[[str], tuple[str, ...]]:
    """A comma (or space) separated list, empty items dropped, each checked."""
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(p for p in value.replace(" ", ",").split(",") if p)
        bad = [f"{item!r} is not {what}" for item in items if not check(item)]
        if bad:
            raise Invalid(*bad)
        return items
    return parse


def _count(what: str, *, positive: bool = False,
           empty: str = "") -> Callable[[str], int | None]:
    """A whole number (``positive``: above 0); with ``empty``, "" is None."""
    def parse(value: str) -> int | None:
        if value == "" and empty:
            return None
        if is_number(value) and (int(value) > 0 or not positive):
            return int(value)
        raise Invalid(f"{value!r} must be {what}{empty}")
    return parse


_absolute_path = _checked(lambda value: value.startswith("/"), "must be an absolute path",
                          empty_ok=True)


# --- the settings ------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Validated settings for one run.

    Every setting is declared once, here: its field's type, then (in
    :func:`setting`) its name, default text, parse function and help. The
    names read from the files, the shell edition's defaults and the
    validation all come from these declarations (:data:`SETTINGS`).
    """

    suite: str = setting(
        "SUITE", DEFAULT_SUITE,
        _checked(is_suite_name, "is not a release name such as trixie or stable"),
        "release to install (codename or suite)",
        shell_default=DEFAULT_SUITE)
    arch: str = setting(
        "ARCH", "",
        _checked(is_arch_name, "is not a dpkg architecture name such as amd64 or i386 "
                 "(empty: the node's)", empty_ok=True),
        "dpkg architecture to install; empty: the node's")
    mirror: str = setting(
        "MIRROR", "", _url(("http://", "https://", "ftp://", "file:/"),
                           "an http://, https://, ftp:// or file:/ URL (empty: "
                           "debootstrap's default mirror)"),
        "archive URL to bootstrap from; empty: the tool's default")
    proxy: str = setting(
        "PROXY", "", _url(("http://", "https://"), "an http:// or https:// proxy URL"),
        "HTTP(S) proxy for the bootstrap; empty: none")
    components: tuple[str, ...] = setting(
        "COMPONENTS", "", _list(is_component_name, "an archive component such as main"),
        "comma-separated archive components; empty: the tool's (main)")
    extra_pkgs: tuple[str, ...] = setting(
        "EXTRA_PKGS", "", _list(is_package_name, "a Debian package name"),
        "comma-separated packages installed on top of the base system")
    generate_cache: bool = setting(
        "GENERATE_CACHE", "yes", _yes_no, "yes: keep and reuse a cache of each bootstrap",
        shell_default="yes")
    clean_cache_days: int | None = setting(
        "CLEAN_CACHE", "14",
        _count("a number of days", empty=", or empty to never drop a cache"),
        "days after which a cache is made anew; empty: never",
        empty_is_value=True, shell_default="14")
    filesystem: RootType = setting(
        "FILESYSTEM", "ext4", _choice(ROOT_TYPES),
        "the root filesystem: ext4, ext3, ext2, xfs or btrfs (the OS parameter "
        "filesystem overrides it)")
    partition_style: PartitionStyle = setting(
        "PARTITION_STYLE", "msdos", _choice(PARTITION_STYLES),
        "msdos, gpt or none (the filesystem on the whole disk)", api5_default="none")
    partition_alignment: int = setting(
        "PARTITION_ALIGNMENT", "2048",
        _count("a positive whole number of 512-byte sectors (2048 = 1 MiB)",
               positive=True),
        "where partition 1 starts, in 512-byte sectors", shell_default="2048")
    cache_image: bool = setting(
        "CACHE_IMAGE", "yes", _yes_no,
        "yes: also keep a filesystem image of each cache and copy it onto new disks")
    bootloader: Bootloader = setting(
        "BOOTLOADER", "none", _choice(BOOTLOADERS),
        "none (Ganeti's kernel_path), grub (BIOS) or grub-efi (UEFI)")
    bootstrap_tool: BootstrapTool = setting(
        "BOOTSTRAP_TOOL", "auto", _choice(BOOTSTRAP_TOOLS),
        "auto (mmdebstrap when installed), debootstrap or mmdebstrap")
    hook_timeout: int | None = setting(
        "HOOK_TIMEOUT", str(DEFAULT_HOOK_TIMEOUT),
        _count("a positive number of seconds", positive=True,
               empty=", or empty for no limit"),
        "seconds each hook may run; empty: no limit", empty_is_value=True)
    customize_dir: str = setting(
        "CUSTOMIZE_DIR", "", _absolute_path, "the hooks directory",
        shell_default=lambda paths: paths.default_hooks_dir)
    variants_dir: str = setting(
        "VARIANTS_DIR", "", _absolute_path, "the variants' settings files",
        shell_default=lambda paths: paths.default_variants_dir)
    # Not settings: the variant chosen and the files the values came from
    # (for messages).
    variant: str = ""
    sources: tuple[str, ...] = ()


# The table of every setting, in the order they are checked and reported.
SETTINGS: tuple[Setting, ...] = tuple(
    dataclasses.replace(f.metadata[_SETTING], dest=f.name)
    for f in dataclasses.fields(Settings) if _SETTING in f.metadata)
BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
# Every setting the shell edition knew, plus ours; only these are collected.
NAMES = tuple(BY_NAME)


def _shell_defaults(paths: Paths) -> str:
    """Shell lines giving unset settings the shell edition's defaults.

    Applied after the defaults file and before the variant file, as the
    shell edition did, so a variant's ``$EXTRA_PKGS`` sees them.
    """
    return "".join(s.shell_line(paths) for s in SETTINGS)


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def read_shell_files(files: list[str], paths: Paths) -> dict[str, str]:
    """Source ``files`` in order in a clean /bin/sh and return the settings.

    The first file gets the built-in defaults applied after it. A file that
    does not exist is skipped (the shell edition did the same for the
    defaults file). Unset settings are absent from the result.
    """
    # The files' own output must not be mistaken for values: while they are
    # sourced, stdout points at stderr; the values are printed afterwards on
    # the real stdout, saved as fd 3. One line, so that the command logged
    # at DEBUG_LEVEL=1 stays one line of the log.
    script = ('exec 3>&1 1>&2; set -e; '
              'for f do '
              'if [ -f "$f" ]; then . "$f"; fi; '
              'if [ -z "$__defaults_done" ]; then '
              f'{_shell_defaults(paths)}'
              '__defaults_done=1; '
              'fi; '
              'done; '
              'exec 1>&3 3>&-; '
              f'for __n in {" ".join(NAMES)}; do '
              'eval "__set=\\${$__n+set} __value=\\${$__n-}"; '
              'if [ "$__set" = set ]; then printf "%s\\0%s\\0" "$__n" "$__value"; fi; '
              'done')
    try:
        result = runner.run([*SHELL_COMMAND, script, "settings", *files], capture=True)
    except CommandError as exc:
        shown = " and ".join(f for f in files if os.path.exists(f))
        raise ConfigError(
            f"Reading the settings in {shown} with {SHELL} failed "
            f"(exit status {exc.returncode}):\n  "
            + "\n  ".join(exc.stderr_tail.strip().splitlines()[-5:])
            + f"\nFix the shell syntax in {shown}: it is sourced as shell, as "
              f"the shell edition did.") from None
    fields = result.stdout.split(b"\0")
    values = {}
    for i in range(0, len(fields) - 1, 2):
        values[fields[i].decode()] = fields[i + 1].decode("utf-8", "replace")
    return values


def read_variants_list(path: str) -> list[str]:
    """The published variants: one a line, blank and ``#`` lines ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def variant_file(paths: Paths, variant: str, variants_dir: str) -> str:
    """The configuration file of ``variant``, refusing unsafe or unknown ones.

    An empty variant (API 10, or Ganeti passing none) is the first published
    variant, as Ganeti itself would choose.
    """
    published = read_variants_list(paths.variants_list)
    if not variant:
        if not published:
            return ""
        variant = published[0]
    if not is_variant_name(variant):
        raise ConfigError(
            f"OS variant {variant!r} is not a plain name (letters, digits, '_', "
            f"'-', '+'; no slashes or leading dot). Use one of the variants "
            f"listed in {paths.variants_list}: {', '.join(published) or 'none'}.")
    conf = os.path.join(variants_dir, variant + ".conf")
    if os.path.isfile(conf):
        return conf
    if variant in published:
        raise ConfigError(
            f"Configuration error: the variant {variant!r} is published in "
            f"{paths.variants_list} but its settings file {conf} is missing. "
            f"Create {conf} (it may be empty to use the defaults) or remove "
            f"{variant!r} from variants.list.")
    raise ConfigError(
        f"The OS variant {variant!r} is not supported: it is neither listed in "
        f"{paths.variants_list} nor configured in {variants_dir}. Use one of: "
        f"{', '.join(published) or 'none'}; to add it, create {conf} and list "
        f"it in variants.list.")


def _settings_purpose(path: str, setting: str = "") -> trust.Purpose:
    instead = f" (or set {setting} to a directory that only root can change)" \
        if setting else ""
    return trust.Purpose(
        action=f"read the settings in {path}",
        reason="The settings are shell code, sourced as root on the node",
        consequence="run commands as root", error=ConfigError, alternative=instead)


def check_trusted(path: str, *, setting: str = "",
                  trusted_uids: Collection[int] | None = None) -> None:
    """Refuse (ConfigError) a settings file or variants directory others can change.

    A missing one passes: the built-in defaults apply (settings file) or
    the variant is reported unknown (variants directory).
    """
    if os.path.lexists(path):
        trust.check_path(path, _settings_purpose(path, setting),
                         trusted_uids=trusted_uids)


def load(paths: Paths, variant: str, api_version: int, *,
         trusted_uids: Collection[int] | None = None) -> Settings:
    """Read and validate the settings for ``variant`` (may be empty).

    The settings file, the variants directory and the variant's file are
    read only when only root can change them (:func:`check_trusted`).
    """
    check_trusted(paths.defaults_file, trusted_uids=trusted_uids)
    base = read_shell_files([paths.defaults_file], paths)
    # Checked now: it is used (to find the variant file) before validate.
    variants_dir = base.get("VARIANTS_DIR") or paths.default_variants_dir
    validate({"VARIANTS_DIR": variants_dir}, [paths.defaults_file], api_version)
    check_trusted(variants_dir, setting="VARIANTS_DIR", trusted_uids=trusted_uids)
    conf = variant_file(paths, variant, variants_dir)
    if conf:
        check_trusted(conf, setting="VARIANTS_DIR", trusted_uids=trusted_uids)
    files = [paths.defaults_file] + ([conf] if conf else [])
    raw = read_shell_files(files, paths) if conf else base
    chosen = os.path.basename(conf)[:-len(".conf")] if conf else ""
    return validate(raw, files, api_version, chosen)


def _where(name: str, files: list[str]) -> str:
    return f"{name} (set in {' or '.join(files)})"


def validate(raw: Mapping[str, str], files: list[str], api_version: int,
             variant: str = "") -> Settings:
    """Check every value; one error names each bad setting and the file."""
    problems: list[str] = []
    # First, for every setting: a line break or control character. MIRROR,
    # PROXY, SUITE and COMPONENTS are written into the instance's APT
    # sources, EXTRA_PKGS and the rest into commands and the hooks'
    # environment; a newline in MIRROR would add an APT source line. A value
    # refused here is not looked at further (its default stands in).
    single_line = {}
    for name, value in raw.items():
        why = line_break_problem(value)
        if why is None:
            single_line[name] = value
        else:
            shown = repr(value) if len(value) <= 60 else repr(value[:60]) + "..."
            problems.append(f"{_where(name, files)}: {shown} {why}; every setting is "
                            f"a single line")
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        try:
            values[spec.dest] = spec.parse(spec.text(single_line, api_version))
        except Invalid as exc:
            problems += [f"{_where(spec.name, files)}: {why}" for why in exc.whys]
    if problems:
        raise ConfigError("Invalid settings:\n  " + "\n  ".join(problems))
    return Settings(**values, variant=variant, sources=tuple(files))
