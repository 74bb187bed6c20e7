"""`launch` and `launch plan` as one planning path over resources.*: the market flags are
overrides recorded with the job, a flag that would change nothing is refused, `--gpu any` drops
a config's pinned GPU, and `launch check` names every provider with its fix. In-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from launcher import cli, config as launch_config
from launcher.cli import launch_parser
from launcher.cli_plan import market_overrides
from tests.helpers import ROOT, tiny_job

MISTRAL = ROOT / "configs" / "mistral-7b-qlora.yaml"


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no Vast.ai key file of the machine's user
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("QLORA_LAUNCH_CATALOG_DIR", raising=False)
    return tmp_path


def launch(*argv: str) -> tuple[int, str, str]:
    out, err = Console(width=200, record=True), Console(width=400, record=True)
    code = cli.main(list(argv), console=out, errors=err)
    return code, out.export_text(), err.export_text()


def test_market_flags_are_overrides_of_resources():
    args = launch_parser().parse_args(["--gpu", "T4:2", "--providers", "vast, aws", "--on-demand", "--max-price",
                                       "0.9", "--max-total", "12"])
    config = launch_config.load(MISTRAL, market_overrides(args))
    r = config.resources
    assert (r.gpu, r.providers, r.interruptible, r.max_price, r.max_total_usd) == ("T4:2", ["vast", "aws"], False,
                                                                                  0.9, 12.0)
    # What travels and what job.local.yaml records: the job as launched, flags included.
    assert config.raw["resources"]["gpu"] == "T4:2" and config.raw["resources"]["max_total_usd"] == 12.0
    with pytest.raises(launch_config.ConfigError, match=r"resources.max_total_usd \(from --max-total\)"):
        launch_config.load(MISTRAL, {"max_total_usd": -1})


def test_gpu_any_drops_the_configs_pinned_gpu():
    code, out, _ = launch("plan", "--config", str(MISTRAL), "--json")
    pinned = {o["gpu"] for o in json.loads(out)["offers"]}
    code_any, out_any, _ = launch("plan", "--config", str(MISTRAL), "--gpu", "any", "--json")
    anywhere = {o["gpu"] for o in json.loads(out_any)["offers"]}
    assert code == code_any == 0
    assert pinned == {"A10G"} and {"A10G", "T4", "L4"} <= anywhere


def test_gpu_and_gpus_must_agree(tmp_path):
    # In the file: two counts that disagree are a mistake to say.
    text = MISTRAL.read_text().replace("resources: {gpu: A10G, gpus: 1,", "resources: {gpu: A10G:2, gpus: 1,")
    assert text != MISTRAL.read_text()
    (tmp_path / "job.yaml").write_text(text)
    code, _, err = launch("plan", "--config", str(tmp_path / "job.yaml"))
    assert code == 3 and "resources.gpus" in err and "say it once" in err
    # A flag's count overrides the file's (the ready configs say gpus: 1): --gpu A10G:2 means 2 GPUs.
    code, out, err = launch("plan", "--config", str(MISTRAL), "--gpu", "A10G:2", "--json")
    plan = json.loads(out)
    assert code in (0, 9), err
    assert all(row["gpu_count"] == 2 for row in plan["offers"] if row["fits"])


def test_gpu_on_a_job_that_trains_on_the_cpu_is_refused(tmp_path):
    code, _, err = launch("--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--gpu", "A10G", "--yes",
                          "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and "--gpu A10G: this job trains on the CPU (train.device: cpu" in err
    assert not (tmp_path / "runs").exists()


def test_market_flags_on_a_job_that_rents_nothing_are_refused(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", train={"device": "auto"})
    for flags, where in ((["--target", "local", "--max-price", "1"], "--target local"),
                         (["--max-total", "5", "--spot"], "resources.providers: [local]")):
        code, _, err = launch("--config", str(config), *flags, "--yes", "--runs-dir", str(tmp_path / "runs"))
        assert code == 2, err
        assert "only choose a machine to rent, and this job rents none" in err and where in err
    assert not (tmp_path / "runs").exists()


def test_check_names_every_provider_with_its_fix(monkeypatch):
    code, out, _ = launch("check", "--json")
    report = json.loads(out)
    assert code == 0
    providers = {line["what"]: line for line in report["providers"]}
    assert set(providers) == set(__import__("launcher.providers", fromlist=["PROVIDERS"]).PROVIDERS)
    assert providers["local"]["usable"] and providers["ssh"]["usable"]
    vast = providers["vast"]
    assert not vast["usable"] and "VAST_API_KEY" in vast["detail"] and "VAST_API_KEY" in vast["fix"]
    assert {line["what"] for line in report["laptop"]} == {"ssh", "rsync", "ssh key"}
    monkeypatch.setenv("VAST_API_KEY", "secret-key-123")
    code, out, _ = launch("check", "--json")
    vast = {line["what"]: line for line in json.loads(out)["providers"]}["vast"]
    assert vast["usable"] and vast["detail"].endswith("VAST_API_KEY") and "secret-key-123" not in out


def test_plan_points_to_check_when_a_provider_it_would_rent_on_is_unusable(tmp_path):
    code, _, err = launch("--config", str(MISTRAL), "--yes", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    assert "Vast.ai is not usable here" in err and "`launch check` says how to set up Vast.ai" in err
