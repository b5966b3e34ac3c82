"""A small tree with the files a debootstrapped system has, for unit tests.

The tests of what create writes into the instance (instance_files, access,
cloud-init, network, APT sources) and the composition tests of create
build their instance roots with :func:`make_tree`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ganeti_debootstrap.target import Target

ROOT_UUID = "0a1b2c3d-1111-2222-3333-444455556666"

SHADOW = ("root:*:19700:0:99999:7:::\n"
          "daemon:*:19700:0:99999:7:::\n"
          "_apt:*:19700:0:99999:7:::\n")


def status_paragraph(package: str, status: str = "install ok installed") -> str:
    return (f"Package: {package}\nStatus: {status}\nPriority: optional\n"
            f"Architecture: amd64\nVersion: 1.0\nDescription: {package}\n\n")


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def make_tree(root: Path, *, init: str = "systemd", release: str = "bookworm",
              packages: tuple[str, ...] = ("ifupdown",)) -> Target:
    """A small tree with the files a debootstrapped system has.

    init: "systemd", "sysvinit" or "none" (minbase). release: "bookworm"
    (merged /usr, systemd files listed under /lib), "trixie" (listed under
    /usr/lib) or "split" (no merged /usr, no dpkg file list).
    """
    root.mkdir(parents=True, exist_ok=True)
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc", "var/lib/dpkg/info"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if release != "split":
        for d in ("bin", "sbin", "lib"):
            os.symlink(f"usr/{d}", root / d)
    else:
        for d in ("bin", "sbin", "lib"):
            (root / d).mkdir()
    write(root / "etc/shadow", SHADOW, 0o640)
    write(root / "etc/fstab", "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n")
    write(root / "etc/hostname", "node1\n")
    write(root / "etc/machine-id", "3f2504e04f8911d39a0c0305e82c3301\n", 0o444)
    write(root / "var/lib/dbus/machine-id", "3f2504e04f8911d39a0c0305e82c3301\n", 0o444)
    write(root / "var/lib/systemd/random-seed", "seed", 0o600)
    write(root / "var/cache/apt/archives/libc6_2.36_amd64.deb", "deb")
    write(root / "var/cache/apt/archives/partial/zlib1g_1.2_amd64.deb", "part")
    write(root / "var/cache/apt/archives/lock", "", 0o640)
    write(root / "etc/udev/rules.d/70-persistent-net.rules", "SUBSYSTEM==net\n")
    all_packages = list(packages)
    if init == "systemd":
        all_packages += ["systemd", "systemd-sysv"]
        write(root / "usr/lib/systemd/systemd", "ELF", 0o755)
        unit_dir = "lib/systemd/system" if release == "split" else "usr/lib/systemd/system"
        write(root / unit_dir / "serial-getty@.service", "[Unit]\n")
        init_target = "/lib/systemd/systemd" if release != "trixie" else "../lib/systemd/systemd"
        if release == "split":
            write(root / "lib/systemd/systemd", "ELF", 0o755)
            os.symlink("/lib/systemd/systemd", root / "sbin/init")
        else:
            os.symlink(init_target, root / "usr/sbin/init")
            listed = "/lib" if release == "bookworm" else "/usr/lib"
            write(root / "var/lib/dpkg/info/systemd.list",
                  f"/.\n{listed}/systemd/system/getty@.service\n"
                  f"{listed}/systemd/system/serial-getty@.service\n")
    elif init == "sysvinit":
        all_packages += ["sysvinit-core"]
        write(root / "usr/sbin/init", "ELF", 0o755)
        write(root / "etc/inittab",
              "id:2:initdefault:\n"
              "1:2345:respawn:/sbin/getty --noclear 38400 tty1\n"
              "#T0:23:respawn:/sbin/getty -L ttyS0 9600 vt100\n")
    write(root / "var/lib/dpkg/status",
          "".join(status_paragraph(p) for p in all_packages))
    return Target(str(root))


def read(t: Target, inner: str) -> str:
    return Path(t.root, inner.lstrip("/")).read_text()
