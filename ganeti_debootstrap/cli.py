"""The entry point every script calls, and the one top-level error handler."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence

from . import environment, log, signals
from .errors import DefinitionError, Interrupted, UsageError
from .paths import Paths, from_common

# The module implementing each script's action; each has run(request, paths).
ACTIONS = {
    "create": "create",
    "import": "import_disk",
    "export": "export",
    "rename": "rename",
    "verify": "verify",
}

logger = logging.getLogger("ganeti_debootstrap")


def main(script: str, common: object, script_file: str,
         argv: Sequence[str] | None = None,
         environ: Mapping[str, str] | None = None,
         paths: Paths | None = None) -> int:
    """Run ``script`` as Ganeti asked; return the exit status.

    ``common`` is the configure-generated module and ``script_file`` the
    entry point's ``__file__``; ``paths`` overrides both (tests).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    env = os.environ if environ is None else environ
    debug = environment.debug_requested(env)
    log.setup(debug)
    signals.install()
    if paths is None:
        paths = from_common(common, script_file)
    try:
        request = environment.parse(script, argv, env)
        module = importlib.import_module(f"ganeti_debootstrap.{ACTIONS[script]}")
        module.run(request, paths)
        return 0
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_status
    except DefinitionError as exc:
        if debug:
            traceback.print_exc()
        log.final_error(script, str(exc))
        return exc.exit_status
    except Interrupted as exc:
        log.final_error(script, f"Stopped: {exc}. Everything it had set up was "
                                f"released; run it again when ready.")
        return 128 + exc.signum
    except Exception:
        traceback.print_exc()
        log.final_error(script, "Internal error (the traceback above). Please "
                                "report it with this log.")
        return 70
