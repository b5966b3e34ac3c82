"""Run one of the OS scripts from the source tree, as the installed entry point would.

Usage: launch.py SYSCONFDIR LOCALSTATEDIR OS_DIR SCRIPT [ARGS...]

SCRIPT ganeti-debootstrap-cache runs the administrator's command instead
(what the generated sbin/ganeti-debootstrap-cache runs).

Tests run the scripts in their own process (signals, stdout as the data
stream, a clean environment) without configure; this stands in for the
generated entry point. When COVERAGE_PROCESS_START is set, the process is
measured too.
"""

import os
import sys

if os.environ.get("COVERAGE_PROCESS_START"):
    import coverage

    coverage.process_startup()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ganeti_debootstrap import cacheadmin, cli  # noqa: E402
from ganeti_debootstrap.paths import Paths  # noqa: E402

sysconfdir, localstatedir, os_dir, script = sys.argv[1:5]
if script == cacheadmin.PROGRAM:
    sys.exit(cacheadmin.main(None, argv=sys.argv[5:],
                             paths=Paths(sysconfdir, localstatedir, os_dir)))
sys.exit(cli.main(script, None, "", argv=sys.argv[5:],
                  paths=Paths(sysconfdir, localstatedir, os_dir)))
