"""The administrator's settings: the defaults file, then the variant file.

Both are shell fragments, and sites write them as such (``EXTRA_PKGS=
"$EXTRA_PKGS,openssh-server"`` in a variant is common), so they are read by
a real POSIX shell in a clean environment, exactly as the shell edition
sourced them, and the known variables are collected from it. Python then
validates each value and names the file and setting in every error.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from . import trust
from .errors import ConfigError
from .names import (is_arch_name, is_component_name, is_package_name,
                    is_suite_name, is_variant_name, line_break_problem)
from .paths import Paths

# A current Debian release that the debootstrap in bookworm and later knows.
DEFAULT_SUITE = "trixie"

SHELL = "/bin/sh"

# Every setting the shell edition knew, plus ours; only these are collected.
NAMES = ("PROXY", "MIRROR", "ARCH", "SUITE", "EXTRA_PKGS", "COMPONENTS",
         "CUSTOMIZE_DIR", "VARIANTS_DIR", "GENERATE_CACHE", "CLEAN_CACHE",
         "PARTITION_STYLE", "PARTITION_ALIGNMENT", "BOOTSTRAP_TOOL",
         "CACHE_IMAGE", "BOOTLOADER", "HOOK_TIMEOUT")

PARTITION_STYLES = ("none", "msdos", "gpt")
BOOTSTRAP_TOOLS = ("auto", "debootstrap", "mmdebstrap")

# Seconds a customisation hook may run. A hook that hangs (a prompt nobody
# answers, a download that never ends) would otherwise keep the instance's
# disk mounted and Ganeti's job and locks held forever; an hour leaves room
# for hooks that install many packages over a slow link.
DEFAULT_HOOK_TIMEOUT = 3600
# none: Ganeti boots the node's kernel (kernel_path); grub: GRUB on disk 0.
BOOTLOADERS = ("none", "grub", "grub-efi")


@dataclass(frozen=True)
class Settings:
    """Validated settings for one run."""

    suite: str = DEFAULT_SUITE
    arch: str = ""  # empty: the node's architecture
    mirror: str = ""  # empty: debootstrap's own default
    proxy: str = ""
    components: tuple[str, ...] = ()
    extra_pkgs: tuple[str, ...] = ()
    customize_dir: str = ""
    variants_dir: str = ""
    generate_cache: bool = True
    clean_cache_days: int | None = 14
    partition_style: str = "msdos"
    partition_alignment: int = 2048
    bootstrap_tool: str = "auto"
    cache_image: bool = True
    hook_timeout: int | None = DEFAULT_HOOK_TIMEOUT  # None: no limit
    bootloader: str = "none"
    variant: str = ""
    # The files the values came from, for messages.
    sources: tuple[str, ...] = ()


def _shell_defaults(paths: Paths) -> str:
    """Shell lines giving unset settings the shell edition's defaults.

    Applied after the defaults file and before the variant file, as the
    shell edition did, so a variant's ``$EXTRA_PKGS`` sees them.
    """
    hooks = _sh_quote(paths.default_hooks_dir)
    variants = _sh_quote(paths.default_variants_dir)
    # Unquoted on purpose: inside double quotes the single quotes that
    # protect the paths would become part of the value.
    return (f": ${{SUITE:={DEFAULT_SUITE}}}\n"
            f": ${{CUSTOMIZE_DIR:={hooks}}}\n"
            f": ${{VARIANTS_DIR:={variants}}}\n"
            ": ${GENERATE_CACHE:=yes}\n"
            ": ${CLEAN_CACHE=14}\n"
            ": ${PARTITION_ALIGNMENT:=2048}\n")


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def read_shell_files(files: list[str], paths: Paths) -> dict[str, str]:
    """Source ``files`` in order in a clean /bin/sh and return the settings.

    The first file gets the built-in defaults applied after it. A file that
    does not exist is skipped (the shell edition did the same for the
    defaults file). Unset settings are absent from the result.
    """
    printer = "".join(
        f'if [ "${{{n}+set}}" = set ]; then printf "%s\\0%s\\0" {n} "${n}"; fi\n'
        for n in NAMES)
    # The files' own output must not be mistaken for values: while they are
    # sourced, stdout points at stderr; the values are printed afterwards on
    # the real stdout, saved as fd 3.
    script = ('exec 3>&1 1>&2\n'
              'set -e\n'
              'for f do\n'
              '  if [ -f "$f" ]; then . "$f"; fi\n'
              '  if [ -z "$__defaults_done" ]; then\n'
              f'{_shell_defaults(paths)}'
              '    __defaults_done=1\n'
              '  fi\n'
              'done\n'
              'exec 1>&3 3>&-\n'
              f'{printer}')
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    proc = subprocess.run([SHELL, "-c", script, "settings", *files],
                          stdin=subprocess.DEVNULL, capture_output=True, env=env)
    data, err = proc.stdout, proc.stderr
    if proc.returncode != 0:
        shown = " and ".join(f for f in files if os.path.exists(f))
        raise ConfigError(
            f"Reading the settings in {shown} with {SHELL} failed "
            f"(exit status {proc.returncode}):\n  "
            + "\n  ".join(err.decode("utf-8", "replace").strip().splitlines()[-5:])
            + f"\nFix the shell syntax in {shown}: it is sourced as shell, as "
              f"the shell edition did.")
    fields = data.split(b"\0")
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
    variants_dir = base.get("VARIANTS_DIR") or paths.default_variants_dir
    # Checked now: it is used (to find the variant file) before validate.
    why = line_break_problem(variants_dir)
    if why is not None or not variants_dir.startswith("/"):
        where = _where("VARIANTS_DIR", [paths.defaults_file])
        raise ConfigError(f"Invalid settings:\n  {where}: {variants_dir!r} "
                          f"{why or 'must be an absolute path'}")
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


def is_number(value: str) -> bool:
    """Whether ``value`` is a whole number in ASCII digits.

    str.isdigit() alone also takes digits int() refuses ("¹", superscript
    one): a setting holding one would end the script with a traceback.
    """
    return value.isascii() and value.isdigit()


def _list(value: str) -> tuple[str, ...]:
    """A comma (or space) separated list, empty items dropped."""
    return tuple(p for p in value.replace(" ", ",").split(",") if p)


def validate(raw: Mapping[str, str], files: list[str], api_version: int,
             variant: str = "") -> Settings:
    """Check every value; one error names each bad setting and the file."""
    problems: list[str] = []

    def bad(name: str, why: str) -> None:
        problems.append(f"{_where(name, files)}: {why}")

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
            bad(name, f"{shown} {why}; every setting is a single line")
    raw = single_line
    suite = raw.get("SUITE", "") or DEFAULT_SUITE
    if not is_suite_name(suite):
        bad("SUITE", f"{suite!r} is not a release name such as trixie or stable")
    arch = raw.get("ARCH", "")
    if arch and not is_arch_name(arch):
        bad("ARCH", f"{arch!r} is not a dpkg architecture name such as amd64 "
                    f"or i386 (empty: the node's)")
    mirror = raw.get("MIRROR", "")
    if mirror and not mirror.startswith(("http://", "https://", "ftp://", "file:/")):
        bad("MIRROR", f"{mirror!r} is not an http://, https://, ftp:// or file:/ "
                      f"URL (empty: debootstrap's default mirror)")
    elif " " in mirror:
        # One word of an APT source line: a space would add a field to it.
        bad("MIRROR", f"{mirror!r} contains a space; write it as %20 in a URL")
    proxy = raw.get("PROXY", "")
    if proxy and not proxy.startswith(("http://", "https://")):
        bad("PROXY", f"{proxy!r} is not an http:// or https:// proxy URL")
    elif " " in proxy:
        bad("PROXY", f"{proxy!r} contains a space; write it as %20 in a URL")
    components = _list(raw.get("COMPONENTS", ""))
    for comp in components:
        if not is_component_name(comp):
            bad("COMPONENTS", f"{comp!r} is not an archive component such as main")
    extra = _list(raw.get("EXTRA_PKGS", ""))
    for pkg in extra:
        if not is_package_name(pkg):
            bad("EXTRA_PKGS", f"{pkg!r} is not a Debian package name")
    gen = raw.get("GENERATE_CACHE", "yes") or "yes"
    if gen not in ("yes", "no"):
        bad("GENERATE_CACHE", f"{gen!r} must be yes or no")
    clean_raw = raw.get("CLEAN_CACHE", "14")
    clean: int | None = None
    if clean_raw != "":
        if is_number(clean_raw):
            clean = int(clean_raw)
        else:
            bad("CLEAN_CACHE", f"{clean_raw!r} must be a number of days, or "
                               f"empty to never drop a cache")
    style = raw.get("PARTITION_STYLE", "") or ("none" if api_version == 5 else "msdos")
    if style not in PARTITION_STYLES:
        bad("PARTITION_STYLE", f"{style!r} must be one of "
                               f"{', '.join(PARTITION_STYLES)}")
    align_raw = raw.get("PARTITION_ALIGNMENT", "2048") or "2048"
    align = 2048
    if is_number(align_raw) and int(align_raw) > 0:
        align = int(align_raw)
    else:
        bad("PARTITION_ALIGNMENT", f"{align_raw!r} must be a positive whole "
                                   f"number of 512-byte sectors (2048 = 1 MiB)")
    image = raw.get("CACHE_IMAGE", "yes") or "yes"
    if image not in ("yes", "no"):
        bad("CACHE_IMAGE", f"{image!r} must be yes or no")
    loader = raw.get("BOOTLOADER", "none") or "none"
    if loader not in BOOTLOADERS:
        bad("BOOTLOADER", f"{loader!r} must be one of {', '.join(BOOTLOADERS)}")
    tool = raw.get("BOOTSTRAP_TOOL", "auto") or "auto"
    if tool not in BOOTSTRAP_TOOLS:
        bad("BOOTSTRAP_TOOL", f"{tool!r} must be one of {', '.join(BOOTSTRAP_TOOLS)}")
    timeout_raw = raw.get("HOOK_TIMEOUT", str(DEFAULT_HOOK_TIMEOUT))
    hook_timeout: int | None = None
    if timeout_raw != "":
        if is_number(timeout_raw) and int(timeout_raw) > 0:
            hook_timeout = int(timeout_raw)
        else:
            bad("HOOK_TIMEOUT", f"{timeout_raw!r} must be a positive number of "
                                f"seconds, or empty for no limit")
    for name in ("CUSTOMIZE_DIR", "VARIANTS_DIR"):
        value = raw.get(name, "")
        if value and not value.startswith("/"):
            bad(name, f"{value!r} must be an absolute path")
    if problems:
        raise ConfigError("Invalid settings:\n  " + "\n  ".join(problems))
    return Settings(
        suite=suite, arch=arch, mirror=mirror, proxy=proxy,
        components=components, extra_pkgs=extra,
        customize_dir=raw.get("CUSTOMIZE_DIR", ""),
        variants_dir=raw.get("VARIANTS_DIR", ""),
        generate_cache=gen == "yes", clean_cache_days=clean,
        hook_timeout=hook_timeout,
        partition_style=style, partition_alignment=align,
        bootstrap_tool=tool, cache_image=image == "yes", bootloader=loader,
        variant=variant,
        sources=tuple(files))
