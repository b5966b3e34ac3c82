"""The way into a new instance: SSH keys, a password hash, an administrative user.

From three OS parameters, all of them the tenant's input (trust.md):

- ``ssh_authorized_keys``: one or more public keys, separated by ``;`` (the
  value of ``gnt-instance add -O`` cannot hold a plain comma or a line
  break); each is checked by the node's ``ssh-keygen -l`` and written one a
  line into the account's ``~/.ssh/authorized_keys`` (0600, directory 0700,
  both owned by the account).
- ``password_hash``: a crypt(3) hash (yescrypt, SHA-512, SHA-256 or
  bcrypt) for the account's /etc/shadow entry; plain text is refused.
- ``admin_user``: the account both go to, made by create with
  ``useradd`` inside the freshly bootstrapped system, in the group
  ``sudo``; without a password hash it gets passwordless sudo (it would
  have no password to give). root's password is then locked.

Without a key and a hash root keeps the shell edition's empty password.
None of the values is ever logged: only the number and types of the keys.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import stat
from dataclasses import dataclass

from . import fsutil, runner
from .errors import DefinitionError
from .target import Target

log = logging.getLogger(__name__)

KEY_SEPARATOR = ";"
MAX_KEYS = 64
MAX_KEY_LENGTH = 16384  # an RSA-16384 key is about 2.8 kB in base64
# What authorized_keys(5) accepts as a key type, before its base64 blob.
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
             "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-dss")
# yescrypt ($y$), gost-yescrypt ($gy$), SHA-512 ($6$), SHA-256 ($5$),
# bcrypt ($2b$/$2y$/$2a$). The character set leaves out ':' (the field
# separator of /etc/shadow) and everything else that could end a field.
_HASH = re.compile(
    r"\$(?:y|gy)\$[./A-Za-z0-9]+\$[./A-Za-z0-9]*\$[./A-Za-z0-9]{43}"
    r"|\$[56]\$(?:rounds=[0-9]{1,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{43,86}"
    r"|\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_WEAK_HASH = re.compile(r"\$1\$[^:]*|[./A-Za-z0-9]{13}")
# useradd's default NAME_REGEX, without the trailing '$' (Samba machines).
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
SUDOERS_DROPIN = "/etc/sudoers.d/ganeti-instance-debootstrap"
SUDO_GROUP = "sudo"
MAKE_HASH = ("mkpasswd --method=yescrypt (Debian package whois) or "
             "openssl passwd -6")


class AccessError(DefinitionError):
    """The instance's accounts cannot be set up as the OS parameters ask."""


@dataclass(frozen=True, repr=False)
class Access:
    """Who gets in, and how (empty: the shell edition's empty root password)."""

    keys: tuple[str, ...] = ()
    password_hash: str = ""
    admin_user: str = ""

    def __repr__(self) -> str:
        # Never the keys or the hash, should this reach a log or a traceback.
        return (f"Access(keys={len(self.keys)}, password_hash="
                f"{'<not shown>' if self.password_hash else ''!r}, "
                f"admin_user={self.admin_user!r})")

    @property
    def user(self) -> str:
        return self.admin_user or "root"

    @property
    def given(self) -> bool:
        return bool(self.keys or self.password_hash or self.admin_user)


# --- checks (verify parameters, create's plan) --------------------------------

def split_keys(value: str) -> list[str]:
    """The keys of ``ssh_authorized_keys``: split at ';', blanks and empty ones dropped."""
    return [k.strip() for k in value.split(KEY_SEPARATOR) if k.strip()]


def _key_shape_problem(key: str) -> str | None:
    """Why ``key`` is not an authorized_keys line with a known key type, or None."""
    fields = key.split()
    for i, field in enumerate(fields[:-1]):
        if field in KEY_TYPES:
            try:
                blob = base64.b64decode(fields[i + 1], validate=True)
            except (binascii.Error, ValueError):
                return "its key data is not base64"
            size = int.from_bytes(blob[:4], "big")
            if blob[4:4 + size].decode("ascii", "replace") != field:
                return "its key data does not hold a key of its type"
            return None
    return (f"it has no key type followed by key data (a key looks like "
            f"'ssh-ed25519 AAAAC3... comment'; types: {', '.join(KEY_TYPES[:5])})")


