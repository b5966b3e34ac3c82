"""``verify``: the checks Ganeti asks for before it touches an instance.

Ganeti runs ``verify parameters`` before every add, reinstall, import and
``gnt-instance modify -O``, with only the OS_*, OSP_* and DEBUG_LEVEL
variables set; it must answer quickly and explain a bad value.
"""

from __future__ import annotations

import logging

from . import osparams
from .environment import Request
from .paths import Paths

log = logging.getLogger(__name__)


def run(request: Request, paths: Paths) -> None:
    """Run each requested check; a failed one raises ConfigError."""
    for check in request.verify_checks:
        if check == "parameters":
            params = osparams.validate(request.os_params)
            log.debug("OS parameters are valid: %s", params)
