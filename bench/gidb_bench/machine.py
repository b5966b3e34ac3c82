"""What the benchmark ran on: CPU, memory, kernel, the work directory's disk, load."""

from __future__ import annotations

import os
import platform
import subprocess

from .procs import read_text


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" of /proc/cpuinfo's text."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def mem_total_gib(meminfo: str) -> float:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages and the running/total tasks."""
    fields = read_text("/proc/loadavg").split()
    return " ".join(fields[:4]) if fields else "unknown"


def filesystem_of(path: str) -> str:
    """The filesystem type and device holding ``path`` (from mountinfo)."""
    real = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            point, fstype = before.split()[4], after.split()[0]
            if (real == point or real.startswith(point.rstrip("/") + "/")) \
                    and len(point) >= len(best[0]):
                best = (point, f"{fstype} on {after.split()[1]} (mounted at {point})")
    return best[1] or "unknown"


def package_version(name: str) -> str:
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name],
                             capture_output=True, text=True)
    except OSError:
        return "unknown"
    return res.stdout.strip() or "not installed"


def describe(workdir: str) -> list[str]:
    """Lines describing the machine, for the end of the report."""
    return [
        f"CPU:        {cpu_model(read_text('/proc/cpuinfo'))}",
        f"cores:      {os.cpu_count()}",
        f"memory:     {mem_total_gib(read_text('/proc/meminfo')):.1f} GiB",
        f"kernel:     {platform.release()} ({platform.machine()})",
        f"work dir:   {workdir}: {filesystem_of(workdir)}",
        f"python:     /usr/bin/python3 {platform.python_version()}",
        f"tools:      debootstrap {package_version('debootstrap')}, mmdebstrap "
        f"{package_version('mmdebstrap')}, e2fsprogs {package_version('e2fsprogs')}, "
        f"tar {package_version('tar')}, util-linux {package_version('util-linux')}",
    ]
