"""Boot an instance disk under qemu and drive its serial console (root tests).

The disk is booted the way Ganeti's KVM hypervisor boots an instance by
default: a virtio disk, the serial console on ttyS0, and either the kernel
and initrd given to qemu directly (``mode="kernel"``, here copied out of the
instance's own /boot) or the firmware booting whatever bootloader sits on
the disk (``mode="disk"``). The test logs in as root on the console, runs
shell commands, powers the machine off and gets their output back.

Every wait has a deadline, the whole boot has one too, and qemu is killed
in ``finally`` whatever happens (a failure, a timeout, Ctrl-C); a failure
raises :class:`BootFailed` with the last lines of the console, and the whole
console output is kept in a file for the test log.

"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import re
import secrets
import shlex
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from ganeti_debootstrap.runner import output, run
from ganeti_debootstrap.target import Target

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
DEFAULT_TIMEOUT = 240.0
# How long one step after the login prompt may take (login, one command,
# power-off); always cut short by the whole boot's deadline.
STEP_TIMEOUT = 90.0
CONSOLE_TAIL_LINES = 60
MEMORY_MIB = 1024
SECTOR = 512

Mode = Literal["kernel", "disk", "efi"]
# UEFI firmware for "efi" boots (Debian's ovmf); read-only, no NVRAM kept.
OVMF = "/usr/share/ovmf/OVMF.fd"

# agetty prints "<hostname> login: " once the system is up.
_LOGIN_PROMPT = re.compile(r"(?m)^([\w.-]+) login: ")
# Debian's root prompt is "root@host:~# "; a plain sh prints "# ". Anchored at
# a line start with no blank before it, so that motd text does not match.
_SHELL_PROMPT = re.compile(r"(?m)^[^\s#$]*[#$] ")
_AFTER_USER = re.compile(
    r"(?P<password>Password: )|(?P<incorrect>Login incorrect)"
    r"|(?m:^(?P<prompt>[^\s#$]*[#$] ))")
# Terminal control sequences (bash's bracketed-paste switch, colours, title
# setting) are dropped from the text the patterns are matched against.
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"            # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL or ST
    r"|\x1b[()][0-9A-Za-z]"               # character set selection
    r"|\x1b[@-Z\\-_=>]")                  # other two-byte sequences
_CONTROL = re.compile(r"[\r\x00\x07]")


class BootFailed(Exception):
    """The instance did not boot, log in, run the commands or power off in time."""


@dataclass(frozen=True)
class BootResult:
    """What one boot left: the console, each command's output, the timings."""

    transcript: str  # the console as text, control sequences removed
    outputs: tuple[str, ...]  # each command's output ("\r\n" made "\n")
    statuses: tuple[int, ...]  # each command's exit status
    login_seconds: float  # qemu start to the login prompt
    seconds: float  # qemu start to qemu exit
    transcript_path: Path  # the raw console output
    during: object = None  # what the ``during`` callback returned


@dataclass(frozen=True)
class KernelFiles:
    """The instance's kernel and initrd copied out, and its root filesystem UUID."""

    kernel: Path
    initrd: Path
    root_uuid: str


# --- the disk: partition 1, loop devices, mounts ---------------------------

