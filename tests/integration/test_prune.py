"""`launch prune` on an SSH target (the test sshd), after real runs: a done run, a run stopped
with `launch down` (resumable), a venv no run uses, a run folder this laptop does not know.
Listing removes nothing; --yes removes exactly what no run needs, and the stopped run still
resumes afterwards (its folder and its assets were kept)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import tiny_job
from tests.integration.conftest import Launcher, output_of, runner_step, ssh_args


def kinds(entries: list[dict], why: str | None) -> list[tuple[str, str]]:
    return sorted((e["kind"], e["name"]) for e in entries if (e["kept_because"] is None) == (why is None)
                  and (why is None or why in e["kept_because"]))


def test_prune_lists_then_removes_only_what_no_run_needs(launcher: Launcher, sshd):
    workdir = launcher.folder / "remote"
    short = tiny_job(launcher.folder / "short.yaml", train={"max_steps": 6, "save_every": 3, "eval_every": 6},
                     resources={"workdir": str(workdir)})
    done = launcher.run("--config", str(short), *ssh_args(sshd), "--yes")
    assert done.returncode == 0, output_of(done)[-3000:]
    long = tiny_job(launcher.folder / "long.yaml", train={"max_steps": 200, "save_every": 5, "eval_every": 200},
                    resources={"workdir": str(workdir)})
    started = launcher.run("--config", str(long), *ssh_args(sshd), "--yes", "--detach")
    assert started.returncode == 0, output_of(started)
    stopped_id, done_id = (r.id for r in launcher.records())  # newest first
    launcher.wait_for(lambda r: runner_step(r.remote_dir) >= 6)  # past its first checkpoint
    stopped = launcher.run("down", stopped_id)
    assert stopped.returncode == 0, output_of(stopped)
    (workdir / "venvs" / "0123456789abcdef0123").mkdir(parents=True)  # an old requirements' venv
    (workdir / "venvs" / "0123456789abcdef0123" / "big").write_bytes(b"x" * 3 * 2**20)
    (workdir / "runs" / "20260101-000000-other-laptop-beef").mkdir()

    target = ["--target", sshd.target, "--identity", str(sshd.client_key), "--workdir", str(workdir)]
    listed = launcher.run("prune", *target, "--json")
    assert listed.returncode == 0, output_of(listed)
    entries = json.loads(listed.stdout)["entries"]
    stranger = "20260101-000000-other-laptop-beef"
    assert kinds(entries, None) == [("run", done_id)]
    assert kinds(entries, "launch resume") == [("run", stopped_id)]
    assert kinds(entries, "not in this laptop's run records") == [("run", stranger)]
    assert kinds(entries, f"run {stranger} (not in these records) may use it") == [("venv", "0123456789abcdef0123")]
    assets = [e for e in entries if e["kind"] == "asset"]
    assert assets and all(e["kept_because"] == f"used by run {stopped_id}" for e in assets)
    assert (workdir / "runs" / done_id).is_dir()  # listing removes nothing

    (workdir / "runs" / stranger).rmdir()  # that laptop's user cleans up their own run
    shown = launcher.run("prune", *target)
    assert "2 can go, freeing" in shown.stdout and "launch prune --target" in shown.stdout, output_of(shown)
    pruned = launcher.run("prune", *target, "--yes")
    assert pruned.returncode == 0 and "removed 2, freed" in pruned.stdout, output_of(pruned)
    assert not (workdir / "runs" / done_id).exists() and not (workdir / "venvs" / "0123456789abcdef0123").exists()
    assert (workdir / "runs" / stopped_id).is_dir()
    assert all((workdir / "assets" / e["name"]).is_dir() for e in assets)
    # The done run's results are here; what the stopped one resumes from is still there.
    done_record = next(r for r in launcher.records() if r.id == done_id)
    assert (Path(done_record.run_dir) / "adapter" / "adapter_model.safetensors").is_file()
    assert list((workdir / "runs" / stopped_id / "checkpoints").glob("checkpoint-*/qlora_complete.json"))
