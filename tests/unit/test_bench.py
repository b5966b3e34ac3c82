"""The benchmark's own logic: statistics, verdicts, options, parsing (no timing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from gidb_bench import (cold, devices, install, machine, options, procs,  # noqa: E402
                        startup, stats)
from gidb_bench.context import archive_from_log, bootstrapped  # noqa: E402
from gidb_bench.main import _given_cache_dir, _link_cache  # noqa: E402

# -- statistics and verdicts -----------------------------------------------


def test_median_of_an_odd_count_is_the_middle_value():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_median_of_nothing_is_refused():
    with pytest.raises(ValueError):
        stats.median([])


def test_ratio_is_ours_over_the_reference():
    assert stats.ratio(1.0, 4.0) == 0.25


def test_ratio_against_a_zero_reference_is_refused():
    with pytest.raises(ValueError):
        stats.ratio(1.0, 0.0)


def test_interleaving_runs_every_label_once_per_round():
    order = stats.interleaved(["ref", "ours"], 3)
    assert len(order) == 6
    for r in range(3):
        assert sorted(label for rnd, label in order if rnd == r) == ["ours", "ref"]


def test_interleaving_rotates_which_label_starts_a_round():
    order = stats.interleaved(["a", "b", "c"], 4)
    starts = [order[i][1] for i in range(0, len(order), 3)]
    assert starts == ["a", "b", "c", "a"]
    assert [label for _, label in order[3:6]] == ["b", "c", "a"]


def test_interleaving_no_runs_gives_nothing():
    assert stats.interleaved(["a", "b"], 0) == []


def test_a_ratio_at_the_target_passes_and_above_it_fails():
    at = stats.Verdict("warm", "ratio", 0.33, 0.33)
    above = stats.Verdict("warm", "ratio", 0.3301, 0.33)
    assert at.passed and "PASS" in at.line()
    assert not above.passed and "FAIL" in above.line()


def test_an_exact_verdict_needs_equality():
    assert stats.Verdict("parallel", "bootstraps", 1, 1, exact=True).passed
    none = stats.Verdict("parallel", "bootstraps", 0, 1, exact=True)
    assert not none.passed and "target == 1" in none.line()


def test_a_verdict_line_shows_value_unit_target_and_note():
    line = stats.Verdict("memory", "peak", 27.94, 100, " MiB", note="python 27 MiB").line()
    assert line == "peak: 27.9 MiB (target <= 100 MiB)  PASS  [python 27 MiB]"


def test_a_failure_never_passes():
    failure = stats.Failure("cold", "debootstrap failed")
    assert not failure.passed
    assert failure.line() == "cold: ERROR: debootstrap failed"


def test_table_aligns_the_first_column_left_and_the_others_right():
    lines = stats.table(["run", "time"], [["1", "0.5"], ["median", "10.25"]])
    assert lines == ["run      time", "1         0.5", "median  10.25"]


LOG = """\
Using the cache /var/cache/ganeti-instance-debootstrap/cache-trixie-amd64-0123456789ab.tar
filesystem image: done in 0.00 s
check disk: done in 0.00 s
partition: done in 0.01 s
resize2fs 1.47.0 (5-Feb-2023)
copy filesystem image: done in 0.09 s
configure instance: done in 0.03 s
unmount and release: done in 0.11 s
Instance i1.example.org created on /var/tmp/d1.img
"""


def test_phase_times_are_read_from_a_scripts_log_in_order():
    phases = stats.phase_times(LOG)
    assert list(phases) == ["filesystem image", "check disk", "partition",
                            "copy filesystem image", "configure instance",
                            "unmount and release"]
    assert phases["copy filesystem image"] == 0.09


def test_median_phases_takes_each_phase_over_the_runs_that_logged_it():
    runs = [{"a": 1.0, "b": 5.0}, {"a": 3.0}, {"a": 2.0, "c": 7.0, "b": 1.0}]
    assert stats.median_phases(runs) == {"a": 2.0, "b": 3.0, "c": 7.0}


def test_a_cache_archive_is_found_in_a_create_log():
    assert archive_from_log(LOG) == \
        "/var/cache/ganeti-instance-debootstrap/cache-trixie-amd64-0123456789ab.tar"
    stored = "Stored the cache /c/cache-trixie-amd64-0123456789ab.tar (200 MiB)\n"
    assert archive_from_log(stored) == "/c/cache-trixie-amd64-0123456789ab.tar"
    assert archive_from_log("nothing here\n") is None


def test_a_bootstrap_is_recognised_in_a_create_log_and_its_tool_named():
    text = "No cache for trixie\nBootstrapping trixie with mmdebstrap (this takes a minute)\n"
    assert bootstrapped(text)
    assert cold.tool_used(text) == "mmdebstrap"
    assert not bootstrapped(LOG)
    assert cold.tool_used(LOG) == "none"


# -- options ------------------------------------------------------------------


def test_default_options_run_every_scenario_in_order():
    opts = options.parse_args([])
    assert opts.scenarios == ("warm", "roottypes", "cold", "refresh", "startup", "parallel",
                              "memory", "backup", "backup-kinds", "ganeti")
    assert (opts.runs, opts.cold_runs, opts.entry) == (5, 3, "installed")
    assert opts.workdir == "/var/tmp" and opts.cache is None


def test_quick_skips_the_scenarios_that_bootstrap_and_runs_fewer_times():
    opts = options.parse_args(["--quick"])
    assert opts.scenarios == ("warm", "roottypes", "startup", "memory", "backup",
                              "backup-kinds")
    assert opts.runs == 3


def test_named_scenarios_run_in_the_canonical_order_once_even_when_quick():
    opts = options.parse_args(["--quick", "--scenarios", "memory,cold,warm,cold"])
    assert opts.scenarios == ("warm", "cold", "memory")
    assert opts.cold_runs == 1


def test_explicit_run_counts_win_over_quick():
    opts = options.parse_args(["--quick", "--runs", "9", "--cold-runs", "2"])
    assert (opts.runs, opts.cold_runs) == (9, 2)


def test_workdir_cache_source_tree_and_keep_are_taken():
    opts = options.parse_args(["--workdir", "/srv/x", "--cache", "/var/tmp/v",
                               "--source-tree", "--keep"])
    assert (opts.workdir, opts.cache, opts.entry, opts.keep) == \
        ("/srv/x", "/var/tmp/v", "source", True)


@pytest.mark.parametrize("argv", [["--scenarios", "warm,fast"], ["--scenarios", ","],
                                  ["--runs", "0"], ["--runs", "two"], ["--bogus"]])
def test_bad_arguments_are_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        options.parse_args(argv)
    assert exc.value.code == 2
    assert "bench/run" in capsys.readouterr().err


def test_an_unknown_scenario_error_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--scenarios", "fast"])
    assert "warm,roottypes,cold,refresh,startup,parallel,memory" in capsys.readouterr().err


# -- strace output --------------------------------------------------------------

TRACE = """\
100  1000.000000 execve("./create", ["./create"], 0x7ffd /* 13 vars */) = 0
101  1000.049000 execve("/bin/sh", ["/bin/sh", "-c", "..."], 0x7f /* 2 vars */ <unfinished ...>
100  1000.049500 exit_group(0 <unfinished ...>
101  1000.049900 <... execve resumed>) = 0
102  1000.060000 execve("/sbin/dpkg", ["dpkg"], 0x7f /* 15 vars */) = -1 ENOENT (No such file or directory)
102  1000.060100 execve("/bin/dpkg", ["dpkg"], 0x7f /* 15 vars */) = 0
100  1000.400000 exit_group(0)           = ?
"""


def test_the_trace_lists_execs_and_exits_with_their_programs():
    events = startup.parse_trace(TRACE)
    assert [(e.pid, e.call, e.program) for e in events] == [
        (100, "execve", "./create"), (101, "execve", "/bin/sh"),
        (100, "exit_group", ""), (102, "execve", "/sbin/dpkg"),
        (102, "execve", "/bin/dpkg"), (100, "exit_group", "")]


def test_startup_is_the_time_from_the_scripts_exec_to_its_first_childs_exec():
    delay, command = startup.startup_delay(startup.parse_trace(TRACE))
    assert delay == pytest.approx(0.049)
    assert command == "sh"


def test_a_script_without_commands_starts_up_until_its_exit():
    trace = ('7 5.000000 execve("./verify", ["./verify", "parameters"], 0x1) = 0\n'
             '7 5.044000 exit_group(0)           = ?\n')
    delay, command = startup.startup_delay(startup.parse_trace(trace))
    assert delay == pytest.approx(0.044)
    assert command == "(exit)"


def test_a_trace_without_the_scripts_exec_is_refused():
    with pytest.raises(ValueError):
        startup.startup_delay([])


# -- devices ---------------------------------------------------------------------

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 7:1 / /tmp/ganeti-debootstrap.ab12 rw,relatime - ext4 /dev/loop1 rw
91 90 0:5 / /tmp/ganeti-debootstrap.ab12/proc rw - proc proc rw
92 22 7:3 / /var/tmp/gidb-bench.x/mnt\\040dir rw - ext4 /dev/loop3 rw
93 22 7:5 / /tmp/someone-else rw - ext4 /dev/loop5 rw
"""


def test_mountinfo_lines_give_mount_point_and_source_unescaped():
    mounts = devices.parse_mountinfo(MOUNTINFO)
    assert devices.Mount("/var/tmp/gidb-bench.x/mnt dir", "/dev/loop3") in mounts
    assert len(mounts) == 5


def test_our_loops_are_those_on_our_files_and_loops_stacked_on_them():
    backing = {"/dev/loop1": "/var/tmp/gidb-bench.x/disks/a.img",
               "/dev/loop2": "/dev/loop1",
               "/dev/loop3": "/var/tmp/gidb-bench.x/disks/b.img",
               "/dev/loop5": "/tmp/pytest-of-root/disk0.img",
               "/dev/loop6": "/var/tmp/gidb-bench.xy/disk.img"}
    assert devices.our_loops(backing, ["/var/tmp/gidb-bench.x"]) == \
        {"/dev/loop1", "/dev/loop2", "/dev/loop3"}


def test_our_mounts_include_nested_ones_deepest_first_and_no_one_elses():
    mounts = devices.parse_mountinfo(MOUNTINFO)
    points = devices.our_mounts(mounts, {"/dev/loop1"}, ["/var/tmp/gidb-bench.x"])
    assert points.index("/tmp/ganeti-debootstrap.ab12/proc") < \
        points.index("/tmp/ganeti-debootstrap.ab12")
    assert set(points) == {"/tmp/ganeti-debootstrap.ab12/proc",
                           "/tmp/ganeti-debootstrap.ab12", "/var/tmp/gidb-bench.x/mnt dir"}


# -- processes, environment, installation, machine ---------------------------------


def test_status_fields_are_read_in_kib():
    text = "Name:\tcreate\nVmHWM:\t   28512 kB\nVmRSS:\t   20000 kB\n"
    assert procs.status_kib(text, "VmHWM") == 28512
    assert procs.status_kib(text, "VmSwap") is None


def test_create_gets_ganetis_variables_and_verify_only_its_own():
    env = install.create_env("i1.example.org", "/d/disk.img", 2048, variant="debootstrap")
    assert env["PATH"] == "/sbin:/bin:/usr/sbin:/usr/bin"
    assert (env["OS_API_VERSION"], env["INSTANCE_NAME"], env["DISK_COUNT"],
            env["DISK_0_PATH"], env["DISK_0_SIZE"], env["OS_VARIANT"]) == \
        ("20", "i1.example.org", "1", "/d/disk.img", "2048", "debootstrap")
    verify = install.verify_env()
    assert not any(k.startswith(("DISK_", "INSTANCE_")) for k in verify)
    assert verify["OSP_FILESYSTEM"] == "ext4"


def test_installed_scripts_run_directly_and_source_ones_through_the_launcher():
    installed = install.Installation("/e", "/v", "/os")
    assert installed.argv("verify", "parameters") == ["/os/verify", "parameters"]
    source = install.Installation("/e", "/v", "/os", launcher="/src/tests/launch.py")
    assert source.argv("create") == ["/usr/bin/python3", "/src/tests/launch.py",
                                     "/e", "/v", "/os", "create"]


def test_the_cache_link_is_repointed(tmp_path: Path):
    inst = install.Installation(str(tmp_path / "etc"), str(tmp_path / "var"), str(tmp_path))
    for name in ("warm", "cold"):
        (tmp_path / name).mkdir()
    inst.use_cache(str(tmp_path / "warm"))
    inst.use_cache(str(tmp_path / "cold"))
    assert os.readlink(inst.cache_link) == str(tmp_path / "cold")


def test_a_given_cache_is_found_in_a_localstatedir_or_as_the_directory(tmp_path: Path):
    cache = tmp_path / "var" / "cache" / "ganeti-instance-debootstrap"
    cache.mkdir(parents=True)
    with pytest.raises(procs.BenchError):
        _given_cache_dir(str(tmp_path / "var"))
    (cache / "cache-trixie-amd64-0123456789ab.tar").write_bytes(b"x")
    assert _given_cache_dir(str(tmp_path / "var")) == str(cache)
    assert _given_cache_dir(str(cache)) == str(cache)


def test_only_archives_and_their_records_are_linked_keeping_their_times(tmp_path: Path):
    source, dest = tmp_path / "src", tmp_path / "dest"
    source.mkdir()
    dest.mkdir()
    for name in ("cache-s-a-0123456789ab.tar", "cache-s-a-0123456789ab.inputs.json",
                 "cache-s-a-0123456789ab.ext4.img", "cache-s-a-0123456789ab.lock"):
        (source / name).write_text(name)
        os.utime(source / name, ns=(10**18, 10**18))
    linked = _link_cache(str(source), str(dest))
    assert linked == ["cache-s-a-0123456789ab.inputs.json", "cache-s-a-0123456789ab.tar"]
    assert sorted(os.listdir(dest)) == linked
    assert os.stat(dest / linked[1]).st_mtime_ns == 10**18


def test_machine_facts_are_read_from_proc_texts():
    assert machine.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == \
        "AMD EPYC 7B13"
    assert machine.cpu_model("") == "unknown"
    assert machine.mem_total_gib("MemTotal:       24641536 kB\n") == pytest.approx(23.5, 0.01)


def test_the_benchmark_refuses_to_run_without_root(monkeypatch, capsys):
    from gidb_bench import main as bench_main
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert bench_main.main(["--quick"]) == bench_main.EXIT_ERROR
    assert "must run as root" in capsys.readouterr().err


def test_the_memory_sampler_survives_a_child_that_exits_while_it_looks():
    child = subprocess.Popen(["true"])
    child.wait()
    # Reaped: /proc has nothing of it any more. The sampler asks anyway
    # (a process may exit between its parent's listing and this call).
    assert procs._children(child.pid) == []
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        kids: list[int] = []
        deadline = time.monotonic() + 10
        while not kids and time.monotonic() < deadline:
            kids = procs._children(parent.pid)
            time.sleep(0.01)
        assert len(kids) == 1
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
