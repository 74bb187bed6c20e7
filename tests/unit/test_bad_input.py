"""Bad input through the real CLI (`python -m launcher`, a process of its own, as a new user runs
it): each a clear one-line error with its exit code, no traceback, and nothing created — no run
record, no run folder. The cases issue 15 found ending in "internal error" or in the wrong advice,
then the rest of its list (CASES: one test each), and the same cases with a provider at hand
creating nothing there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

TINY = ROOT / "configs" / "tiny-cpu.yaml"
MISTRAL = ROOT / "configs" / "mistral-7b-qlora.yaml"


@pytest.fixture
def folder(tmp_path) -> Path:
    """The tiny config and its assets in a folder of their own (relative paths as shipped)."""
    shutil.copytree(ROOT / "configs" / "tiny", tmp_path / "tiny")
    shutil.copy2(TINY, tmp_path / "tiny-cpu.yaml")
    return tmp_path


def edited(folder: Path, name: str, section: str, **values) -> Path:
    config = yaml.safe_load((folder / "tiny-cpu.yaml").read_text())
    config[section].update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def launch(folder: Path, *args: str) -> tuple[int, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "QLORA_LAUNCH_HOME": str(folder / "state"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "LANG": os.environ.get("LANG", "C.UTF-8")}
    proc = subprocess.run([sys.executable, "-m", "launcher", *args, "--runs-dir", str(folder / "runs")]
                          if not args or args[0].startswith("--") else [sys.executable, "-m", "launcher", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def one_error(output: str) -> str:
    assert "Traceback" not in output and "internal error" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def nothing_created(folder: Path) -> None:
    assert not (folder / "runs").exists() or not any((folder / "runs").iterdir())
    code, out = launch(folder, "runs", "--json")
    assert code == 0 and out.strip() in ("[]", ""), out


def test_a_local_model_folder_that_does_not_exist(folder):
    code, out = launch(folder, "--config", str(edited(folder, "job.yaml", "model", base="./models/llama")), "--yes")
    line = one_error(out)
    assert code == 5 and f"{folder}/models/llama is not a folder" in line
    nothing_created(folder)


def test_a_data_file_that_does_not_exist(folder):
    code, out = launch(folder, "--config", str(edited(folder, "job.yaml", "data", path="tiny/data/animal.jsonl")),
                       "--yes")
    line = one_error(out)
    assert code == 4 and "tiny/data/animal.jsonl does not exist" in line
    nothing_created(folder)


def test_an_org_name_model_that_is_neither_a_folder_nor_reachable_names_both_readings(folder):
    """`tiny/modle` reads as a hub id and as a folder next to the config: with the hub off here,
    where the job runs, it fails in a second naming both, not after a minute of the hub's retries."""
    code, out = launch(folder, "--config", str(edited(folder, "job.yaml", "model", base="tiny/modle")), "--yes")
    line = one_error(out)
    assert code == 5 and f"no folder {folder}/tiny/modle" in line and "HF_HUB_OFFLINE" in line
    nothing_created(folder)


def test_a_misspelt_alias_is_told_the_key_it_means(folder):
    config = (folder / "tiny-cpu.yaml").read_text().replace("  lr: 3.0e-3", "  lerning_rate: 3.0e-3")
    (folder / "job.yaml").write_text(config)
    code, out = launch(folder, "--config", str(folder / "job.yaml"), "--yes")
    line = one_error(out)
    assert code == 3 and "train.lerning_rate: unknown key; did you mean 'lr'?" in line
    nothing_created(folder)


@pytest.mark.parametrize("name, says", [("foo", "'foo' is not a provider we know; known: local, ssh, vast"),
                                        ("vats", "did you mean 'vast'?")])
def test_an_unknown_provider_names_the_known_ones(folder, name, says):
    code, out = launch(folder, "--config", str(MISTRAL), "--providers", name, "--yes")
    line = one_error(out)
    assert code == 2 and says in line and "kaggle" in line


def test_a_near_miss_on_the_market_says_the_market_flag_not_the_micro_batch(folder):
    """The Mistral config asks for spot; an A10 is on demand only: the fix is --on-demand."""
    code, out = launch(folder, "--config", str(MISTRAL), "--gpu", "A10", "--yes")
    line = one_error(out)
    assert code == 9 and "near miss is 1x A10" in line and ": on-demand. Try --on-demand" in line
    assert "micro_batch_size" not in line
    nothing_created(folder)


def test_a_negative_price_cap_is_refused(folder):
    code, out = launch(folder, "--config", str(MISTRAL), "--max-price", "-1", "--yes")
    line = one_error(out)
    assert code == 3 and "resources.max_price (from --max-price): must be > 0" in line
    nothing_created(folder)


# ---------------------------------------------------------------------------------------------
# The rest of the list, one test each: (what, how it is made, exit code, what the line says)
# ---------------------------------------------------------------------------------------------


def write(folder: Path, name: str, content: "str | bytes") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def with_data(folder: Path, name: str, content: "str | bytes", **data) -> list[str]:
    data_file = write(folder, f"data/{name}", content)
    return ["--config", str(edited(folder, "job.yaml", "data", path=str(data_file), **data)), "--yes"]


