"""A real OpenSSH server on 127.0.0.1 for the tests: its own host key, an authorized key made
for the test, no passwords. The "remote" machine is this machine, reached only through sshd."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SSHServer:
    port: int
    user: str
    client_key: Path  # private key whose public half is authorized
    folder: Path
    process: subprocess.Popen

    @property
    def target(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def start_sshd(folder: Path) -> SSHServer:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    client_key = keygen(folder / "client_ed25519")
    process, port = run_sshd(folder, [(folder / "client_ed25519.pub").read_text()])
    return SSHServer(port=port, user=getpass.getuser(), client_key=client_key, folder=folder, process=process)


def run_sshd(folder: Path, authorized_keys: list[str], port: Optional[int] = None,
             session_env: Optional[dict[str, str]] = None,
             process_env: Optional[dict[str, str]] = None) -> tuple[subprocess.Popen, int]:
    """An sshd for `folder` (its host key, config, pid file and log live there) that admits
    `authorized_keys`, listening on 127.0.0.1:`port` (a free one by default); returns once it
    accepts connections. `session_env`: variables every SSH session gets (sshd's SetEnv);
    `process_env`: the environment of the sshd process itself."""
    host_key = folder / "host_ed25519"
    if not host_key.exists():
        keygen(host_key)
    (folder / "authorized_keys").write_text("".join(k.strip() + "\n" for k in authorized_keys))
    os.chmod(folder / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    port = port or free_port()
    setenv = ["SetEnv " + " ".join(f'{k}="{v}"' for k, v in session_env.items())] if session_env else []
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "MaxSessions 20", "MaxStartups 50", "LogLevel ERROR", *setenv, "",
    ]))
    log = folder / "sshd.log"
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(log, "a"), env=process_env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not start listening within 10 s: {log.read_text()}")