def keys_problem(value: str) -> str | None:
    """Why ``ssh_authorized_keys`` is refused, or None; never quotes a key.

    Each key's shape is checked here, then ``ssh-keygen -l`` (the node's)
    must read it: the key reaches ssh-keygen on its standard input, so
    neither the command line nor the log holds it.
    """
    keys = split_keys(value)
    if not keys:
        return "holds no key"
    if len(keys) > MAX_KEYS:
        return f"holds {len(keys)} keys, more than {MAX_KEYS}"
    for number, key in enumerate(keys, 1):
        where = f"key {number} of {len(keys)}"
        if len(key) > MAX_KEY_LENGTH:
            return f"{where} is {len(key)} characters long, more than {MAX_KEY_LENGTH}"
        why = _key_shape_problem(key)
        if why is None:
            res = runner.run(["ssh-keygen", "-l", "-f", "-"], stdin=key.encode() + b"\n",
                             capture=True, check=False)
            if res.returncode != 0:
                why = "ssh-keygen -l cannot read it"
        if why is not None:
            return (f"{where} is not an SSH public key: {why}. Keys are separated "
                    f"by '{KEY_SEPARATOR}' (which a key's comment must not hold)")
    return None


def password_hash_problem(value: str) -> str | None:
    """Why ``password_hash`` is refused, or None; never quotes the value."""
    if _HASH.fullmatch(value):
        return None
    if _WEAK_HASH.fullmatch(value):
        return (f"is an MD5 or DES crypt hash, which is too weak; make a "
                f"yescrypt or SHA-512 one with {MAKE_HASH}")
    return (f"is not a crypt(3) hash (yescrypt $y$, SHA-512 $6$, SHA-256 $5$ "
            f"or bcrypt $2b$); a password in plain text is refused, as it "
            f"would be stored in Ganeti's configuration and the instance's "
            f"files as it is. Make a hash with {MAKE_HASH}, and pass it as a "
            f"secret parameter: gnt-instance add --os-parameters-secret "
            f"password_hash='$y$...' ...")


def admin_user_problem(value: str) -> str | None:
    """Why ``admin_user`` is refused, or None."""
    if not _USER.fullmatch(value):
        return ("is not a user name: 1 to 32 lower-case letters, digits, '_' "
                "or '-', starting with a letter or '_'")
    if value == "root":
        return "is root, who needs no creating: leave admin_user empty"
    return None


# --- writing ------------------------------------------------------------------

