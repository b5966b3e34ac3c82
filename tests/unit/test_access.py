"""SSH keys, password hash and administrative user: checks and files (synthetic trees)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ganeti_debootstrap import access, instance_files, osparams
from ganeti_debootstrap.access import Access, AccessError
from ganeti_debootstrap.errors import ConfigError
from ganeti_debootstrap.filesystems import FsEntry
from ganeti_debootstrap.instance_files import Instance
from tests.systemtree import ROOT_UUID, make_tree, read, write

SHA512 = ("$6$ISGdkDqz4Qk3DK7K$h8vI5YJgW8E2IGrkDZikdBXrYuGmhShI71hygmn9EAjHYmEXA31Ner"
          "XTNlKQvKWLjkoNaihOVxsZuMPvW.aUw/")
YESCRYPT = "$y$j9T$PaFEMV0mbpeadmHDv0Lp31$G/LliR3MqgdjEBcFC1E.s/3vlRofsZ0Wn5JyZHXAol5"
BCRYPT = "$2b$12$jaLDOSaRL2cMkcnNI7siF.1TnPdm2iuWBWSZMC4dGI17YQsAJs/OC"
PASSWD = ("root:x:0:0:root:/root:/bin/bash\n"
          "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """Real public keys made by ssh-keygen: ed25519, rsa, ecdsa."""
    base = tmp_path_factory.mktemp("keys")
    made = {}
    for kind in ("ed25519", "rsa", "ecdsa"):
        path = base / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C",
                        f"alice {kind}@example.org", "-f", str(path)], check=True)
        made[kind] = (base / f"{kind}.pub").read_text().strip()
    return made


# --- ssh_authorized_keys ------------------------------------------------------

@pytest.mark.real_commands
def test_several_keys_separated_by_semicolons_are_accepted_and_kept_whole(keys):
    value = f" {keys['ed25519']} ;{keys['rsa']};; {keys['ecdsa']}"
    params = osparams.validate({"ssh_authorized_keys": value})
    assert params.login().keys == (keys["ed25519"], keys["rsa"], keys["ecdsa"])


@pytest.mark.real_commands
def test_a_key_with_options_is_accepted(keys):
    value = f'from="192.0.2.0/24",no-pty {keys["ed25519"]}'
    assert access.keys_problem(value) is None


@pytest.mark.parametrize("bad, why", [
    ("hunter2", "no key type followed by key data"),
    ("ssh-ed25519 not!base64 x", "not base64"),
    # A valid RSA blob claimed to be ed25519.
    ("RSA-AS-ED25519", "does not hold a key of its type"),
    # The right shape, but the key data is cut: ssh-keygen cannot read it.
    ("CUT", "ssh-keygen -l cannot read it"),
])
@pytest.mark.real_commands
def test_a_bad_key_is_refused_by_number_without_quoting_it(keys, bad, why):
    blob = keys["rsa"].split()[1]
    bad = {"RSA-AS-ED25519": f"ssh-ed25519 {blob} x",
           "CUT": f"ssh-ed25519 {keys['ed25519'].split()[1][:40]} x"}.get(bad, bad)
    with pytest.raises(ConfigError) as err:
        osparams.validate({"ssh_authorized_keys": f"{keys['ed25519']};{bad}"})
    message = str(err.value)
    assert "key 2 of 2 is not an SSH public key" in message
    assert why in message
    assert bad not in message and keys["ed25519"].split()[1] not in message
    assert "value not shown" in message


def test_too_many_keys_are_refused(keys):
    why = access.keys_problem(";".join([keys["ed25519"]] * (access.MAX_KEYS + 1)))
    assert why == f"holds {access.MAX_KEYS + 1} keys, more than {access.MAX_KEYS}"


def test_only_separators_is_no_key():
    assert access.keys_problem(" ; ;") == "holds no key"


def test_a_line_break_in_a_key_is_refused_without_quoting_it(keys):
    value = keys["ed25519"] + "\ncommand=\"evil\" " + keys["rsa"]
    with pytest.raises(ConfigError, match=r"ssh_authorized_keys=\(value not shown\)") as err:
        osparams.validate({"ssh_authorized_keys": value})
    assert "AAAA" not in str(err.value)


# --- password_hash ------------------------------------------------------------

@pytest.mark.parametrize("value", [SHA512, YESCRYPT, BCRYPT,
                                   "$5$rounds=5000$saltsalt$" + "a" * 43])
def test_crypt_hashes_are_accepted(value):
    assert osparams.validate({"password_hash": value}).password_hash == value


@pytest.mark.parametrize("value", ["hunter2", "correct horse battery staple",
                                   SHA512 + ":0:99999", "$6$salt$short", "$y$j9T$"])
def test_plain_text_or_a_broken_hash_is_refused_with_how_to_make_one(value):
    with pytest.raises(ConfigError) as err:
        osparams.validate({"password_hash": value})
    message = str(err.value)
    assert "a password in plain text is refused" in message
    assert "mkpasswd --method=yescrypt" in message and "--os-parameters-secret" in message
    assert value not in message


@pytest.mark.parametrize("value", ["$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "abJnggxhB/yWI"])
def test_md5_and_des_hashes_are_refused_as_too_weak(value):
    with pytest.raises(ConfigError, match="too weak") as err:
        osparams.validate({"password_hash": value})
    assert value not in str(err.value)


@pytest.mark.real_commands
def test_the_parameters_repr_shows_neither_keys_nor_hash(keys):
    params = osparams.validate({"ssh_authorized_keys": keys["ed25519"],
                                "password_hash": SHA512})
    shown = repr(params) + repr(params.login()) + repr(Instance("x", login=params.login()))
    assert SHA512 not in shown and keys["ed25519"].split()[1] not in shown
    assert "not shown" in shown


# --- admin_user ---------------------------------------------------------------

@pytest.mark.parametrize("value", ["admin", "_ops", "a-b_1", "x" * 32])
def test_user_names_are_accepted(value):
    assert osparams.validate({"admin_user": value}).admin_user == value


@pytest.mark.parametrize("value, why", [
    ("Admin", "not a user name"), ("1admin", "not a user name"),
    ("x" * 33, "not a user name"), ("a/b", "not a user name"),
    ("../etc", "not a user name"), ("root", "is root")])
def test_bad_user_names_are_refused(value, why):
    with pytest.raises(ConfigError, match=why):
        osparams.validate({"admin_user": value})


def test_admin_user_without_sudo_in_extra_pkgs_is_refused_before_anything():
    with pytest.raises(AccessError, match=r"Add sudo to EXTRA_PKGS"):
        access.refuse_without_sudo("admin", ("openssh-server",))
    access.refuse_without_sudo("admin", ("openssh-server", "sudo"))
    access.refuse_without_sudo("", ())


# --- the files ----------------------------------------------------------------

def _tree(tmp_path: Path, *packages: str):
    t = make_tree(tmp_path / "root", packages=("ifupdown", *packages))
    write(Path(t.root, "etc/passwd"), PASSWD)
    Path(t.root, "root").mkdir(mode=0o700)
    return t


def _shadow_field(t, user: str) -> str:
    for line in read(t, "/etc/shadow").splitlines():
        if line.split(":")[0] == user:
            return line.split(":")[1]
    raise AssertionError(f"no {user} in shadow")


def _mode_owner(t, inner: str) -> tuple[int, int, int]:
    st = os.lstat(Path(t.root, inner.lstrip("/")))
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _configure(t, login: Access, node) -> instance_files.Configured:
    return instance_files.configure(t, Instance("web1.example.org", login=login),
                                    root=FsEntry(ROOT_UUID, "ext4"), node_files=node)


def test_keys_and_hash_for_root(tmp_path, node, keys, caplog):
    t = _tree(tmp_path)
    caplog.set_level(logging.DEBUG)
    _configure(t, Access(keys=(keys["ed25519"], keys["rsa"]), password_hash=SHA512), node)
    assert _shadow_field(t, "root") == SHA512
    assert _mode_owner(t, "/etc/shadow")[0] == 0o640
    assert read(t, "/root/.ssh/authorized_keys") == f"{keys['ed25519']}\n{keys['rsa']}\n"
    assert _mode_owner(t, "/root/.ssh") == (0o700, 0, 0)
    assert _mode_owner(t, "/root/.ssh/authorized_keys") == (0o600, 0, 0)
    assert "root: 2 SSH key(s) (ssh-ed25519, ssh-rsa), a password hash" in caplog.text
    assert SHA512 not in caplog.text and "AAAA" not in caplog.text


def test_a_key_without_hash_locks_root_password(tmp_path, node, keys):
    t = _tree(tmp_path)
    _configure(t, Access(keys=(keys["ed25519"],)), node)
    assert _shadow_field(t, "root") == "*"


def test_nothing_given_keeps_the_empty_root_password(tmp_path, node):
    t = _tree(tmp_path)
    _configure(t, Access(), node)
    assert _shadow_field(t, "root") == ""
    assert not os.path.lexists(Path(t.root, "root/.ssh"))


def test_a_symlinked_ssh_directory_is_replaced_not_followed(tmp_path, node, keys):
    t = _tree(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), Path(t.root, "root/.ssh"))
    _configure(t, Access(keys=(keys["ed25519"],)), node)
    assert list(outside.iterdir()) == []
    assert _mode_owner(t, "/root/.ssh")[0] == 0o700
    assert read(t, "/root/.ssh/authorized_keys") == f"{keys['ed25519']}\n"


def _fake_useradd(t):
    def action(argv):
        name = argv[-1]
        with open(Path(t.root, "etc/passwd"), "a") as f:
            f.write(f"{name}:x:1000:1000::/home/{name}:/bin/bash\n")
        with open(Path(t.root, "etc/shadow"), "a") as f:
            f.write(f"{name}:!:19700:0:99999:7:::\n")
        Path(t.root, "home", name).mkdir(parents=True, mode=0o700)
        os.chown(Path(t.root, "home", name), 1000, 1000)
    return action


def test_admin_user_without_hash_gets_the_keys_and_passwordless_sudo(
        tmp_path, node, keys, fake_runner):
    t = _tree(tmp_path, "sudo")
    fake_runner.expect("chroot", t.root, "useradd", action=_fake_useradd(t))
    _configure(t, Access(keys=(keys["ed25519"],), admin_user="admin"), node)
    assert fake_runner.commands() == [
        f"chroot {t.root} useradd --create-home --shell /bin/bash --groups sudo -- admin"]
    assert _shadow_field(t, "root") == "*"
    assert _shadow_field(t, "admin") == "*"
    assert read(t, "/home/admin/.ssh/authorized_keys") == f"{keys['ed25519']}\n"
    assert _mode_owner(t, "/home/admin/.ssh") == (0o700, 1000, 1000)
    assert _mode_owner(t, "/home/admin/.ssh/authorized_keys") == (0o600, 1000, 1000)
    assert read(t, access.SUDOERS_DROPIN) == "admin ALL=(ALL:ALL) NOPASSWD: ALL\n"
    assert _mode_owner(t, access.SUDOERS_DROPIN) == (0o440, 0, 0)


def test_admin_user_with_hash_uses_sudo_with_its_password(tmp_path, node, keys, fake_runner):
    t = _tree(tmp_path, "sudo")
    fake_runner.expect("chroot", t.root, "useradd", action=_fake_useradd(t))
    _configure(t, Access(password_hash=YESCRYPT, admin_user="admin"), node)
    assert _shadow_field(t, "admin") == YESCRYPT
    assert _shadow_field(t, "root") == "*"
    assert not os.path.lexists(Path(t.root, access.SUDOERS_DROPIN.lstrip("/")))
    assert not os.path.lexists(Path(t.root, "home/admin/.ssh"))


def test_admin_user_without_sudo_installed_is_refused(tmp_path, node, fake_runner):
    t = _tree(tmp_path)
    with pytest.raises(AccessError, match="sudo is not in the system's packages"):
        _configure(t, Access(password_hash=SHA512, admin_user="admin"), node)
    assert fake_runner.calls == []


def test_admin_user_naming_an_existing_account_is_refused(tmp_path, node, fake_runner):
    t = _tree(tmp_path, "sudo")
    with pytest.raises(AccessError, match="daemon names an account the system already has"):
        _configure(t, Access(password_hash=SHA512, admin_user="daemon"), node)
    assert fake_runner.calls == []

