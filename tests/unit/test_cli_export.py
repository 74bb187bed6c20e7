"""`launch export --colab`: bad input is one clear line each, assets too large to carry are
named with their size, and `launch export --help` stays light. In-process, no kernel run (that
is tests/integration/test_colab_export.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from launcher import cli
from tests.helpers import ROOT, TINY_DATA, tiny_job


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    return tmp_path


def launch(*argv: str) -> tuple[int, str, str]:
    out, err = Console(width=400, record=True), Console(width=400, record=True)
    code = cli.main(list(argv), console=out, errors=err)
    return code, out.export_text(), err.export_text()


def test_a_missing_config_is_one_line(tmp_path):
    code, out, err = launch("export", "--colab", "--config", str(tmp_path / "nope.yaml"),
                            "--output", str(tmp_path / "x.ipynb"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: config file") and "nope.yaml not found" in err
    assert not (tmp_path / "x.ipynb").exists()


def test_a_config_that_does_not_load_is_one_line_naming_the_key(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", train={"lr": -1})
    code, _, err = launch("export", "--colab", "--config", str(config), "--output", str(tmp_path / "x.ipynb"))
    assert code == 3 and err.count("\n") == 1 and "train.lr" in err and "job.yaml" in err


def test_an_existing_output_is_one_line_and_left_alone(tmp_path):
    config = tiny_job(tmp_path / "job.yaml")
    output = tmp_path / "job.ipynb"
    output.write_text("mine")
    code, _, err = launch("export", "--colab", "--config", str(config), "--output", str(output))
    assert code == 2 and err.count("\n") == 1
    assert f"{output} exists; pass --force" in err and output.read_text() == "mine"
    code, out, _ = launch("export", "--colab", "--config", str(config), "--output", str(output), "--force")
    assert code == 0 and f"wrote {output}" in out and json.loads(output.read_text())["nbformat"] == 4


def test_without_colab_it_asks_which_kind(tmp_path):
    code, _, err = launch("export", "--config", str(tiny_job(tmp_path / "job.yaml")))
    assert code == 2 and "--colab" in err and err.count("\n") == 1


def test_data_over_the_limit_is_expected_on_drive_with_its_size(tmp_path):
    config = tiny_job(tmp_path / "job.yaml")
    output = tmp_path / "job.ipynb"
    code, out, err = launch("export", "--colab", "--config", str(config), "--output", str(output),
                            "--embed-limit-mb", "0.01")
    size_mb = TINY_DATA.stat().st_size / 1e6
    assert code == 0, err
    assert f"data.path: animals.jsonl ({size_mb:.1f} MB) is over the 0.01 MB" in err
    assert "MyDrive/qlora-launch/assets/animals.jsonl" in err
    source = "".join("".join(c["source"]) for c in json.loads(output.read_text())["cells"])
    assert "'data.path': ('animals.jsonl'," in source and "too large to carry in this notebook" in source


def test_the_same_job_exported_again_names_the_same_run(tmp_path):
    config = tiny_job(tmp_path / "job.yaml")
    names = []
    for n, steps in enumerate((40, 40, 41)):
        tiny_job(config, train={"max_steps": steps})
        code, out, _ = launch("export", "--colab", "--config", str(config), "--output", str(tmp_path / f"{n}.ipynb"))
        assert code == 0
        names.append(out.split("MyDrive/qlora-launch/")[1].split(")")[0])
    assert names[0] == names[1] != names[2] and names[0].startswith("job-")


def test_export_help_imports_nothing_heavy():
    code = ("import sys\nfrom launcher import cli\ntry:\n    cli.main(['export', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'peft', 'nbclient', 'nbformat', "
            "'matplotlib', 'ipykernel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "usage: launch export" in out and "--colab" in out and "--output" in out
    assert out.strip().splitlines()[-1] == "HEAVY="