def root_extent(image: Path) -> tuple[int, int]:
    """Byte offset and size of the root filesystem: partition 1, or the whole disk.

    The kernel here does not parse partition tables, so partition 1 is
    reached through a loop device with an offset read from the table.
    """
    res = run(["sfdisk", "--json", image], capture=True, check=False)
    if res.returncode != 0:
        # No table at all: create's PARTITION_STYLE=none puts the
        # filesystem on the whole disk.
        return 0, image.stat().st_size
    table = json.loads(res.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    parts = table.get("partitions", [])
    if not parts:
        raise BootFailed(f"{image} has a partition table without partitions.")
    return int(parts[0]["start"]) * sector, int(parts[0]["size"]) * sector


@contextlib.contextmanager
def loop_device(image: Path, offset: int, size: int, *,
                read_only: bool) -> Iterator[str]:
    """A loop device over ``size`` bytes of ``image`` from ``offset``; detached after."""
    argv = ["losetup", "--find", "--show", "--offset", str(offset),
            "--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    dev = output([*argv, image])
    try:
        yield dev
    finally:
        # With an error already on its way, a failed detach must not hide
        # it (the leak check reports the device anyway).
        run(["losetup", "--detach", dev], check=sys.exc_info()[1] is None)


@contextlib.contextmanager
def mounted(dev: str, mountpoint: Path, *, read_only: bool) -> Iterator[Path]:
    """``dev`` mounted on ``mountpoint`` (created if needed); unmounted after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", *(["-o", "ro"] if read_only else []), dev, mountpoint])
    try:
        yield mountpoint
    finally:
        run(["umount", mountpoint], check=sys.exc_info()[1] is None)


def filesystem_uuid(dev: str) -> str:
    """The UUID of the filesystem on ``dev``, probed (no udev, no blkid cache)."""
    return output(["blkid", "--probe", "--match-tag", "UUID", "--output",
                   "value", dev], check=False)


def _version_key(name: str) -> list[tuple[int, str]]:
    """Sort key for kernel file names: numbers compare as numbers."""
    return [(int(p), "") if p.isdigit() else (-1, p)
            for p in re.split(r"(\d+)", name)]


def _instance_kernel(root: Path) -> tuple[Path, Path]:
    """The kernel and initrd the instance boots by default, inside its /boot."""
    boot = Path(Target(os.fspath(root)).path("/boot"))
    versions = sorted((p.name[len("vmlinuz-"):] for p in boot.glob("vmlinuz-*")),
                      key=_version_key, reverse=True)
    # Debian points /vmlinuz (or /boot/vmlinuz) at the default kernel; that
    # one comes first. Only the link's name is used, looked up in /boot, so
    # that a link in the image cannot point at the node's files.
    for link in (boot / "vmlinuz", root / "vmlinuz"):
        if link.is_symlink():
            version = os.path.basename(os.readlink(link))[len("vmlinuz-"):]
            if version in versions:
                versions.insert(0, version)
    for version in versions:
        kernel, initrd = boot / f"vmlinuz-{version}", boot / f"initrd.img-{version}"
        if kernel.is_file() and initrd.is_file():
            return kernel, initrd
    raise BootFailed(
        f"The instance has no kernel with an initrd in /boot (found: "
        f"{sorted(p.name for p in boot.iterdir()) if boot.is_dir() else 'no /boot'}); "
        f"install linux-image-amd64 in it to boot it in kernel mode.")


def extract_kernel(image: Path, dest: Path) -> KernelFiles:
    """Copy the instance's kernel and initrd into ``dest``; read its root UUID.

    The image is only read: its root filesystem is mounted read-only from a
    read-only loop device, and both are released before returning.
    """
    offset, size = root_extent(image)
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(loop_device(image, offset, size, read_only=True))
        uuid = filesystem_uuid(dev)
        if not uuid:
            raise BootFailed(f"No filesystem with a UUID in partition 1 of {image}.")
        root = stack.enter_context(mounted(dev, dest / "mnt", read_only=True))
        kernel, initrd = _instance_kernel(root)
        files = KernelFiles(dest / kernel.name, dest / initrd.name, uuid)
        shutil.copyfile(kernel, files.kernel)
        shutil.copyfile(initrd, files.initrd)
    return files


# --- qemu -----------------------------------------------------------------

@dataclass(frozen=True)
class UserNic:
    """A user-mode NIC: qemu's own NAT, the guest's port 22 on the host's loopback.

    The guest sees 10.0.2.0/24 (gateway 10.0.2.2); only 127.0.0.1:``ssh_port``
    on the host reaches it, nothing else of the host's networks.
    """

    mac: str
    ssh_port: int

    def argv(self) -> list[str]:
        return ["-nic", f"user,model=virtio-net-pci,mac={self.mac},"
                        f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"]


def qemu_argv(image: Path, *, mode: Mode, kernel: KernelFiles | None = None,
              append: str | None = None, memory_mib: int = MEMORY_MIB,
              nic: UserNic | None = None, extra_disks: Sequence[Path] = ()) -> list[str]:
    """The qemu command line booting ``image`` the way Ganeti's KVM does by default.

    ``extra_disks`` follow it as virtio disks too (vdb, vdc...), as Ganeti's
    disks 1, 2...
    """
    # qemu's option parser splits on commas; a literal one is doubled.
    drive = os.fspath(image).replace(",", ",,")
    argv = [QEMU,
            # /dev/kvm here is a kind that needs a specially built guest
            # kernel: Debian's crawls or faults under it. Emulate.
            "-accel", "tcg",
            "-m", str(memory_mib), *(nic.argv() if nic else ["-nic", "none"]),
            "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-no-reboot",
            # snapshot=on: writes go to a temporary overlay, the image is
            # never modified.
            "-drive", f"file={drive},if=virtio,format=raw,snapshot=on"]
    for extra in extra_disks:
        argv += ["-drive", f"file={os.fspath(extra).replace(',', ',,')},if=virtio,"
                           f"format=raw,snapshot=on"]
    if mode == "kernel":
        if kernel is None:
            raise ValueError("kernel mode needs the kernel files")
        if append is None:
            append = f"root=UUID={kernel.root_uuid} ro console=ttyS0"
        argv += ["-kernel", os.fspath(kernel.kernel),
                 "-initrd", os.fspath(kernel.initrd), "-append", append]
    elif mode == "efi":
        argv += ["-bios", OVMF]
    elif mode != "disk":
        raise ValueError(f"unknown boot mode {mode!r}")
    return argv


def boot_and_run(image: Path, *, workdir: Path, mode: Mode = "kernel",
                 commands: Sequence[str] = (), expect_hostname: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, check: bool = True,
                 append: str | None = None, settle: bool = True,
                 nic: UserNic | None = None, password: str = "",
                 during: Callable[[], object] | None = None,
                 extra_disks: Sequence[Path] = ()) -> BootResult:
    """Boot ``image``, log in as root, run ``commands`` in its shell, power off.

    ``workdir`` receives the kernel files (kernel mode) and the console
    transcript (``console.log``). ``expect_hostname`` is checked against the
    login prompt (up to its first dot, as agetty shows it). With ``check``, a
    command exiting non-zero fails the boot.
    ``append`` replaces the kernel command line (kernel mode).
    ``nic`` adds a user-mode NIC; ``password`` is root's (it must be asked
    for); ``during`` runs on the host once the guest has booted and root
    is logged in, before the commands (its result is ``BootResult.during``).
    ``extra_disks``: more disks after ``image`` (see :func:`qemu_argv`).
    Raises :class:`BootFailed` with the console's tail on any failure.
    """
    if shutil.which(QEMU) is None:
        raise BootFailed(f"{QEMU} is not installed: install the Debian package "
                         f"{QEMU_PACKAGE} (apt-get install --no-install-recommends "
                         f"{QEMU_PACKAGE}).")
    workdir.mkdir(parents=True, exist_ok=True)
    kernel = extract_kernel(image, workdir / "kernel") if mode == "kernel" else None
    argv = qemu_argv(image, mode=mode, kernel=kernel, append=append, nic=nic,
                     extra_disks=extra_disks)
    return run_console_session(argv, commands=commands,
                               expect_hostname=expect_hostname, timeout=timeout,
                               transcript_path=workdir / "console.log", check=check,
                               settle=settle, password=password, during=during)


# --- the serial console -----------------------------------------------------

class Console:
    """qemu's serial console on its stdin/stdout pipes, with deadlines."""

    def __init__(self, proc: subprocess.Popen[bytes], transcript: IO[bytes],
                 deadline: float) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.fd = proc.stdout.fileno()
        self.transcript = transcript
        self.deadline = deadline
        self.text = ""  # everything read so far, control sequences removed
        self.pos = 0  # where the next expect() starts searching
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._carry = ""  # an escape sequence cut by the end of a read

    def _read(self, until: float) -> None:
        """Read what the guest printed, waiting at most until ``until``."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return
        self.transcript.write(data)
        self.transcript.flush()
        chunk = self._carry + self._decoder.decode(data)
        self._carry = ""
        cut = chunk.rfind("\x1b")
        if cut >= 0 and not _ESCAPE.match(chunk, cut) and len(chunk) - cut < 32:
            chunk, self._carry = chunk[:cut], chunk[cut:]
        self.text += _CONTROL.sub("", _ESCAPE.sub("", chunk))

    def expect(self, pattern: re.Pattern[str], what: str,
               timeout: float = STEP_TIMEOUT) -> re.Match[str]:
        """Wait for ``pattern`` after the previous match; fail after ``timeout``."""
        start = time.monotonic()
        end = min(self.deadline, start + timeout)
        while True:
            match = pattern.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            if self.eof:
                raise BootFailed(f"qemu exited (status {self.proc.wait()}) while "
                                 f"waiting for {what}.")
            if time.monotonic() >= end:
                raise BootFailed(f"No {what} after {time.monotonic() - start:.0f} s "
                                 f"(whole-boot deadline included).")
            self._read(end)

    def send(self, line: str) -> None:
        """Type ``line`` and Enter on the console."""
        try:
            self.stdin.write(line.encode() + b"\n")
            self.stdin.flush()
        except BrokenPipeError:
            raise BootFailed(f"qemu exited before {line!r} could be typed.") from None

    def wait_exit(self, what: str) -> int:
        """Read until qemu closes the console and exits; its exit status."""
        while not self.eof:
            if time.monotonic() >= self.deadline:
                raise BootFailed(f"qemu did not exit after {what}.")
            self._read(self.deadline)
        try:
            return self.proc.wait(max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BootFailed(f"qemu closed the console but did not exit after "
                             f"{what}.") from None

    def tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """The last ``lines`` lines of the console."""
        return "\n".join(self.text.splitlines()[-lines:])


def _wait_for_login_prompt(console: Console, expect_hostname: str | None) -> None:
    """Wait for agetty's login prompt and check the hostname it shows."""
    prompt = console.expect(_LOGIN_PROMPT, "login prompt", timeout=math.inf)
    # agetty prints the hostname up to its first dot (no --long-hostname).
    shown, short = prompt.group(1), (expect_hostname or "").split(".")[0]
    if expect_hostname is not None and shown not in (short, expect_hostname):
        raise BootFailed(f"The login prompt shows the hostname {shown!r}, "
                         f"expected {short!r} (from {expect_hostname!r}).")


def _log_in(console: Console, password: str = "") -> None:
    """Log in as root at the login prompt and wait for the shell prompt.

    Without ``password``, root's password field is expected empty (create's
    default): pam_unix (nullok) then lets root in without asking, and an
    empty password is answered if asked. With one, it must be asked for.
    """
    console.send("root")
    step = console.expect(_AFTER_USER, "password or shell prompt after 'root'")
    if password and not step.group("password"):
        raise BootFailed("Logged in as root without being asked for the password: "
                         "is root's password field in /etc/shadow empty?")
    if step.group("password"):
        console.send(password)
        step = console.expect(_AFTER_USER, "shell prompt after the password")
    if step.group("incorrect") or step.group("password"):
        if password:
            raise BootFailed("Login as root with the given password was refused: "
                             "does /etc/shadow hold its hash?")
        raise BootFailed("Login as root with an empty password was refused: "
                         "is root's password field in /etc/shadow empty?")


def _prepare_shell(console: Console, nonce: str, settle: bool) -> None:
    """Make the login shell fit for running commands and reading their output.

    The shell's output is a terminal: systemd's tools and others would start
    a pager and wait for a key, so pagers become cat. With ``settle``, kernel
    and systemd messages are kept out of the commands' output: both write to
    the console the shell is on, the kernel at any moment (drivers still
    loading after the login prompt), systemd's status lines until the boot
    has finished. The kernel's console log level is lowered and the boot
    waited for; their exit statuses do not matter (a degraded system, or no
    systemd, still runs the commands).
    """
    command = "export PAGER=cat SYSTEMD_PAGER=cat"
    if settle:
        command += ("; dmesg --console-level emerg >/dev/null 2>&1"
                    "; systemctl is-system-running --wait >/dev/null 2>&1; true")
    _run_command(console, command, "prepare", nonce)


def _run_command(console: Console, command: str, index: int | str,
                 nonce: str, step_timeout: float = STEP_TIMEOUT) -> tuple[str, int]:
    """Run one shell command; its output and exit status, found by markers.

    The markers are typed with an empty quote in the middle, so the echo of
    the typed line never matches what the shell prints. Everything is one
    typed line, read by bash's line editor: a second line arriving while the
    command runs would be echoed by the tty into the command's output. eval
    lets the command end in ``&`` or a comment.
    """
    if "\n" in command:
        raise ValueError(f"commands are one line each: {command!r}")
    begin, end = f"GIDB-{nonce}-BEGIN-{index}", f"GIDB-{nonce}-END-{index}"
    console.send(f"echo {begin[:-1]}''{begin[-1]}; eval {shlex.quote(command)}; "
                 f"echo {end[:-1]}''{end[-1]}-$?")
    console.expect(re.compile(re.escape(begin) + "\n"), f"start of {command!r}")
    start = console.pos
    done = console.expect(re.compile(re.escape(end) + r"-(\d+)\n"),
                          f"end of {command!r}", timeout=step_timeout)
    out = console.text[start:done.start()]
    console.expect(_SHELL_PROMPT, f"shell prompt after {command!r}")
    return out, int(done.group(1))


def run_console_session(argv: Sequence[str], *, commands: Sequence[str],
                        expect_hostname: str | None, timeout: float,
                        transcript_path: Path, check: bool = True,
                        settle: bool = True, password: str = "",
                        during: Callable[[], object] | None = None,
                        step_timeout: float = STEP_TIMEOUT) -> BootResult:
    """Start ``argv`` (qemu, serial console on stdio) and drive a login session.

    Each command may take ``step_timeout`` seconds (cut short by the whole
    session's ``timeout``). Pagers are off in the shell; with ``settle``
    (see :func:`_prepare_shell`), the boot has finished and kernel messages
    are off the console before the first command runs.

    qemu is killed in ``finally`` whatever happens, Ctrl-C included; every
    failure raises :class:`BootFailed` ending with the console's tail.
    """
    nonce = secrets.token_hex(4)
    start = time.monotonic()
    console: Console | None = None
    # setpriv --pdeathsig: should this process die without running
    # ``finally`` (SIGKILL, SIGTERM unhandled), the kernel kills qemu too.
    # The console is interactive, so qemu runs outside runner.run().
    with open(transcript_path, "wb") as transcript, subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT) as proc:
        try:
            console = Console(proc, transcript, start + timeout)
            _wait_for_login_prompt(console, expect_hostname)
            login_seconds = time.monotonic() - start
            _log_in(console, password)
            _prepare_shell(console, nonce, settle)
            during_result = during() if during is not None else None
            outputs: list[str] = []
            statuses: list[int] = []
            for index, command in enumerate(commands):
                out, status = _run_command(console, command, index, nonce,
                                           step_timeout)
                if check and status != 0:
                    raise BootFailed(f"{command!r} exited with status {status}; "
                                     f"its output:\n{out}")
                outputs.append(out)
                statuses.append(status)
            console.send("poweroff")
            status = console.wait_exit("poweroff")
            if status != 0:
                raise BootFailed(f"qemu exited with status {status} after poweroff.")
            seconds = time.monotonic() - start
        except BootFailed as err:
            tail = console.tail() if console else ""
            raise BootFailed(f"{err}\nqemu: {' '.join(argv)}\nLast console lines "
                             f"(all in {transcript_path}):\n{tail}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert console is not None
    return BootResult(console.text, tuple(outputs), tuple(statuses),
                      login_seconds, seconds, transcript_path, during_result)
