"""The model card pushed with a run's adapter or merged model: README.md with the Hub's YAML
front matter, and what a reader needs to trust and reuse it — base and revision, data, LoRA and
training settings, test loss before and after, steps, GPU, hours and $ of the run.

Facts come from the run's own files (job.local.yaml, eval.json, runner.log) and its record; a
fact that is not known is left out, never guessed. The license is the base's: read from a local
base folder's README front matter, else from the Hub's model info, else "unknown" — an adapter or
a merge is a derivative of the base, so no other license can be claimed for it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher.deploy import RunModel
from launcher.paths import runner_module

LICENSE_UNKNOWN = "unknown — check the base model's license"
# "data: 384 examples -> train 308 sequences (...), validation 38, test 38" (the runner's log line)
DATA_LINE = re.compile(r"data: (\d+) examples -> train (\d+) sequences .*validation (\d+), test (\d+)")


@dataclass(frozen=True)
class RunFacts:
    """What the card states about the run; None where it is not known."""

    run_id: str
    steps: Optional[int] = None
    gpu: Optional[str] = None
    hours: Optional[float] = None
    usd: Optional[float] = None
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json
    examples: dict[str, int] = field(default_factory=dict)  # total, train, validation, test


def run_facts(model: RunModel, steps: Optional[int], gpu: Optional[str], seconds: float, usd: float) -> RunFacts:
    evaluation = _read_json(model.run_dir / "eval.json")
    return RunFacts(run_id=model.run_id, steps=evaluation.get("train_steps") or steps, gpu=gpu,
                    hours=seconds / 3600 if seconds else None, usd=usd, evaluation=evaluation,
                    examples=example_counts(model.run_dir / "runner.log"))


def example_counts(log: Path) -> dict[str, int]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    found = DATA_LINE.findall(text)
    if not found:
        return {}
    total, train, validation, test = map(int, found[-1])  # a resumed run logs it again: the last
    return {"total": total, "train": train, "validation": validation, "test": test}


def local_license(folder: Path) -> Optional[str]:
    """`license:` of a model folder's README.md front matter (the Hub's card format)."""
    try:
        text = (folder / "README.md").read_text(errors="replace")
    except OSError:
        return None
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def base_license(model: RunModel, hub: Optional[Any]) -> str:
    """The base's license, or LICENSE_UNKNOWN. `hub`: a huggingface_hub HfApi, asked only for a
    hub id (a network failure or a card without one is "unknown", not an error)."""
    if model.base_is_local:
        return local_license(Path(model.base)) or LICENSE_UNKNOWN
    if hub is None:
        return LICENSE_UNKNOWN
    try:
        info = hub.model_info(model.base, revision=model.revision, expand=["cardData"], timeout=15)
    except Exception:  # noqa: BLE001  (offline, gated, renamed: the card says unknown)
        return LICENSE_UNKNOWN
    card = getattr(info, "card_data", None)
    value = card.get("license") if card is not None else None
    return str(value) if value else LICENSE_UNKNOWN


def render(model: RunModel, facts: RunFacts, license_id: str, merged: bool, repo: str,
           dtype: Optional[str] = None) -> str:
    """README.md for the repo: front matter the Hub validates, then the facts as tables."""
    job = model.job
    meta: dict[str, Any] = {}
    if not model.base_is_local:
        meta["base_model"] = model.base  # the Hub links it; a local path would fail its validation
    if license_id != LICENSE_UNKNOWN:
        meta["license"] = license_id
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["qlora", "lora", "qlora-launch", "merged" if merged else "peft"]
    base_name = model.base if not model.base_is_local else f"{Path(model.base).name} (a local folder)"
    what = (f"the LoRA adapter merged into {base_name}" + (f", saved in {dtype}" if dtype else "")
            if merged else f"a LoRA adapter for {base_name}")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {model.run_id}", "", f"{what[0].upper()}{what[1:]}, fine-tuned with QLoRA "
             f"(4-bit {job.model.quantization} base) by qlora-launch, run `{model.run_id}`.", ""]
    lines += _table("Base model", [
        ("base model", f"`{model.base}`" if not model.base_is_local else base_name),
        ("revision", job.model.revision or (None if model.base_is_local else "not pinned (the default branch then)")),
        ("license", license_id + ("" if license_id == LICENSE_UNKNOWN else " (the base model's)")),
    ])
    counts = facts.examples
    lines += _table("Data", [
        ("path", f"`{Path(job.data.path).name if _is_path(job.data.path) else job.data.path}`"),
        ("format", job.data.format),
        ("examples", f"{counts['total']} (train {counts['train']}, validation {counts['validation']}, "
                     f"test {counts['test']})" if counts else None),
        ("max length", f"{job.data.max_length} tokens"),
    ])
    targets = job.lora.target_modules
    lines += _table("LoRA", [
        ("r", job.lora.r), ("alpha", f"{job.lora.alpha:g}"), ("dropout", f"{job.lora.dropout:g}"),
        ("target modules", targets if isinstance(targets, str) else ", ".join(targets)),
    ])
    train = job.train
    lines += _table("Training", [
        ("epochs", f"{train.epochs:g}" if train.max_steps is None else None),
        ("max steps", train.max_steps), ("learning rate", f"{train.lr:g} ({train.scheduler})"),
        ("batch", f"{train.micro_batch_size} x {train.grad_accum} gradient accumulation"),
        ("seed", train.seed), ("steps", facts.steps), ("GPU", facts.gpu or "none (CPU)"),
        ("hours", f"{facts.hours:.3f}" if facts.hours is not None else None),
        ("cost", f"${facts.usd:.2f}" if facts.usd is not None else None),
    ])
    ev = facts.evaluation
    if ev.get("test_loss") is not None:
        lines += ["## Test split", "", "| | loss | perplexity |", "|---|---|---|",
                  f"| base model | {_num(ev.get('base_test_loss'))} | {_num(ev.get('base_test_perplexity'))} |",
                  f"| fine-tuned | {_num(ev.get('test_loss'))} | {_num(ev.get('test_perplexity'))} |", "",
                  f"Over {ev.get('test_examples', '?')} held-out examples (answer tokens only).", ""]
    lines += _usage(model, merged, repo)
    return "\n".join(lines).rstrip() + "\n"


def _usage(model: RunModel, merged: bool, repo: str) -> list[str]:
    if merged:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    else:
        base = model.base if not model.base_is_local else "PATH/TO/BASE"
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    data = model.job.data
    prompt = ("the tokenizer's chat template (or `### User:` / `### Assistant:` headers without one)"
              if data.format == "chat" else "plain text to continue" if data.format == "completion"
              else "\n\n```\n" + (data.prompt_template or runner_module().DEFAULT_PROMPT_NO_INPUT) + "```")
    return ["## Use", "", "```python", *code, "```", "", f"The prompt format it was trained on: {prompt}", ""]


def _table(title: str, rows: list[tuple[str, Any]]) -> list[str]:
    kept = [(name, value) for name, value in rows if value is not None]
    return [f"## {title}", "", "| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in kept), ""]


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _is_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or Path(value).suffix != ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