def config_text(folder: Path, text: str) -> list[str]:
    return ["--config", str(write(folder, "job.yaml", text)), "--yes"]


def config_with(folder: Path, section: str, **values) -> list[str]:
    return ["--config", str(edited(folder, "job.yaml", section, **values)), "--yes"]


def model_without_weights(folder: Path) -> list[str]:
    shutil.copy2(folder / "tiny" / "model" / "config.json", write(folder, "noweights/config.json", "{}"))
    return config_with(folder, "model", base=str(folder / "noweights"))


def packing_on_an_unknown_architecture(folder: Path) -> list[str]:
    model = folder / "othermodel"
    shutil.copytree(folder / "tiny" / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    job = yaml.safe_load((folder / "tiny-cpu.yaml").read_text())
    job["model"]["base"], job["data"]["packing"] = str(model), True
    return config_text(folder, yaml.safe_dump(job))


GOOD = ("instruction,output\n", '{"instruction": "Say hi", "output": "hi"}\n')
CASES = {
    "malformed YAML": (lambda f: config_text(f, "model: [unclosed\n  data: x\n"), 3,
                       "not valid YAML at line 2, column 7"),
    "a YAML list, not a mapping": (lambda f: config_text(f, "- model\n- data\n"), 3, "expected a mapping of keys"),
    "an empty config file": (lambda f: config_text(f, ""), 3, "the config file is empty"),
    "an unknown section, with a did-you-mean": (lambda f: config_text(f, (f / "tiny-cpu.yaml").read_text().replace(
        "model:", "modle:")), 3, "modle: unknown key; did you mean 'model'?"),
    "a wrong type": (lambda f: config_with(f, "train", epochs="six"), 3, "train.epochs: expected a number, got 'six'"),
    "a zero micro batch": (lambda f: config_with(f, "train", micro_batch_size=0), 3,
                           "train.micro_batch_size: must be >= 1, got 0"),
    "a negative LoRA rank": (lambda f: config_with(f, "lora", r=-4), 3, "lora.r: must be > 0, got -4"),
    "splits not summing to 1": (lambda f: config_with(f, "data", splits={"train": 0.7, "validation": 0.1,
                                                                         "test": 0.1}), 3,
                                "must add up to 1, got 0.9 (0.7 + 0.1 + 0.1)"),
    "an unknown choice, with a did-you-mean": (lambda f: config_with(f, "data", format="instructon"), 3,
                                               "data.format: must be one of completion, instruction, chat, got "
                                               "'instructon'; did you mean 'instruction'?"),
    "an empty data file": (lambda f: with_data(f, "empty.jsonl", ""), 4, "has no examples"),
    "a row missing its field": (lambda f: with_data(f, "rows.jsonl", GOOD[1] + '{"instruction": "Say bye"}\n'), 4,
                                "example 2 has no field 'output'"),
    "a broken JSON line": (lambda f: with_data(f, "broken.jsonl", GOOD[1] + '{"instruction": "c", \n'), 4,
                           "line 2 is not valid JSON"),
    "a CSV with a stray quote": (lambda f: with_data(f, "quote.csv", GOOD[0] + '"Say hi,hi\nSay bye,bye\n'), 4,
                                 "is not valid CSV from line 2 (unexpected end of data): a quote opened there"),
    "a data file in Latin-1": (lambda f: with_data(f, "latin.jsonl", '{"instruction": "café", "output": "crème"}\n'
                                                   .encode("latin-1")), 4, "is not UTF-8 text; re-save it as UTF-8"),
    "a data file in UTF-16": (lambda f: with_data(f, "utf16.jsonl", GOOD[1].encode("utf-16")), 4, "is not UTF-8 text"),
    "a model folder without weights": (model_without_weights, 5, "has no weights (*.safetensors or *.bin)"),
    "an unknown GPU, with near matches": (lambda f: ["--config", str(MISTRAL), "--gpu", "A1000", "--yes"], 2,
                                          "unknown GPU 'A1000'; did you mean A100-40GB"),
    "--gpu H100:0": (lambda f: ["--config", str(MISTRAL), "--gpu", "H100:0", "--yes"], 3,
                     "resources.gpus (from --gpu NAME:N): must be >= 1, got 0"),
    "a price cap below every offer": (lambda f: ["--config", str(MISTRAL), "--max-price", "0.01", "--yes"], 9,
                                      "above the $0.010/h cap. Try a higher --max-price"),
    "a total cap below every estimate": (lambda f: ["--config", str(MISTRAL), "--max-total", "0.01", "--yes"], 9,
                                         "above the $0.010 total cap"),
    "a zero total cap": (lambda f: ["--config", str(MISTRAL), "--max-total", "0", "--yes"], 3,
                         "resources.max_total_usd (from --max-total): must be > 0"),
    "no credentials for the chosen provider": (lambda f: ["--config", str(MISTRAL), "--providers", "vast", "--gpu",
                                                          "RTX4090", "--on-demand", "--yes"], 2,
                                               "cannot be rented from here"),
    "an SSH key that is not there": (lambda f: ["--config", str(f / "tiny-cpu.yaml"), "--target",
                                                "ssh://nobody@127.0.0.1:9", "--identity", str(f / "nokey"), "--yes"],
                                     3, "resources.ssh_identity (--identity): {f}/nokey is not a file here"),
    "a config that is a folder": (lambda f: ["--config", str(f / "tiny"), "--yes"], 2,
                                  "is a folder, not a job file"),
    "a ready config misspelt": (lambda f: ["--config", "mistral-7b", "--yes"], 2,
                                "did you mean the ready config 'mistral-7b-qlora'?"),
    "padding-free batches on a model not known to keep them apart": (
        packing_on_an_unknown_architecture, 3, "data.packing: true, but model type 'gpt_neox' is not one whose "
                                               "attention is known to keep packed examples apart"),
    "Liger's kernels on a CPU job": (lambda f: config_with(f, "train", kernels="liger"), 3,
                                     "train.kernels: liger needs a CUDA GPU"),
    "a runs folder that cannot be written": (lambda f: ["--config", str(f / "tiny-cpu.yaml"), "--yes", "--runs-dir",
                                                        str(write(f, "a-file", "x") / "runs")], 2,
                                             "cannot write there (Not a directory: {f}/a-file)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_its_exit_code_and_creates_nothing(folder, case):
    make, code, says = CASES[case]
    args = make(folder)
    got, out = _launch_raw(folder, args) if "--runs-dir" in args else launch(folder, *args)  # its own runs folder
    line = one_error(out)
    assert got == code and says.replace("{f}", str(folder)) in line, (got, line)
    nothing_created(folder)


def _launch_raw(folder: Path, args: list[str]) -> tuple[int, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "QLORA_LAUNCH_HOME": str(folder / "state"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_an_unreachable_ssh_target_fails_in_seconds_and_records_why(folder):
    code, out = launch(folder, "--config", str(folder / "tiny-cpu.yaml"), "--target", "ssh://nobody@127.0.0.1:9",
                       "--yes")
    line = one_error(out)
    assert code == 8 and "127.0.0.1 port 9: Connection refused" in line and "sshd runs there" in line
    code, listed = launch(folder, "runs", "--json")
    (run,) = __import__("json").loads(listed)  # the attempt is on record, failed, with the reason
    assert run["status"] == "failed" and "Connection refused" in run["error"]


def test_a_state_folder_that_cannot_be_written_is_one_line(folder):
    write(folder, "a-file", "x")
    env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "QLORA_LAUNCH_HOME": str(folder / "a-file" / "st"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    for args in (["runs"], ["--config", str(folder / "tiny-cpu.yaml"), "--yes"]):
        proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=120)
        line = one_error(proc.stdout + proc.stderr)
        assert proc.returncode == 7 and "cannot keep run records in" in line and "QLORA_LAUNCH_HOME" in line


def test_nothing_is_written_next_to_the_config(folder):
    """A job file on a read-only share works: planning writes nothing beside it (root writes
    through permissions, so the folder's contents are compared instead)."""
    config = edited(folder, "job.yaml", "train", device="auto")  # a GPU job: planned on the catalogs

    def files() -> list[Path]:
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.relative_to(folder).parts[0]
                      not in ("home", "state"))

    before = files()
    code, out = launch(folder, "plan", "--config", str(config), "--providers", "aws", "--json")
    assert code == 0 and "Traceback" not in out, out[-2000:]
    assert files() == before


def test_bad_input_with_a_provider_at_hand_creates_nothing_there(folder):
    """With the fake Vast.ai reachable and its key set, the cases a provider could be asked
    about fail before any call that creates something (its request log has no create)."""
    from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast

    fake = FakeVast(ROOT / "catalogs" / "v8" / "vast" / "vms.csv", folder / "vast").start()
    try:
        env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "QLORA_LAUNCH_HOME": str(folder / "state"),
               "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "VAST_URL": fake.url, "VAST_API_KEY": ACCOUNT_KEY}
        gpu_job = str(edited(folder, "gpu.yaml", "train", device="auto"))
        for args, code in ((["--gpu", "A1000"], 2), (["--max-price", "0.001"], 9), (["--max-total", "0.0001"], 9),
                           (["--gpu", "RTX4090:0"], 3), (["--providers", "vats"], 2)):
            proc = subprocess.run([sys.executable, "-m", "launcher", "--config", gpu_job, "--providers", "vast", *args,
                                   "--yes", "--runs-dir", str(folder / "runs")], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=120)
            one_error(proc.stdout + proc.stderr)
            assert proc.returncode == code, (args, proc.stdout + proc.stderr)
        searches = [r for r in fake.requests if r["path"] == "/api/v0/bundles/"]  # the offer search is a POST
        creating = [r for r in fake.requests if r["method"] in ("PUT", "POST", "DELETE") and r not in searches]
        assert searches  # the market was asked: these failed on the answer, not before asking
        assert creating == [] and fake.instances == {}
    finally:
        fake.stop()
    nothing_created(folder)
