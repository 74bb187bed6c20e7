"""Machines the launcher drives: files in, processes started, logs followed, files out.

One implementation for every SSH-reachable machine (your own box, a Vast.ai instance, a SkyPilot
cluster), over the system's OpenSSH and rsync:
- one authenticated connection reused by every command (ControlMaster, started explicitly with
  `ssh -M -N -f` so no command's output pipe is held open by a backgrounded master);
- BatchMode (never a password prompt: a missing key is an error, not a hang);
- a known_hosts file per run, checked on every later connection (accept-new on the first one),
  then the user's own ~/.ssh/known_hosts;
- rsync with --partial and delta transfer, so an interrupted or repeated transfer sends little.

LocalMachine runs the same shell commands on this machine, so the local target goes through
exactly the same lifecycle code without SSH."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from launcher.runs import private_file, private_folder

SSH_CONNECT_TIMEOUT_S = 10
# The user's own SSH keys a rented machine gets (the public half), in the order they are tried;
# without one, a key is made for the launcher in the state directory (providers/vast.launcher_key).
USER_SSH_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_rsa")


def shell_path(path: str) -> str:
    """`path` as one word of a POSIX shell command line: quoted whole, but for a leading `~` or
    `~/`, left bare so the remote shell expands it to that user's home."""
    if path == "~":
        return path
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RemoteError(Exception):
    """A command or transfer on the target failed; the message says which and why."""


class Unreachable(RemoteError):
    """The target cannot be reached or refuses our key; nothing was started on it."""


@dataclass(frozen=True)
class SSHAddress:
    """`ssh://user@host:port`, `user@host` or an ~/.ssh/config alias (user/port then come from there)."""

    host: str
    user: Optional[str] = None
    port: Optional[int] = None

    @classmethod
    def parse(cls, spec: str) -> "SSHAddress":
        text = spec if spec.startswith("ssh://") else f"ssh://{spec}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ValueError(f"--target {spec!r}: the port must be a number, as in ssh://user@host:2222") from None
        if not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"--target {spec!r}: expected ssh://user@host[:port], user@host or an ssh config alias")
        return cls(host=parts.hostname, user=parts.username, port=port)

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}"


@dataclass
class TransferStats:
    bytes_sent: int = 0  # rsync's "Total bytes sent": what crossed the wire, deltas included
    bytes_received: int = 0


_STATS_RE = {
    "bytes_sent": re.compile(r"Total bytes sent: ([\d,.]+)"),
    "bytes_received": re.compile(r"Total bytes received: ([\d,.]+)"),
}


