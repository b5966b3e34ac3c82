"""A scratch installation of the OS definition, for unit tests.

:func:`make_paths` lays out the settings file, the variants and the OS
directory the way the package installs them, below a test's directory,
and returns the :class:`Paths` the scripts are given.
"""

from __future__ import annotations

import os
from pathlib import Path

from ganeti_debootstrap.paths import Paths


def make_paths(base: Path, *, defaults: str | None = "", default_conf: str = "",
               variants_list: str = "default\n", localstatedir: bool = True) -> Paths:
    """The installation below ``base``: etc, var and the OS directory.

    ``defaults``: the settings file's text (None: no settings file);
    ``default_conf``: the "default" variant's; ``variants_list``: the
    published variants. Directories are 0755 and files 0644, as installed
    (settings.load refuses settings others could change).
    """
    paths = Paths(str(base / "etc"), str(base / "var"), str(base / "os"))
    dirs = [os.path.dirname(paths.defaults_file), paths.default_variants_dir, paths.os_dir]
    if localstatedir:
        dirs.append(paths.localstatedir)
    for d in dirs:
        os.makedirs(d, mode=0o755)
    files = {paths.variants_list: variants_list,
             os.path.join(paths.default_variants_dir, "default.conf"): default_conf}
    if defaults is not None:
        files[paths.defaults_file] = defaults
    for path, text in files.items():
        Path(path).write_text(text)
        os.chmod(path, 0o644)
    return paths
