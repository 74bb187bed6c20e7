"""`launch merge`, `push` and `chat` on a real run of the tiny model: the merged model computes what
base + adapter computes, the CLI merges a recorded run (here, and on its machine over the test
sshd), the push reaches a fake Hub on loopback with the files and a model card and never shows the
token, and chat answers one prompt on stdout."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.runs import RunRecord, RunStore
from tests.fakes.hub_api import FakeHub
from tests.helpers import TINY_MODEL, run_runner, tiny_job
from tests.integration.conftest import Launcher, output_of, ssh_args

STEPS = 20  # enough for LoRA B to move well away from its zero start
TOKEN = "hf_fakeTokenThatMustNeverBeShown0123456789"
USD_PER_HOUR = 1.25


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> tuple[Launcher, RunRecord]:
    """A finished run of the tiny job, made by the runner itself and recorded as `launch` records
    one (its folder holds job.local.yaml, the adapter, eval.json, runner.log)."""
    launcher = Launcher(tmp_path_factory.mktemp("deploy"))
    run_id = "20261202-101010-tiny-deploy-abcd"
    run_dir = launcher.runs_dir / run_id
    job = tiny_job(launcher.folder / "job.yaml", train={"max_steps": STEPS, "save_every": 100, "eval_every": 100},
                   eval={"samples": 0})
    proc = run_runner(job, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir / "job.local.yaml").write_text(job.read_text())  # absolute paths already, as launch writes it
    store = RunStore(launcher.home / "runs.sqlite")
    store.create(RunRecord(id=run_id, config_path=str(job), run_dir=str(run_dir), target="local"))
    record = store.update(run_id, status="done", step=STEPS, total_steps=STEPS, exit_code=0, elapsed_s=1800.0,
                          usd_per_hour=USD_PER_HOUR, model=str(TINY_MODEL))
    store.close()
    return launcher, record


@pytest.fixture(scope="module")
def merged(deploy) -> Path:
    """`launch merge RUN --dtype fp32` as a user types it (a unique prefix of the id)."""
    launcher, record = deploy
    proc = launcher.run("merge", record.id[:20], "--dtype", "fp32", timeout=120)
    assert proc.returncode == 0, output_of(proc)[-3000:]
    out = Path(record.run_dir) / "merged"
    assert proc.stdout.strip().startswith("merged model (fp32") and str(out) in proc.stdout
    return out


def test_the_merged_model_computes_what_base_plus_adapter_computes(deploy, merged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, record = deploy
    adapter = Path(record.run_dir) / "adapter"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).is_file(), name
    assert not (merged / "adapter_config.json").exists()  # a plain model: no peft to load it
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer(["### Instruction:\nWhere is the home of a sheep?\n\n### Response:\n"], return_tensors="pt")
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    base_weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()  # merges change weights in place
    with_adapter = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        merged_logits = plain(**ids).logits
        adapter_logits = with_adapter(**ids).logits
    # fp32 on the CPU: W + BA once, against x·W + (x·A)·B: float sums in another order.
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4, rtol=0), \
        (merged_logits - adapter_logits).abs().max()
    # Not a no-op: the adapter moved the weights and the outputs.
    delta = (plain.model.layers[0].self_attn.q_proj.weight - base_weight).abs().max().item()
    assert delta > 1e-3, delta
    with torch.no_grad(), with_adapter.disable_adapter():
        base_logits = with_adapter(**ids).logits
    assert (merged_logits - base_logits).abs().max().item() > 0.1


def test_merge_refuses_a_non_empty_out_and_a_run_without_adapter(deploy, merged, tmp_path):
    launcher, record = deploy
    again = launcher.run("merge", record.id, timeout=60)
    assert again.returncode == 2 and "exists and is not empty; pass --force" in again.stderr
    assert again.stderr.count("\n") == 1  # one line, before anything is loaded
    store = RunStore(launcher.home / "runs.sqlite")
    empty = launcher.runs_dir / "20261202-111111-no-adapter-0000"
    empty.mkdir()
    (empty / "job.local.yaml").write_text((Path(record.run_dir) / "job.local.yaml").read_text())
    store.create(RunRecord(id=empty.name, config_path="/c.yaml", run_dir=str(empty), target="local", status="done"))
    store.close()
    for command in (["merge", empty.name], ["chat", empty.name, "--prompt", "hi"], ["push", empty.name, "--repo", "a/b"]):
        proc = launcher.run(*command, timeout=60)
        assert proc.returncode == 2, output_of(proc)
        assert f"no adapter in {empty / 'adapter'}" in proc.stderr and f"`launch pull {empty.name}`" in proc.stderr


def test_chat_answers_one_prompt_on_stdout(deploy):
    launcher, record = deploy
    proc = launcher.run("chat", record.id, "--prompt", "Where is the home of a sheep?", "--max-new-tokens", "12",
                        timeout=120)
    assert proc.returncode == 0, output_of(proc)[-3000:]
    answer = proc.stdout.strip()
    assert answer and "loading" not in proc.stdout and "Instruction" not in answer
    assert "prompt format: instruction template" in proc.stderr


@pytest.fixture
def hub():
    server = FakeHub(TOKEN, models={"meta-llama/Llama-3.1-8B": {"license": "llama3.1"}}).start()
    yield server
    server.stop()


def _hub_env(hub: FakeHub, home: Path, token: str = TOKEN) -> dict[str, str]:
    # HF_HOME apart: no token file of this machine is read; Xet off: the fake serves the LFS path.
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token, "HF_HOME": str(home / "hf"),
            "HF_HUB_OFFLINE": "0"}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_uploads_the_adapter_with_a_model_card_and_never_shows_the_token(deploy, hub, tmp_path):
    launcher, record = deploy
    proc = launcher.run("push", record.id, "--repo", "someone/tiny-animals", "--private", timeout=60,
                        **_hub_env(hub, tmp_path))
    assert proc.returncode == 0, output_of(proc)[-3000:]
    assert f"{hub.url}/someone/tiny-animals" in proc.stdout
    # The client's own request sequence, against the fake's recorded requests.
    # upload_folder validates the card twice: listing the folder, then in create_commit.
    routes = hub.routes()
    assert routes[:4] == ["POST /api/repos/create", "POST /api/validate-yaml", "POST /api/validate-yaml",
                          "POST /api/models/someone/tiny-animals/preupload/main"]
    assert routes[4] == "POST /someone/tiny-animals.git/info/lfs/objects/batch"
    assert routes[5].startswith("PUT /lfs-upload/") and routes[6:] == [
        "POST /lfs-verify", "POST /api/models/someone/tiny-animals/commit/main"]
    create = json.loads(next(r.body for r in hub.requests if r.path == "/api/repos/create"))
    assert create == {"name": "tiny-animals", "organization": "someone", "visibility": "private", "type": "model"}
    repo = hub.repos["someone/tiny-animals"]
    assert set(repo.files) == {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
                               "tokenizer_config.json"}
    adapter = Path(record.run_dir) / "adapter"
    assert repo.files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    card = repo.files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local base is no Hub id
    assert "license" not in meta and "unknown — check the base model's license" in card  # never a guess
    evaluation = json.loads((Path(record.run_dir) / "eval.json").read_text())
    assert f"| base model | {evaluation['base_test_loss']:.4f} | {evaluation['base_test_perplexity']:.4f} |" in card
    assert f"| fine-tuned | {evaluation['test_loss']:.4f} | {evaluation['test_perplexity']:.4f} |" in card
    assert f"| steps | {STEPS} |" in card and "| GPU | none (CPU) |" in card
    assert "| hours | 0.500 |" in card and f"| cost | ${USD_PER_HOUR * 0.5:.2f} |" in card
    assert "| r | 16 |" in card and "| examples | 384 (train 308, validation 38, test 38) |" in card
    assert (adapter / "README.md").read_text().startswith("---\nbase_model:")  # the run's own folder untouched
    assert not (Path(record.run_dir) / ".push-staging").exists()
    # The token went to the Hub in the Authorization header, and nowhere else.
    api_requests = [r for r in hub.requests if r.path.startswith(("/api/repos", "/api/models", "/someone"))]
    assert api_requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_requests)
    assert TOKEN not in proc.stdout + proc.stderr
    for folder in (Path(record.run_dir), launcher.home):
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_push_merged_sends_the_merged_folder(deploy, merged, hub, tmp_path):
    launcher, record = deploy
    proc = launcher.run("push", record.id, "--repo", "someone/tiny-merged", "--merged", timeout=60,
                        **_hub_env(hub, tmp_path))
    assert proc.returncode == 0, output_of(proc)[-3000:]
    repo = hub.repos["someone/tiny-merged"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(repo.files)
    assert repo.files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    meta = _front_matter(repo.files["README.md"].decode())
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]


def test_push_without_a_token_says_how_and_sends_nothing(deploy, hub, tmp_path):
    launcher, record = deploy
    proc = launcher.run("push", record.id, "--repo", "someone/x", timeout=60, **_hub_env(hub, tmp_path, token=""))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: no Hugging Face token: run `hf auth login` (a token with write access), "
                                   "or set HF_TOKEN; then push again")
    assert hub.routes() == []


def test_the_license_of_a_hub_base_comes_from_its_model_info(hub, deploy):
    import dataclasses

    from huggingface_hub import HfApi

    from launcher.deploy import run_model
    from launcher.model_card import LICENSE_UNKNOWN, base_license

    _, record = deploy
    model = run_model(record)
    api = HfApi(endpoint=hub.url, token=False)
    assert base_license(dataclasses.replace(model, base="meta-llama/Llama-3.1-8B", base_is_local=False), api) \
        == "llama3.1"
    assert base_license(dataclasses.replace(model, base="nobody/nothing", base_is_local=False), api) == LICENSE_UNKNOWN


def test_merge_remote_on_the_runs_machine_over_ssh(tmp_path, sshd):
    """A run on the test sshd: merged there with the run's python, in its folder, fetched back; the
    same weights as a merge of the same adapter here."""
    launcher = Launcher(tmp_path)
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8, "save_every": 100, "eval_every": 100},
                   eval={"samples": 0}, resources={"workdir": str(tmp_path / "remote")})
    proc = launcher.run("--config", str(job), *ssh_args(sshd), "--yes")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    (record,) = launcher.records()
    started = time.monotonic()
    merged = launcher.run("merge", record.id, "--remote", "--dtype", "fp32", "--json", timeout=180)
    assert merged.returncode == 0, output_of(merged)[-3000:]
    result = json.loads(merged.stdout)
    remote = Path(record.remote_dir) / "merged"
    assert result["remote_out"] == str(remote) and (remote / "model.safetensors").is_file()
    assert (remote.parent / "merge_adapter.py").is_file()  # the tool went into the run's folder there
    local = Path(record.run_dir) / "merged"
    assert result["out"] == str(local)
    assert (local / "model.safetensors").read_bytes() == (remote / "model.safetensors").read_bytes()
    here = tmp_path / "merged-here"
    again = launcher.run("merge", record.id, "--dtype", "fp32", "--out", str(here), timeout=120)
    assert again.returncode == 0, output_of(again)[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(local / "model.safetensors"), load_file(here / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    print(f"remote merge + fetch + local merge: {time.monotonic() - started:.1f} s", file=sys.stderr)
