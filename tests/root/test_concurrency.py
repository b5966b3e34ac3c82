"""Load: eight creates at once on one node, starting from a cold cache.

Ganeti runs several jobs at once. With no cache yet, exactly one of them
must bootstrap (the others wait on the cache key's lock and reuse what it
stored), every one must succeed, and none may ever use another's loop
device or mount point. This test bootstraps for real once, in its own
localstatedir (the session's warm cache is not used): the one cold
bootstrap of the suite's fault and load tests.
"""

from __future__ import annotations

import os
import time

from tests.root import faultkit, scripts
from tests.root.scripts import create_env, mounted_root, read

N = 8

# Each create's hook records which devices and mount point it was given and
# what the kernel says is behind those devices.
RECORD_HOOK = """\
echo "$INSTANCE_NAME $BLOCKDEV $FSYSDEV $TARGET" > "$TARGET/root/devices"
for dev in "$BLOCKDEV" "$FSYSDEV"; do
    losetup --noheadings --output BACK-FILE --list "$dev" >> "$TARGET/root/backing"
done
"""


def report(line: str) -> None:
    print(f"\nLOAD {line}")


def test_eight_creates_on_a_cold_cache_bootstrap_once_and_never_collide(tmp_path):
    var = tmp_path / "var"
    var.mkdir()
    tree = scripts.make_os_tree(str(tmp_path / "os"), str(var))
    tree.hook("10-record", RECORD_HOOK)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    disks = [scripts.sparse_disk(str(tmp_path), 1024, f"disk{i}.img") for i in range(N)]
    names = [f"load{i}.example.org" for i in range(N)]

    start = time.monotonic()
    runs = [faultkit.start(tree, "create", create_env(names[i], disks[i], TMPDIR=str(tmpdir)))
            for i in range(N)]
    durations: dict[int, float] = {}
    while len(durations) < N and time.monotonic() - start < 900:
        for i, run in enumerate(runs):
            if i not in durations and run.proc.poll() is not None:
                durations[i] = time.monotonic() - start
        time.sleep(0.05)
    wall = time.monotonic() - start
    for run in runs:
        assert run.wait(10) == 0, run.stderr[-4000:]
    logs = [run.stderr for run in runs]

    # Exactly one bootstrap and one filesystem image for all eight.
    bootstraps = [i for i, log in enumerate(logs) if "Bootstrapping" in log]
    assert sum(log.count("Bootstrapping") for log in logs) == 1, bootstraps
    assert sum(log.count("Made the filesystem image") for log in logs) == 1
    assert any("Waiting for another run" in log for log in logs)

    # Nothing left, and the cache complete under its real names only.
    cache_dir = tree.cache_dir
    assert faultkit.cache_temporaries(cache_dir) == []
    assert faultkit.held_locks(cache_dir) == []
    assert faultkit.mounts_under(str(tmp_path)) == []
    assert faultkit.loops_backed_under(str(tmp_path)) == []
    assert faultkit.mount_points_left(str(tmpdir)) == []
    assert not [p for run in runs for p in faultkit.tagged_processes(run.tag)]
    assert len([n for n in os.listdir(cache_dir) if n.endswith(".tar")]) == 1

    # Each instance is its own: its name, and only its own disk file behind
    # the devices its hook was given.
    targets = set()
    for name, disk in zip(names, disks):
        with mounted_root(disk) as root:
            assert read(root, "/etc/hostname") == name + "\n"
            recorded_name, blockdev, fsysdev, target = read(root, "/root/devices").split()
            assert recorded_name == name
            assert read(root, "/root/backing").split() == [disk, disk], (name, blockdev,
                                                                       fsysdev)
            targets.add(target)
    assert len(targets) == N

    # For comparison: one more create, now warm.
    extra = scripts.sparse_disk(str(tmp_path), 1024, "warm.img")
    warm_start = time.monotonic()
    scripts.run_script(tree, "create", create_env("warm.example.org", extra,
                                                  TMPDIR=str(tmpdir)))
    warm = time.monotonic() - warm_start
    cold = durations[bootstraps[0]]
    installed = [line for line in logs[bootstraps[0]].splitlines()
                 if line.startswith("install system: done in")]
    imaged = [line for log in logs for line in log.splitlines()
              if line.startswith("filesystem image: done in") and "Made the" in log]
    finished = ", ".join(f"{d:.1f}" for d in sorted(durations.values()))
    report(f"{N} creates at once on a cold cache: all done in {wall:.1f} s (each "
           f"finished after {finished} s); the one that bootstrapped took {cold:.1f} s "
           f"({installed[0]}), the cache's filesystem image was made once "
           f"({imaged[0] if imaged else 'no image'}); a warm create takes {warm:.2f} s; "
           f"one cold create plus {N - 1} warm ones in turn would take "
           f"{cold + (N - 1) * warm:.1f} s (plus the image)")
    # All eight finish soon after the one that bootstrapped: the others only
    # waited for the cache and its image, and then copied it.
    assert wall < cold + (N - 1) * warm + 60
