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
    host_key = keygen(folder / "host_ed25519")
    client_key = keygen(folder / "client_ed25519")
    (folder / "authorized_keys").write_text((folder / "client_ed25519.pub").read_text())
    os.chmod(folder / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "MaxSessions 20", "MaxStartups 50", "LogLevel ERROR", "",
    ]))
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(folder / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(folder / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError("sshd did not start listening within 10 s")
    return SSHServer(port=port, user=getpass.getuser(), client_key=client_key, folder=folder, process=process)
