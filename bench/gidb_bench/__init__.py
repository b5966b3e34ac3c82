"""The benchmark of ganeti-instance-debootstrap's performance targets.

``bench/run`` is the entry point; each module owns one concern: options,
statistics and verdicts, running and timing processes, the scratch
installation, releasing devices, the machine description, and one module
per scenario (warm, cold, startup, parallel, memory).
"""
