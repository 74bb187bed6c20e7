"""Secrets and the remote shell (issue 15), through the real CLI on the fake Vast.ai (real sshd
instances, real rsync) and the test sshd.

Recognisable fake secrets are planted everywhere a user keeps them (the Vast.ai key, an HF
token, Kaggle's key, the S3 store's keys, in the environment and in their files under HOME),
a whole run goes through with a checkpoint store, and afterwards every byte the run left is
searched: the launcher's output, its state directory (SQLite included), the runs folder, the
instance's files (what was synced there, its logs); the command line of every process is read
while the run goes. Then: state files 0600 in 0700 folders; a host whose key changed is
refused; a path full of shell syntax reaches no shell unquoted."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

from launcher.remote import SSHAddress, SSHMachine, SSHOptions
from tests.fakes.s3_server import S3Server
from tests.fakes.vast_api import FakeVast
from tests.helpers import TINY_DATA, tiny_job, train_losses, uninterrupted_losses
from tests.integration.conftest import VAST_CATALOG, Launcher, VastLauncher, output_of, ssh_args
from tests.sshd import keygen, run_sshd, start_sshd

VAST_KEY = "SECRET-vast-7f3a9c2e51d84b60"
SECRETS = {
    "HF_TOKEN": "hf_SECRETtoken9b1e6d4c7a2f",
    "KAGGLE_KEY": "SECRET-kaggle-0c5d8e2b9a71",
    "AWS_SECRET_ACCESS_KEY": "SECRET-aws-4e8b1f6a2c93",
}
STORE_KEY_VAR, STORE_SECRET_VAR = "TEST_STORE_KEY", "TEST_STORE_SECRET"


@pytest.fixture
def planted_home(tmp_path) -> Path:
    """A HOME holding the secrets where their tools keep them."""
    home = tmp_path / "user-home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "tester",
                                                              "key": SECRETS["KAGGLE_KEY"]}))
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(SECRETS["HF_TOKEN"])
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text(f"[default]\naws_access_key_id = AKIATEST\n"
                                               f"aws_secret_access_key = {SECRETS['AWS_SECRET_ACCESS_KEY']}\n")
    (home / ".config" / "vastai").mkdir(parents=True)
    (home / ".config" / "vastai" / "vast_api_key").write_text(VAST_KEY)
    return home


def command_lines_holding(secrets: list[str]) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                line = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(s.encode() in line for s in secrets):
                found.append(line.replace(b"\0", b" ").decode(errors="replace")[:300])
    return found


def files_holding(secrets: list[str], *folders: Path, skip: Path) -> list[str]:
    leaks = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_relative_to(skip) and not path.is_socket():
                data = path.read_bytes()
                leaks += [f"{path}: {s[:12]}..." for s in secrets if s.encode() in data]
    return leaks


def test_no_secret_reaches_a_log_record_file_or_command_line(tmp_path, planted_home):
    s3 = S3Server().start()
    vast = FakeVast(VAST_CATALOG, tmp_path / "vast", loading_s=0.3, api_key=VAST_KEY).start()
    try:
        bucket = s3.make_bucket("secrets")
        launcher = VastLauncher(tmp_path)
        launcher.fake = vast
        secrets = [VAST_KEY, *SECRETS.values(), s3.secret_key, s3.access_key]
        env = {"VAST_API_KEY": VAST_KEY, "HOME": str(planted_home), "KAGGLE_USERNAME": "tester",
               **SECRETS, STORE_KEY_VAR: s3.access_key, STORE_SECRET_VAR: s3.secret_key}
        config = tiny_job(tmp_path / "job.yaml", train={"max_steps": 30, "save_every": 10, "eval_every": 30},
                          storage={"kind": "s3", "bucket": bucket, "endpoint_url": s3.url, "region": "us-east-1",
                                   "prefix": "runs", "keep": 2, "access_key_env": STORE_KEY_VAR,
                                   "secret_key_env": STORE_SECRET_VAR},
                          resources={"python": sys.executable, "providers": ["vast"],
                                     "vast": {"ssh_timeout_s": 5, "pull_stall_s": 3, "max_offers_tried": 2}})
        proc = launcher.start("--config", str(config), "--yes", **env)
        on_command_lines: list[str] = []
        while proc.poll() is None:
            on_command_lines += command_lines_holding(secrets)
            time.sleep(0.1)
        out = proc.stdout.read()
        assert proc.returncode == 0, out[-4000:]
        (record,) = launcher.records()
        assert record.status == "done" and record.stored_step == 30
        # What the user runs next shows nothing either; nor does an error with its traceback.
        for args in (["status", record.id, "--json"], ["runs", "--json"], ["logs", record.id]):
            shown = launcher.run(*args, **env)
            assert shown.returncode == 0, output_of(shown)
            out += output_of(shown)
        wrong = launcher.run("plan", "--config", str(config), "--debug",
                             **{**env, "VAST_API_KEY": VAST_KEY + "-revoked"})
        out += output_of(wrong)
        assert on_command_lines == []
        assert [s[:12] for s in secrets if s in out] == []
        assert files_holding(secrets, tmp_path, skip=planted_home) == []  # state, runs, the instance's files
        assert vast.alive() == []
    finally:
        vast.stop()
        s3.stop()
    # The state directory is this user's alone.
    for path in [launcher.home, *launcher.home.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        elif not path.is_socket() and path.suffix != ".pub":  # a public key may be read by anyone
            assert mode == 0o600, (path, oct(mode))


def processes_in(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_host_whose_key_changed_is_refused(tmp_path):
    """The run's known_hosts pins the target's key at the first connection; an sshd answering on
    the same address with another key (a machine reinstalled, or a man in the middle) is refused."""
    server = start_sshd(tmp_path / "sshd")
    launcher = Launcher(tmp_path)
    config = tiny_job(tmp_path / "job.yaml", train={"max_steps": 400, "save_every": 100, "eval_every": 400},
                      resources={"workdir": str(tmp_path / "remote")})
    started = launcher.run("--config", str(config), *ssh_args(server), "--yes", "--detach")
    assert started.returncode == 0, output_of(started)
    (record,) = launcher.records()
    try:
        # The machine is replaced: its sshd and every connection to it go (our shared one too).
        server.process.kill()
        server.process.wait()
        master = SSHMachine(SSHAddress.parse(server.target), SSHOptions(
            known_hosts=launcher.home / "known_hosts" / record.id, control_dir=launcher.home / "ssh",
            identity=server.client_key)).master_pid()
        if master is not None:
            os.kill(master, 9)
        (server.folder / "host_ed25519").unlink()
        keygen(server.folder / "host_ed25519")
        server.process, _ = run_sshd(server.folder, [(server.folder / "client_ed25519.pub").read_text()],
                                     port=server.port)
        attached = launcher.run("attach", record.id, timeout=120)
        assert attached.returncode == 8, output_of(attached)
        line = attached.stderr.strip().splitlines()[-1]
        assert "host key" in line.lower() and str(launcher.home / "known_hosts" / record.id) in line, line
        assert launcher.records()[0].status == "running"  # nothing was decided on a machine we cannot trust
    finally:
        for pid in processes_in(Path(record.remote_dir)):  # the runner we can no longer reach to stop
            os.kill(pid, 9)
        server.stop()


class NastyLauncher(Launcher):
    """Started from the nasty folder, its runs there; the state directory's path has spaces."""

    @property
    def home(self) -> Path:
        return self.folder.parent / "state dir with spaces"


