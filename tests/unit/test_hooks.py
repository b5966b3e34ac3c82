"""Customisation hooks: run-parts rules, safety checks, environment, running."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest

from ganeti_debootstrap import environment, hooks, runner, settings
from ganeti_debootstrap.errors import HookError
from ganeti_debootstrap.target import Target

# Unit tests may run as any user: trust the test's own files too.
ME = (0, os.geteuid())


def hook(directory: Path, name: str, body: str = "exit 0\n", mode: int = 0o755,
         shebang: str = "#!/bin/sh\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(shebang + body)
    path.chmod(mode)
    return path


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hooks"
    d.mkdir()
    d.chmod(0o755)
    return d


# --- which hooks, in which order ----------------------------------------------

def tricky_directory(d: Path) -> None:
    for name in ("10-base", "2-second", "B_upper", "a.sh", "backup~", "x.dpkg-old",
                 "Z9", "_under", "-dash", "99last", "zz", "ÿ-latin1"):
        hook(d, name)
    hook(d, "50-not-executable", mode=0o644)
    (d / "40-directory").mkdir()
    os.symlink("10-base", d / "20-link-to-executable")
    os.symlink("50-not-executable", d / "21-link-to-plain-file")
    os.symlink("40-directory", d / "41-link-to-directory")


def test_hooks_are_the_executables_run_parts_would_run_in_its_order(hook_dir):
    tricky_directory(hook_dir)
    names = [os.path.basename(p) for p in hooks.list_hooks(str(hook_dir))]
    assert names == ["-dash", "10-base", "2-second", "20-link-to-executable",
                     "99last", "B_upper", "Z9", "_under", "zz"]


@pytest.mark.real_commands
def test_hook_list_matches_run_parts_test_output(hook_dir):
    tricky_directory(hook_dir)
    # A fifo and a dangling link: run-parts complains and skips them.
    os.mkfifo(hook_dir / "60-fifo")
    os.symlink("/nonexistent", hook_dir / "61-dangling")
    real = runner.run(["run-parts", "--test", "--", str(hook_dir)], capture=True,
                      check=False).stdout.decode().splitlines()
    assert hooks.list_hooks(str(hook_dir)) == real


def test_odd_entries_are_skipped_with_one_warning_each(hook_dir, caplog):
    os.mkfifo(hook_dir / "60-fifo")
    os.symlink("/nonexistent", hook_dir / "61-dangling")
    with caplog.at_level(logging.WARNING):
        assert hooks.list_hooks(str(hook_dir)) == []
        assert hooks.run_all(str(hook_dir), {}, trusted_uids=ME) == []
    assert caplog.text.count("60-fifo: not an executable plain file") == 1
    assert caplog.text.count("61-dangling: No such file or directory") == 1


def test_a_missing_hook_directory_has_no_hooks(tmp_path):
    assert hooks.list_hooks(str(tmp_path / "absent")) == []
    assert hooks.list_hooks("") == []
    hooks.check_safe(str(tmp_path / "absent"))


def test_a_hook_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "hooks").write_text("")
    with pytest.raises(HookError, match="CUSTOMIZE_DIR=.* is not a directory"):
        hooks.list_hooks(str(tmp_path / "hooks"))


# --- safety -----------------------------------------------------------------

def test_a_hook_directory_writable_by_others_is_refused(hook_dir):
    hook(hook_dir, "10-a")
    hook_dir.chmod(0o757)
    with pytest.raises(HookError) as err:
        hooks.check_safe(str(hook_dir), trusted_uids=ME)
    assert f"{hook_dir} is writable by others (mode 0757)" in str(err.value)
    assert f"chmod go-w {hook_dir}" in str(err.value)


def test_a_sticky_hook_directory_is_still_refused(hook_dir):
    hook_dir.chmod(0o1777)
    with pytest.raises(HookError, match="writable by its group and others"):
        hooks.check_safe(str(hook_dir), trusted_uids=ME)


def test_a_group_writable_hook_is_refused(hook_dir):
    hook(hook_dir, "10-a")
    hook(hook_dir, "20-b", mode=0o775)
    with pytest.raises(HookError, match=r"20-b is writable by its group \(mode 0775\)"):
        hooks.check_safe(str(hook_dir), trusted_uids=ME)


def test_a_writable_but_skipped_file_does_not_matter(hook_dir):
    hook(hook_dir, "10-a")
    hook(hook_dir, "README.txt", mode=0o666)
    hooks.check_safe(str(hook_dir), trusted_uids=ME)


def test_a_writable_parent_directory_is_refused(tmp_path):
    parent = tmp_path / "shared"
    hook(parent / "hooks", "10-a")
    parent.chmod(0o777)
    with pytest.raises(HookError, match=f"{parent} is writable"):
        hooks.check_safe(str(parent / "hooks"), trusted_uids=ME)


def test_a_sticky_parent_directory_is_accepted(tmp_path):
    parent = tmp_path / "tmp-like"
    hook(parent / "hooks", "10-a")
    parent.chmod(0o1777)
    hooks.check_safe(str(parent / "hooks"), trusted_uids=ME)


def test_a_hook_linked_into_a_writable_directory_is_refused(tmp_path, hook_dir):
    elsewhere = tmp_path / "drop"
    target = hook(elsewhere, "real-hook")
    elsewhere.chmod(0o777)
    os.symlink(target, hook_dir / "10-linked")
    with pytest.raises(HookError, match=f"{elsewhere} is writable"):
        hooks.check_safe(str(hook_dir), trusted_uids=ME)


def test_a_hook_directory_reached_through_a_symlink_checks_both_places(tmp_path):
    real = tmp_path / "real"
    hook(real / "hooks", "10-a")
    public = tmp_path / "public"
    public.mkdir()
    os.symlink(real / "hooks", public / "hooks")
    hooks.check_safe(str(public / "hooks"), trusted_uids=ME)
    public.chmod(0o777)  # anyone could now point the link elsewhere
    with pytest.raises(HookError, match=f"{public} is writable"):
        hooks.check_safe(str(public / "hooks"), trusted_uids=ME)


def test_files_of_an_untrusted_owner_are_refused(hook_dir):
    hook(hook_dir, "10-a")
    untrusted = 4242 if os.geteuid() != 4242 else 4243
    with pytest.raises(HookError, match=r"owned by .*uid \d+.*not root.*chown root"):
        hooks.check_safe(str(hook_dir), trusted_uids=(untrusted,))


# --- environment ------------------------------------------------------------

GANETI = {"OS_API_VERSION": "20", "INSTANCE_NAME": "web1.example.org",
          "DISK_COUNT": "1", "DISK_0_PATH": "/dev/xenvg/web1.disk0",
          "HYPERVISOR": "kvm", "NIC_COUNT": "1", "NIC_0_MAC": "aa:00:00:11:22:33",
          "OSP_FILESYSTEM": "ext4", "TARGET": "from-ganeti", "PATH": "/bin"}


def test_hooks_get_ganeti_variables_and_the_shell_editions(tmp_path):
    request = environment.parse("create", [], GANETI)
    conf = settings.validate({"SUITE": "bookworm", "EXTRA_PKGS": "openssh-server, vim",
                              "COMPONENTS": "main contrib",
                              "MIRROR": "http://mirror.invalid/debian"}, ["defaults"], 20)
    env = hooks.environment(request, conf, "amd64", "/tmp/target", blockdev="/dev/loop3",
                            fsysdev="/dev/loop4")
    assert env["NIC_0_MAC"] == "aa:00:00:11:22:33"
    assert env["OSP_FILESYSTEM"] == "ext4"
    assert {k: env[k] for k in ("TARGET", "SUITE", "ARCH", "PARTITION_STYLE", "EXTRA_PKGS",
                                "COMPONENTS", "MIRROR", "PROXY", "BLOCKDEV", "FSYSDEV",
                                "PATH", "LC_ALL")} == {
        "TARGET": "/tmp/target", "SUITE": "bookworm", "ARCH": "amd64",
        "PARTITION_STYLE": "msdos", "EXTRA_PKGS": "openssh-server,vim",
        "COMPONENTS": "main,contrib", "MIRROR": "http://mirror.invalid/debian",
        "PROXY": "", "BLOCKDEV": "/dev/loop3", "FSYSDEV": "/dev/loop4",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def test_api5_hooks_still_get_the_instance_name():
    request = environment.parse("create", ["-i", "web1.example.org", "-b", "/dev/sdb",
                                           "-s", "/dev/sdc"], {})
    env = hooks.environment(request, settings.validate({}, [], 5), "i386", "/t",
                            blockdev="/dev/sdb", fsysdev="/dev/sdb")
    assert env["INSTANCE_NAME"] == "web1.example.org"
    assert env["PARTITION_STYLE"] == "none"
    assert env["ARCH"] == "i386"


# --- running ----------------------------------------------------------------

def test_run_all_runs_each_hook_through_the_runner_with_the_environment(hook_dir,
                                                                        fake_runner):
    first = hook(hook_dir, "10-a")
    second = hook(hook_dir, "20-b")
    fake_runner.expect(str(first)).expect(str(second))
    ran = hooks.run_all(str(hook_dir), {"TARGET": "/t"}, trusted_uids=ME)
    assert ran == [str(first), str(second)]
    assert fake_runner.calls == [(str(first),), (str(second),)]
    assert fake_runner.envs == [{"TARGET": "/t"}, {"TARGET": "/t"}]
    assert fake_runner.stdins == [None, None]


@pytest.mark.real_commands
def test_hooks_run_in_order_with_their_variables(tmp_path, hook_dir):
    log_file = tmp_path / "log"
    for name in ("20-b", "10-a", "Z-last"):
        hook(hook_dir, name, f'echo "{name} $TARGET $SUITE" >> "$LOG"\n')
    hooks.run_all(str(hook_dir), {"LOG": str(log_file), "TARGET": "/t", "SUITE": "trixie"},
                  trusted_uids=ME)
    assert log_file.read_text() == "10-a /t trixie\n20-b /t trixie\nZ-last /t trixie\n"


@pytest.mark.real_commands
def test_hooks_read_nothing_and_write_to_stderr(tmp_path, hook_dir, capfd):
    hook(hook_dir, "10-a", 'echo "said on stdout"\nwc -c > "$OUT"\n')
    hooks.run_all(str(hook_dir), {"OUT": str(tmp_path / "stdin-bytes")}, trusted_uids=ME)
    out, err = capfd.readouterr()
    assert "said on stdout" in err and "said on stdout" not in out
    assert (tmp_path / "stdin-bytes").read_text().strip() == "0"


@pytest.mark.real_commands
def test_hooks_run_with_umask_022_under_ganetis_077(tmp_path, hook_dir):
    hook(hook_dir, "10-a", 'umask > "$OUT"\n')
    saved = os.umask(0o077)
    try:
        hooks.run_all(str(hook_dir), {"OUT": str(tmp_path / "umask")}, trusted_uids=ME)
        assert os.umask(0o077) == 0o077  # ours is back
    finally:
        os.umask(saved)
    assert (tmp_path / "umask").read_text().strip() == "0022"


@pytest.mark.real_commands
def test_a_failing_hook_stops_the_install_naming_it(tmp_path, hook_dir):
    hook(hook_dir, "10-ok", 'touch "$MARK.10"\n')
    bad = hook(hook_dir, "20-bad", 'echo "apt-get: cannot reach the mirror" >&2\nexit 3\n')
    hook(hook_dir, "30-after", 'touch "$MARK.30"\n')
    with pytest.raises(HookError) as err:
        hooks.run_all(str(hook_dir), {"MARK": str(tmp_path / "ran")}, trusted_uids=ME)
    message = str(err.value)
    assert f"{bad} failed with exit status 3" in message
    assert "apt-get: cannot reach the mirror" in message
    assert (tmp_path / "ran.10").exists()
    assert not (tmp_path / "ran.30").exists()


@pytest.mark.real_commands
def test_a_hook_killed_by_a_signal_says_so(hook_dir):
    hook(hook_dir, "10-a", "kill -TERM $$\n")
    with pytest.raises(HookError, match="killed by signal 15"):
        hooks.run_all(str(hook_dir), {}, trusted_uids=ME)


@pytest.mark.real_commands
def test_a_hung_hook_is_killed_after_the_timeout(hook_dir):
    hook(hook_dir, "10-hangs", "exec sleep 30\n")
    start = time.monotonic()
    with pytest.raises(HookError, match="did not finish within 0.5 s and was killed"):
        hooks.run_all(str(hook_dir), {}, timeout=0.5, trusted_uids=ME)
    assert time.monotonic() - start < 10


@pytest.mark.real_commands
def test_a_hook_without_shebang_cannot_start(hook_dir):
    hook(hook_dir, "10-a", "echo hi\n", shebang="")
    with pytest.raises(HookError, match="could not be started: Exec format error"):
        hooks.run_all(str(hook_dir), {}, trusted_uids=ME)


@pytest.mark.real_commands
def test_a_hook_whose_interpreter_is_missing_says_so(hook_dir):
    hook(hook_dir, "10-a", "print(1)\n", shebang="#!/usr/bin/python1.5\n")
    with pytest.raises(HookError, match="interpreter on its #! line"):
        hooks.run_all(str(hook_dir), {}, trusted_uids=ME)


def test_unsafe_hooks_do_not_run_at_all(tmp_path, hook_dir):
    hook(hook_dir, "10-ok", 'touch "$MARK"\n')
    hook(hook_dir, "20-writable", mode=0o777)
    with pytest.raises(HookError, match="20-writable is writable"):
        hooks.run_all(str(hook_dir), {"MARK": str(tmp_path / "ran")}, trusted_uids=ME)
    assert not (tmp_path / "ran").exists()


# --- policy-rc.d ------------------------------------------------------------

def policy(t: Target) -> Path:
    return Path(t.root, "usr/sbin/policy-rc.d")


@pytest.fixture
def target(tmp_path: Path) -> Target:
    (tmp_path / "root/usr/sbin").mkdir(parents=True)
    return Target(str(tmp_path / "root"))


@pytest.mark.real_commands
def test_daemons_are_forbidden_inside_the_block_only(target):
    with hooks.daemons_prevented(target):
        assert policy(target).read_text() == hooks.DENY_ALL
        assert stat.S_IMODE(policy(target).stat().st_mode) == 0o755
        result = runner.run([str(policy(target)), "ssh", "start"], check=False)
        assert result.returncode == 101
    assert not os.path.lexists(policy(target))
    assert os.listdir(Path(target.root, "usr/sbin")) == []


def test_an_existing_policy_is_put_back(target):
    own = policy(target)
    own.write_text("#!/bin/sh\nexit 0\n")
    own.chmod(0o750)
    with hooks.daemons_prevented(target):
        assert own.read_text() == hooks.DENY_ALL
    assert own.read_text() == "#!/bin/sh\nexit 0\n"
    assert stat.S_IMODE(own.stat().st_mode) == 0o750
    assert os.listdir(Path(target.root, "usr/sbin")) == ["policy-rc.d"]


def test_an_existing_policy_symlink_is_put_back(target):
    os.symlink("/usr/bin/site-policy", policy(target))
    with hooks.daemons_prevented(target):
        assert not os.path.islink(policy(target))
    assert os.readlink(policy(target)) == "/usr/bin/site-policy"


def test_the_policy_is_removed_when_a_hook_fails_and_the_error_survives(target):
    policy(target).write_text("site\n")
    with pytest.raises(HookError, match="boom"):
        with hooks.daemons_prevented(target):
            raise HookError("boom")
    assert policy(target).read_text() == "site\n"


def test_a_policy_written_by_a_hook_is_kept(target, caplog):
    policy(target).write_text("site\n")
    with hooks.daemons_prevented(target):
        policy(target).write_text("from a hook\n")
    assert policy(target).read_text() == "from a hook\n"
    assert os.listdir(Path(target.root, "usr/sbin")) == ["policy-rc.d"]
    assert "A hook replaced" in caplog.text


def test_a_policy_left_from_an_interrupted_run_is_not_saved_as_the_sites(target):
    policy(target).write_text(hooks.DENY_ALL)
    with hooks.daemons_prevented(target):
        pass
    assert not os.path.lexists(policy(target))
