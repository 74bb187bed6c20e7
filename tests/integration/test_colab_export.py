"""`launch export --colab`: the notebook is valid nbformat 4 with Colab's GPU runtime, and it
trains for real when executed (nbclient, an ipykernel python3 kernel, on the CPU), with the
Drive mount and pip cells skipped by QLORA_COLAB_SKIP_SETUP and the Drive folder in tmp_path.
A disconnect is the runner killed (-9) after a checkpoint, as a lost Colab VM kills it; the
second execution into the same folder resumes and ends with the losses of an uninterrupted run.
Colab itself (the Drive mount, its pip, its GPUs) cannot be reached from here."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from rich.console import Console

from launcher import cli
from tests.helpers import ROOT, read_json, tiny_job, train_losses, uninterrupted_losses

STEPS = 8


@pytest.fixture
def exported(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """The tiny job (8 steps, a checkpoint every 2) exported; returns (config, notebook)."""
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    config = tiny_job(tmp_path / "job.yaml", train={"max_steps": STEPS, "save_every": 2, "eval_every": STEPS})
    notebook = tmp_path / "job.ipynb"
    out, err = Console(width=400, record=True), Console(width=400, record=True)
    assert cli.main(["export", "--colab", "--config", str(config), "--output", str(notebook)],
                    console=out, errors=err) == 0, err.export_text()
    return config, notebook


def execute(notebook: Path, cwd: Path) -> tuple[str, BaseException | None]:
    """Run every cell in a fresh kernel; returns (all stream output, the error that stopped it)."""
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(cwd)}})
    error = None
    try:
        client.execute()
    except CellExecutionError as e:
        error = e
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    return text, error


def test_the_notebook_is_nbformat_4_with_colabs_gpu_runtime(exported):
    _, notebook = exported
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.accelerator == "GPU" and nb.metadata.colab.gpuType == "T4"
    assert nb.metadata.kernelspec.name == "python3"
    source = "\n".join(c.source for c in nb.cells)
    assert repr((ROOT / "runner" / "requirements.txt").read_text()) in source  # the pinned requirements, embedded
    assert 'drive.mount("/content/drive")' in source and "import google.colab" in source
    assert '"--resume", "auto"' in source and "/content/drive/MyDrive/qlora-launch" in source


def test_the_notebook_trains_and_a_second_session_resumes_after_a_disconnect(exported, tmp_path, monkeypatch):
    config, notebook = exported
    reference = uninterrupted_losses(config, tmp_path / "reference")
    drive = tmp_path / "drive"
    monkeypatch.setenv("QLORA_COLAB_SKIP_SETUP", "1")
    monkeypatch.setenv("QLORA_COLAB_DRIVE_DIR", str(drive))

    # Session 1: the VM goes away (the runner killed -9) once a checkpoint is complete.
    result: dict = {}
    session = threading.Thread(target=lambda: result.update(zip(("text", "error"), execute(notebook, tmp_path))))
    session.start()
    killed_after = None
    deadline = time.monotonic() + 200
    while session.is_alive() and time.monotonic() < deadline:
        complete = sorted(int(p.parent.name.split("-")[1]) for p in drive.glob("*/checkpoints/checkpoint-*/qlora_complete.json"))
        if complete:
            (run_dir,) = drive.glob("*/status.json")
            os.kill(read_json(run_dir)["pid"], signal.SIGKILL)
            killed_after = complete[-1]
            break
        time.sleep(0.02)
    session.join(timeout=60)
    assert killed_after is not None and not session.is_alive(), result.get("text", "")[-3000:]
    (run_dir,) = [p for p in drive.iterdir() if not p.name.startswith(".")]
    assert "no complete checkpoint yet, starting from the beginning" in result["text"]
    assert result["error"] is not None and "the runner exited with code -9" in str(result["error"])
    assert read_json(run_dir / "status.json")["phase"] != "done"

    # Session 2: Run all again, same folder: it resumes from the newest complete checkpoint and finishes.
    text, error = execute(notebook, tmp_path)
    assert error is None, text[-3000:]
    resumed = int(text.split("resuming from checkpoint-")[1].split()[0])
    assert killed_after <= resumed < STEPS
    assert read_json(run_dir / "status.json")["phase"] == "done"
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "loss.png").is_file()
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(reference, abs=1e-5)
    assert f"{STEPS} steps, loss" in text and "done: the adapter is in" in text
