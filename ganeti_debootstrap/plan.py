"""What create and import decide before they touch the disk, in one place.

Both read the settings of the instance's variant and its OS parameters,
resolve the architecture and the boot loader, and only then format the
disk the same way: the one shared set-up, in the order the checks are
reported (a bad setting before a bad parameter before a missing tool).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import bootloader, bootstrap, osparams, settings
from .environment import Request
from .paths import Paths
from .settings import Settings


@dataclass(frozen=True)
class Prepared:
    """The checked inputs of a create or an import; nothing is touched yet."""

    # The settings with the boot loader decided (its packages in EXTRA_PKGS).
    settings: Settings
    # The parameters with the root filesystem decided (the FILESYSTEM
    # setting where the parameter is empty).
    params: osparams.OSParams
    arch: str  # ARCH, or the node's architecture
    tool: str = ""  # the bootstrap tool (create only)


def prepare(request: Request, paths: Paths, *, bootstraps: bool = False) -> Prepared:
    """Read and check the settings and OS parameters of ``request``.

    ``bootstraps`` (create): the bootstrap tool is chosen too, right after
    the parameters, so that a missing tool is named before the node's
    architecture is asked for.
    """
    conf = settings.load(paths, request.os_variant, request.api_version)
    params = osparams.validate(request.os_params)
    if not params.filesystem:
        params = dataclasses.replace(params, filesystem=conf.filesystem)
    tool = bootstrap.choose_tool(conf.bootstrap_tool) if bootstraps else ""
    arch = bootstrap.resolved_arch(conf)
    # With GRUB, its packages join EXTRA_PKGS (so the cache key too), and
    # the disk gets room for its boot code.
    conf = bootloader.resolve(conf, params.bootloader, arch)
    return Prepared(conf, params, arch, tool)