@dataclass(frozen=True)
class Account:
    """An account of the instance, from its /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str


def find_account(t: Target, name: str) -> Account | None:
    """``name``'s entry in the instance's /etc/passwd, or None."""
    for line in t.read_text("/etc/passwd").splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == name:
            return Account(name, int(fields[2]), int(fields[3]), fields[5])
    return None


def refuse_without_sudo(admin_user: str, extra_pkgs: tuple[str, ...]) -> None:
    """Refuse ``admin_user`` before the disk is touched when sudo will be missing."""
    if admin_user and "sudo" not in extra_pkgs:
        raise AccessError(_no_sudo(admin_user))


def _no_sudo(name: str) -> str:
    return (f"The OS parameter admin_user={name} asks for an administrative "
            f"user with sudo, but sudo is not in the system's packages. Add "
            f"sudo to EXTRA_PKGS in the variant or the defaults file (e.g. "
            f'EXTRA_PKGS="$EXTRA_PKGS,sudo"), or leave admin_user empty to '
            f"give the key and password to root.")


def make_admin_user(t: Target, name: str, packages: frozenset[str]) -> Account:
    """Create ``name`` in the freshly bootstrapped system, in the group sudo.

    The system is ours (create only), so its own useradd runs in a chroot.
    """
    if "sudo" not in packages:
        raise AccessError(_no_sudo(name))
    if find_account(t, name) is not None:
        raise AccessError(
            f"The OS parameter admin_user={name} names an account the system "
            f"already has (a system account). Choose another name, e.g. "
            f"gnt-instance modify -O admin_user=admin INSTANCE, then reinstall.")
    # Ganeti's umask (077) would make useradd's files unreadable: its own
    # HOME_MODE/UMASK from login.defs decide the home directory's mode.
    with fsutil.umask(fsutil.PACKAGE_UMASK):
        runner.run(["chroot", t.root, "useradd", "--create-home", "--shell",
                    "/bin/bash", "--groups", SUDO_GROUP, "--", name])
    account = find_account(t, name)
    if account is None:
        raise AccessError(f"useradd did not add {name} to the instance's /etc/passwd.")
    return account


def set_password_field(t: Target, user: str, field: str) -> None:
    """Set ``user``'s password field in /etc/shadow, keeping mode, owner, other lines."""
    st = os.stat(t.path("/etc/shadow"))
    lines = t.read_text("/etc/shadow").split("\n")
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == user and len(fields) >= 2:
            fields[1] = field
            lines[i] = ":".join(fields)
            break
    else:
        raise AccessError(f"/etc/shadow in the installed system has no line for "
                          f"{user}, so its password cannot be set. The bootstrap "
                          f"cache is probably damaged: remove it so that the next "
                          f"create bootstraps afresh.")
    t.write_text("/etc/shadow", "\n".join(lines), mode=stat.S_IMODE(st.st_mode))
    os.chown(t.path_nofollow("/etc/shadow"), st.st_uid, st.st_gid, follow_symlinks=False)


def _home_dir(t: Target, account: Account, inner: str, mode: int) -> None:
    """Directory ``inner`` owned by the account with ``mode`` (not a symlink)."""
    path = t.path_nofollow(inner)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    if not os.path.isdir(path):
        os.mkdir(path, mode)
    os.chown(path, account.uid, account.gid, follow_symlinks=False)
    os.chmod(path, mode)


def write_authorized_keys(t: Target, account: Account, keys: tuple[str, ...]) -> str:
    """``~/.ssh/authorized_keys`` with ``keys``, as sshd's StrictModes wants it."""
    home = account.home if account.home.startswith("/") else f"/home/{account.name}"
    if not t.exists(home):
        _home_dir(t, account, home, 0o700)
    _home_dir(t, account, f"{home}/.ssh", 0o700)
    inner = f"{home}/.ssh/authorized_keys"
    t.write_text(inner, "".join(f"{key}\n" for key in keys), mode=0o600)
    os.chown(t.path_nofollow(inner), account.uid, account.gid, follow_symlinks=False)
    return inner


def configure(t: Target, access: Access, packages: frozenset[str]) -> str:
    """Set up the accounts for ``access`` (given); return what the log should say.

    root's password: the hash when it is root's, locked ('*') otherwise
    (instance_files empties it when nothing is given at all).
    """
    if access.admin_user:
        account = make_admin_user(t, access.admin_user, packages)
        if not access.password_hash:
            # No password to give sudo: it asks none. 0440, as visudo wants.
            t.write_text(SUDOERS_DROPIN, f"{account.name} ALL=(ALL:ALL) NOPASSWD: ALL\n",
                         mode=0o440)
        set_password_field(t, account.name, access.password_hash or "*")
        set_password_field(t, "root", "*")
    else:
        found = find_account(t, "root")
        if found is None:
            raise AccessError("The installed system's /etc/passwd has no root.")
        account = found
        set_password_field(t, "root", access.password_hash or "*")
    if access.keys:
        write_authorized_keys(t, account, access.keys)
    kinds = sorted({next((f for f in k.split() if f in KEY_TYPES), "?") for k in access.keys})
    return (f"{account.name}: {len(access.keys)} SSH key(s)"
            f"{' (' + ', '.join(kinds) + ')' if kinds else ''}, "
            f"{'a password hash' if access.password_hash else 'no password'}"
            f"{', in the group sudo' if access.admin_user else ''}")
