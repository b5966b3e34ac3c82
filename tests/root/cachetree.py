"""A small root tree with every kind of file and metadata tar must keep.

Owners, modes (setuid, setgid directories), a file capability, ACLs, an
extended attribute, a hard link, symlinks, device nodes, a FIFO and a
sparse file, all with one mtime: what the cache's archive must carry over
(tests/root/test_cache.py, also in the processes its concurrency tests
start).
"""

from __future__ import annotations

import os
import stat
import subprocess

MTIME = 1_700_000_000


def make_system(root: str) -> None:
    """A small tree with every kind of file and metadata a root filesystem has."""
    def write(name: str, text: str = "x\n", mode: int = 0o644) -> str:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    write("etc/os-release", 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n')
    write("etc/debian_version", "13.0\n")
    write("usr/bin/dpkg", "#!/bin/sh\n", 0o755)
    write("etc/shadow", "root::19000:0:99999:7:::\n", 0o640)
    os.chown(os.path.join(root, "etc/shadow"), 0, 42)
    ping = write("usr/bin/ping", "binary\n", 0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", ping], check=True)
    su = write("usr/bin/su", "binary\n", 0o4755)
    os.chmod(su, 0o4755)
    owned = write("home/user/.profile", "user file\n", 0o600)
    os.chown(owned, 1234, 1234)
    os.chown(os.path.dirname(owned), 1234, 1234)
    shared = os.path.join(root, "srv/shared")
    os.makedirs(shared)
    os.chmod(shared, 0o2775)
    acl_file = write("srv/shared/report", "acl\n", 0o640)
    subprocess.run(["setfacl", "-m", "u:1234:rw", acl_file], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:100:rx", shared], check=True)
    attr = write("etc/site.conf", "site\n")
    os.setxattr(attr, "user.site", b"preseeded")
    os.link(os.path.join(root, "usr/bin/dpkg"), os.path.join(root, "usr/bin/dpkg-hardlink"))
    os.symlink("../usr/share/zoneinfo/UTC", os.path.join(root, "etc/localtime"))
    os.symlink("/dangling/absolute", os.path.join(root, "etc/absolute-link"))
    os.makedirs(os.path.join(root, "dev"))
    os.mknod(os.path.join(root, "dev/null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(os.path.join(root, "dev/initctl"), 0o600)
    with open(os.path.join(root, "var-sparse"), "wb") as f:
        f.truncate(64 * 2**20)
        f.write(b"head")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))