class Machine:
    """A shell somewhere: `run`, `put`, `get`, `start` (detached), `follow`. Paths on the machine
    are absolute strings; commands are POSIX sh."""

    name: str = "machine"
    is_this_machine: bool = False  # the launcher's own machine (the local target)
    transferred: TransferStats

    def __init__(self) -> None:
        self.transferred = TransferStats()

    # -- what subclasses provide ----------------------------------------------------------
    def command(self, remote_command: str) -> list[str]:
        """argv that runs `remote_command` (a sh command line) on the machine."""
        raise NotImplementedError

    def rsync_args(self) -> list[str]:
        """Extra rsync arguments (the remote shell) for this machine."""
        return []

    def rsync_path(self, path: str) -> str:
        return path

    def ensure_connected(self) -> None:
        """Make the next command cheap (open the shared connection); raise Unreachable."""

    def close(self) -> None:
        """Release the shared connection, if any."""

    # -- the contract -------------------------------------------------------------------------
    def run(self, remote_command: str, *, check: bool = True, timeout: Optional[float] = 120,
            input_text: Optional[str] = None) -> subprocess.CompletedProcess:
        self.ensure_connected()
        # Files, not pipes: a process that outlives the command (a master, a daemon) cannot
        # hold our read end open.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = _call(self.command(remote_command), stdout=out, stderr=err, timeout=timeout,
                             input=input_text.encode() if input_text is not None else None)
            except subprocess.TimeoutExpired:
                raise RemoteError(f"{self.name}: `{_short(remote_command)}` did not finish in {timeout:.0f} s") from None
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read().decode(errors="replace"),
                                                 err.read().decode(errors="replace"))
        if check and result.returncode != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise RemoteError(f"{self.name}: `{_short(remote_command)}` failed with exit code {result.returncode}"
                              f"{': ' + detail[-1] if detail else ''}")
        return result

    def put(self, local: Path, remote: str, *, delete: bool = False) -> TransferStats:
        """Copy a file, or a folder's contents (local/ -> remote/), onto the machine."""
        source = f"{local}/" if Path(local).is_dir() else str(local)
        parent = remote.rstrip("/").rsplit("/", 1)[0] or "/"
        self.run(f"mkdir -p {shlex.quote(parent)}")  # rsync creates one level, not a path
        return self._rsync(source, self.rsync_path(remote.rstrip("/") + ("/" if Path(local).is_dir() else "")),
                           delete)

    def get(self, remote: str, local: Path, *, delete: bool = False, exclude: tuple[str, ...] = ()) -> TransferStats:
        """Copy a remote file, or a folder's contents (remote/ -> local/), onto this machine."""
        return self._rsync(self.rsync_path(remote), str(local), delete, exclude)

    def _rsync(self, source: str, destination: str, delete: bool, exclude: tuple[str, ...] = ()) -> TransferStats:
        self.ensure_connected()
        # --protect-args: the remote path goes over rsync's protocol, not through the remote
        # shell (rsync 3.2's own escaping lets backticks through: a path is never a command).
        argv = ["rsync", "--archive", "--partial", "--stats", "--protect-args", *self.rsync_args()]
        argv += ["--delete"] if delete else []
        argv += [f"--exclude={pattern}" for pattern in exclude]
        argv += [source, destination]
        proc = _call(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode not in (0, 24):  # 24: files vanished while copying (a rotated checkpoint)
            detail = proc.stderr.strip().splitlines()
            raise RemoteError(f"{self.name}: rsync {source} -> {destination} failed (exit {proc.returncode})"
                              f"{': ' + detail[-1] if detail else ''}")
        stats = TransferStats(**{name: _number(pattern, proc.stdout) for name, pattern in _STATS_RE.items()})
        self.transferred.bytes_sent += stats.bytes_sent
        self.transferred.bytes_received += stats.bytes_received
        return stats

    def start(self, command: str, *, cwd: str, exit_code_file: str = "exit_code",
              output_file: str = "console.log", env: Optional[Mapping[str, str]] = None) -> int:
        """Start `command` in `cwd`, detached from us: its own session (setsid), immune to the
        hang-up of the SSH session (nohup), stdio to `output_file`. When it ends, its exit status
        is written atomically to `exit_code_file`. Returns the pid of the wrapper shell, whose
        children are the job (see `signal_job`). `env` (secrets: a store's keys) reaches the job's
        environment through the command's stdin, never a command line or a file."""
        wrapper = (f"{command}; echo $? > {exit_code_file}.tmp && mv {exit_code_file}.tmp {exit_code_file}")
        env = dict(env or {})
        for name, value in env.items():
            if not ENV_NAME.match(name) or "\n" in value:
                raise ValueError(f"cannot pass {name!r} to the job: a variable name, and a value of one line")
        # The shell reads NAME=value lines from stdin and exports them; the job inherits them.
        exports = "while IFS= read -r kv; do export \"$kv\"; done; " if env else ""
        # Only the setsid'd wrapper goes to the background, with all of its stdio redirected: a
        # backgrounded list would keep the SSH channel open until the job ends.
        line = (f"cd {shlex.quote(cwd)} && rm -f {exit_code_file} && {exports}"
                f"{{ setsid nohup sh -c {shlex.quote(wrapper)} > {output_file} 2>&1 < /dev/null & echo $!; }}")
        stdin = "".join(f"{name}={value}\n" for name, value in env.items()) if env else None
        pid = self.run(line, timeout=60, input_text=stdin).stdout.strip().splitlines()[-1]
        return int(pid)

    def is_alive(self, pid: int) -> bool:
        return self.run(f"kill -0 {pid} 2>/dev/null", check=False, timeout=60).returncode == 0

    def signal_job(self, pid: int, signal_name: str) -> None:
        """Send a signal to the job started by `start` (the wrapper's children, then the wrapper
        when it has none left), e.g. TERM so the runner checkpoints and exits 143."""
        self.run(f"pkill -{signal_name} -P {pid} 2>/dev/null || kill -{signal_name} {pid} 2>/dev/null; true",
                 check=False, timeout=60)

    def follow(self, path: str, *, start_line: int = 0, stop: Callable[[], bool] = lambda: False,
               poll_s: float = 0.5) -> Iterator[str]:
        """Lines appended to `path` as they are written, from line `start_line` on (0-based).
        A dropped connection is re-opened with backoff, continuing after the last line seen.
        Ends when `stop()` is true; yields "" every poll_s when nothing arrives, so the caller
        can do other work."""
        lines_seen = start_line
        backoff = 0.5
        while not stop():
            tail = _Tail(self, path, lines_seen)
            try:
                while not stop():
                    line = tail.next(poll_s)
                    if line is None:
                        if tail.ended:
                            break
                        yield ""
                        continue
                    lines_seen += 1
                    backoff = 0.5
                    yield line
            finally:
                tail.close()
            if stop():
                return
            # The connection dropped (or the file is not there yet): try again after a backoff,
            # yielding all the while, so the caller keeps looking at the job (a machine lost for
            # good is noticed by its probes, not after the backoff).
            resume_at = time.monotonic() + backoff
            while not stop() and time.monotonic() < resume_at:
                time.sleep(min(poll_s, max(0.0, resume_at - time.monotonic())))
                yield ""
            backoff = min(backoff * 2, 10)


class _Tail:
    """`tail -F` of one file on a machine, read by a thread so the caller can time out."""

    def __init__(self, machine: Machine, path: str, start_line: int) -> None:
        try:
            machine.ensure_connected()
        except RemoteError:
            pass  # the tail below fails too, and follow() tries again later
        # exec: the tail is the process we started (locally; remotely, the session's command),
        # not a child of a shell that would outlive the shell's end.
        argv = machine.command(f"exec tail -n +{start_line + 1} -F {shlex.quote(path)} 2>/dev/null")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> Optional[str]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            self.ended = True
        return line

    def close(self) -> None:
        """End the tail now: its whole process group (the local tail, or the ssh client and
        anything it started). Runs in the `finally` of a Ctrl-C, so it never waits for long;
        the reader thread then sees the end of the pipe and ends too."""
        _kill_group(self.proc)


class LocalMachine(Machine):
    """This machine, driven through the same shell commands as a remote one."""

    name = "local"
    is_this_machine = True

    def command(self, remote_command: str) -> list[str]:
        return ["sh", "-c", remote_command]


@dataclass
class SSHOptions:
    known_hosts: Path  # this run's known_hosts file
    control_dir: Path  # where the ControlMaster socket lives
    identity: Optional[Path] = None
    ssh_config: Optional[Path] = None  # instead of ~/.ssh/config (QLORA_LAUNCH_SSH_CONFIG)
    extra: list[str] = field(default_factory=list)


class SSHMachine(Machine):
    def __init__(self, address: SSHAddress, options: SSHOptions) -> None:
        super().__init__()
        self.address = address
        self.options = options
        self.name = str(address)
        private_folder(options.known_hosts.parent)
        private_file(options.known_hosts)  # ssh appends to it, keeping its mode
        private_folder(options.control_dir)

    @property
    def control_path(self) -> str:
        # Unix socket paths are limited to 104-108 bytes, and ssh binds the master at the path
        # plus a 17-character temporary suffix first: a short hash of who we connect to.
        key = hashlib.sha256(f"{self.address}|{self.options.identity}".encode()).hexdigest()[:16]
        path = self.options.control_dir / f"{key}.sock"
        if len(str(path)) + 17 > 100:
            path = Path(tempfile.gettempdir()) / f"qlora-{key}.sock"
        return str(path)

    def ssh_options(self) -> list[str]:
        """Options of every command: use the shared connection when it is up, else connect
        directly (the master is opened explicitly by ensure_connected)."""
        return [*self._base_options(), "-o", "ControlMaster=no"]

    def _base_options(self) -> list[str]:
        # ssh takes the first value given for an option: ControlMaster is set by the callers.
        o = self.options
        user_known_hosts = f"{o.known_hosts} {Path('~/.ssh/known_hosts').expanduser()}"
        argv = [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={user_known_hosts}",
            "-o", f"ControlPath={self.control_path}",
        ]
        if o.ssh_config:
            argv += ["-F", str(o.ssh_config)]
        if o.identity:
            argv += ["-i", str(o.identity), "-o", "IdentitiesOnly=yes"]
        if self.address.port:
            argv += ["-p", str(self.address.port)]
        if self.address.user:
            argv += ["-l", self.address.user]
        return argv + o.extra

    def command(self, remote_command: str) -> list[str]:
        return ["ssh", *self.ssh_options(), self.address.host, remote_command]

    def rsync_args(self) -> list[str]:
        return ["-e", shlex.join(["ssh", *self.ssh_options()])]

    def rsync_path(self, path: str) -> str:
        return f"{self.address.host}:{path}"

    def master_pid(self) -> Optional[int]:
        try:  # a question to the master over its local socket: a master that does not answer is none
            proc = _call(["ssh", *self.ssh_options(), "-O", "check", self.address.host], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=SSH_CONNECT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None
        found = re.search(r"pid=(\d+)", proc.stderr + proc.stdout)
        return int(found.group(1)) if proc.returncode == 0 and found else None

    def ensure_connected(self) -> None:
        if self.master_pid() is not None:
            return
        # A master killed hard leaves its socket behind; ssh would then refuse to become the
        # new master ("already exists, disabling multiplexing") and every command would log in anew.
        Path(self.control_path).unlink(missing_ok=True)
        argv = ["ssh", *self._base_options(), "-o", "ControlMaster=yes", "-o", "ControlPersist=120",
                "-N", "-f", self.address.host]
        with tempfile.TemporaryFile() as err:
            try:
                # The master forks itself off (-f) into its own session once logged in; only the
                # login is ours to wait for, and to cut short on Ctrl-C.
                proc = _call(argv, stdout=subprocess.DEVNULL, stderr=err, timeout=SSH_CONNECT_TIMEOUT_S * 3)
            except subprocess.TimeoutExpired:
                raise Unreachable(f"{self.address}: cannot connect: no answer in {SSH_CONNECT_TIMEOUT_S * 3} s") from None
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
        if proc.returncode != 0:
            raise Unreachable(f"{self.address}: cannot connect: {_ssh_reason(message, self.options.known_hosts)}")

    def close(self) -> None:
        try:
            _call(["ssh", *self.ssh_options(), "-O", "exit", self.address.host], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL, timeout=SSH_CONNECT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass  # a master that does not answer ends by itself (ControlPersist)


def _call(argv: list[str], *, stdout: Any, stderr: Any, timeout: Optional[float] = None,
          input: Optional[bytes] = None, text: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run for each short-lived command of ours (ssh, rsync, sh), but the command
    runs in its own process group, and whatever ends our wait early (Ctrl-C, the timeout, any
    error) ends that whole group at once, without waiting on it: subprocess.run kills only the
    first process and then waits for it, and the rest (rsync's ssh, a local command's
    children) would be reached by a terminal's Ctrl-C only, never by a plain `kill -INT`."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, text=text, start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        _kill_group(proc)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen, grace_s: float = 0.5) -> None:
    """End the process group `proc` leads (start_new_session): TERM, and KILL if its leader is
    still there after `grace_s`. Bounded: it never waits longer, whatever the group does. (An
    unreaped leader keeps its pid, and so the group's id, from being reused: only then is the
    group surely still ours.)"""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except KeyboardInterrupt:  # Ctrl-C while we wait: kill, and let it go on
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _ssh_reason(stderr: str, known_hosts: Optional[Path] = None) -> str:
    """ssh's own last words, with the fix for the usual ones."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Warning: Permanently added")]
    last = lines[-1] if lines else "ssh exited without a message"
    if "Permission denied" in last:
        return (f"{last}; the target does not accept our key: add your public key to its "
                "~/.ssh/authorized_keys or set resources.ssh_identity / --identity")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "Host key verification failed" in last:
        return (f"{last}; the host key differs from the one recorded for this run (known_hosts: "
                f"{known_hosts or 'this run'}): it may not be the same machine. If it was reinstalled, remove its "
                "line from that file and try again; if not, do not connect")
    if "Connection refused" in last or "timed out" in last or "No route" in last or "resolve" in last:
        return f"{last}; check the host and port, and that sshd runs there"
    return last


def _number(pattern: re.Pattern, text: str) -> int:
    found = pattern.search(text)
    return int(float(found.group(1).replace(",", ""))) if found else 0


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def env_ssh_config() -> Optional[Path]:
    value = os.environ.get("QLORA_LAUNCH_SSH_CONFIG")
    return Path(value).expanduser() if value else None
