"""Ganeti OS definition that installs Debian or Ubuntu with debootstrap.

Each script installed in the OS directory is a thin entry point that calls
:func:`ganeti_debootstrap.cli.main` with its own name and the paths that
configure substituted into ``common.py``.
"""