NASTY = "we ird 'q' \"d\" $(touch PWNED) `touch PWNED2` ; rm -rf KEEP &"


def test_paths_full_of_shell_syntax_reach_no_shell_unquoted(tmp_path, sshd):
    """A data file, a runs folder, a target workdir and a config named with spaces, quotes,
    $(...), backticks and `; rm -rf`: the run is done, nothing was executed, nothing removed."""
    nasty = tmp_path / NASTY
    nasty.mkdir()
    (tmp_path / "KEEP").mkdir()
    (nasty / "KEEP").mkdir()
    data = shutil.copy(TINY_DATA, nasty / f"data {NASTY}.jsonl")
    config = tiny_job(nasty / "job $(touch PWNED);x.yaml", data={"path": str(data)},
                      train={"max_steps": 12, "save_every": 6, "eval_every": 12},
                      resources={"workdir": str(nasty / "remote")})
    launcher = NastyLauncher(nasty)
    proc = launcher.run("--config", str(config), *ssh_args(sshd), "--yes")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    (record,) = launcher.records()
    assert record.status == "done" and Path(record.run_dir).is_relative_to(nasty / "runs")
    assert (Path(record.run_dir) / "adapter" / "adapter_model.safetensors").is_file()
    assert Path(record.remote_dir).is_relative_to(nasty / "remote")
    reference = uninterrupted_losses(tiny_job(tmp_path / "ref.yaml", data={"path": str(data)},
                                              train={"max_steps": 12, "save_every": 6, "eval_every": 12}),
                                     tmp_path / "ref")
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference, abs=1e-5)
    executed = [*tmp_path.rglob("PWNED*"), *Path(sshd.folder).rglob("PWNED*"),
                *[p for p in (Path.home() / "PWNED", Path.home() / "PWNED2") if p.exists()]]
    assert executed == [] and (tmp_path / "KEEP").is_dir() and (nasty / "KEEP").is_dir()
