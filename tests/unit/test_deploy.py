"""The deploy commands' pure parts: the prompt format chat uses (the run's training format), the
model card's facts and license, the merge tool's checks, and `launch merge|push|chat --help`
importing nothing heavy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launcher.deploy import RunModel
from launcher.model_card import LICENSE_UNKNOWN, RunFacts, base_license, example_counts, local_license, render
from tests.helpers import ROOT, TINY_CONFIG, load_runner_module

qr = load_runner_module()


def job(**data) -> object:
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["data"].update(data)
    return qr.from_dict(qr.JobConfig, raw)


class Tokenizer(SimpleNamespace):
    """What build_prompt asks of a tokenizer: a chat template, or none."""

    chat_template = None

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


# -- the prompt format chat uses -------------------------------------------------------------------


def test_an_instruction_run_is_asked_in_its_training_template_even_with_a_chat_template():
    from launcher.chat import build_prompt

    prompt = build_prompt(job(), Tokenizer(chat_template="{{ x }}"), "Where is the home of a sheep?", [])
    assert prompt.text == "### Instruction:\nWhere is the home of a sheep?\n\n### Response:\n"
    assert prompt.kind == "instruction template"
    # The same text training saw: the runner's format_records of the same instruction.
    (trained,) = qr.format_records([{"instruction": "Where is the home of a sheep?", "output": "x"}], job().data,
                                   None, "k")
    assert "".join(s.text for s in trained.prompt) == prompt.text


def test_a_custom_prompt_template_is_used():
    from launcher.chat import build_prompt

    prompt = build_prompt(job(prompt_template="Q: {instruction}\nA:"), Tokenizer(), "Hi?", [])
    assert prompt.text == "Q: Hi?\nA:" and "prompt_template" in prompt.kind


def test_a_chat_run_uses_the_tokenizers_chat_template_with_the_history():
    from launcher.chat import build_prompt

    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    prompt = build_prompt(job(format="chat"), Tokenizer(chat_template="{{ x }}"), "c", history)
    assert prompt.text == "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>"
    assert prompt.kind == "chat template"


def test_a_chat_run_without_a_template_uses_the_runners_headers():
    from launcher.chat import build_prompt

    prompt = build_prompt(job(format="chat"), Tokenizer(), "Hello", [])
    assert prompt.text == "### User:\nHello\n\n### Assistant:\n"
    assert "headers" in prompt.kind


def test_a_completion_run_continues_the_text():
    from launcher.chat import build_prompt

    prompt = build_prompt(job(format="completion"), Tokenizer(chat_template="t"), "The cat", [])
    assert prompt.text == "The cat" and prompt.kind.startswith("completion")


# -- the model card ----------------------------------------------------------------------------------


def run_model(tmp_path: Path, base: str, local: bool) -> RunModel:
    return RunModel(run_id="r1", run_dir=tmp_path, base=base, base_is_local=local, revision=None,
                    trust_remote_code=False, adapter=tmp_path / "adapter", job=job())


def test_the_card_states_the_runs_facts_and_hub_front_matter(tmp_path):
    facts = RunFacts(run_id="r1", steps=120, gpu="NVIDIA A10G", hours=1.5, usd=1.51,
                     evaluation={"test_loss": 0.18, "test_perplexity": 1.2, "base_test_loss": 2.155,
                                 "base_test_perplexity": 8.62, "test_examples": 38},
                     examples={"total": 384, "train": 308, "validation": 38, "test": 38})
    card = render(run_model(tmp_path, "mistralai/Mistral-7B-v0.3", False), facts, "apache-2.0", False, "me/x")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"base_model": "mistralai/Mistral-7B-v0.3", "license": "apache-2.0", "library_name": "peft",
                    "pipeline_tag": "text-generation", "tags": ["qlora", "lora", "qlora-launch", "peft"]}
    for row in ("| base model | 2.1550 | 8.6200 |", "| fine-tuned | 0.1800 | 1.2000 |", "| steps | 120 |",
                "| GPU | NVIDIA A10G |", "| hours | 1.500 |", "| cost | $1.51 |", "| r | 16 |", "| alpha | 32 |",
                "| dropout | 0.05 |", "| target modules | all-linear |", "| epochs | 6 |", "| seed | 42 |",
                "| learning rate | 0.003 (cosine) |", "| batch | 16 x 1 gradient accumulation |",
                "| max length | 64 tokens |", "| examples | 384 (train 308, validation 38, test 38) |",
                "| format | instruction |", 'PeftModel.from_pretrained(base, "me/x")'):
        assert row in card, row


def test_unknown_facts_are_left_out_and_an_unknown_license_is_said_not_guessed(tmp_path):
    card = render(run_model(tmp_path, str(tmp_path), True), RunFacts(run_id="r1"), LICENSE_UNKNOWN, True, "me/x",
                  dtype="bfloat16")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "license" not in meta and "base_model" not in meta and meta["library_name"] == "transformers"
    assert f"| license | {LICENSE_UNKNOWN} |" in card and "saved in bfloat16" in card
    assert "| hours |" not in card and "| cost |" not in card and "## Test split" not in card


def test_the_license_of_a_local_base_is_its_readmes_and_a_hub_failure_is_unknown(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    assert local_license(base) is None
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a model\n")
    assert base_license(run_model(tmp_path, str(base), True), None) == "mit"

    class Down:
        def model_info(self, *args, **kwargs):
            raise ConnectionError("no network")

    class Up:
        def model_info(self, repo_id, revision, expand, timeout):
            assert expand == ["cardData"]
            return SimpleNamespace(card_data={"license": "llama3.1"})

    hub_model = run_model(tmp_path, "meta-llama/Llama-3.1-8B", False)
    assert base_license(hub_model, Down()) == LICENSE_UNKNOWN
    assert base_license(hub_model, None) == LICENSE_UNKNOWN
    assert base_license(hub_model, Up()) == "llama3.1"


def test_example_counts_come_from_the_runners_log_line(tmp_path):
    log = tmp_path / "runner.log"
    log.write_text("[10:03:41] data: 384 examples -> train 308 sequences (15302 tokens, 2117 trained), "
                   "validation 38, test 38\n")
    assert example_counts(log) == {"total": 384, "train": 308, "validation": 38, "test": 38}
    assert example_counts(tmp_path / "none.log") == {}


# -- the merge tool and the workspace --------------------------------------------------------------------


def test_the_merge_tool_shares_the_runners_exit_codes_and_refuses_a_non_empty_out(tmp_path):
    import runner.merge_adapter as tool

    assert (tool.EXIT_USAGE, tool.EXIT_MODEL, tool.EXIT_ENVIRONMENT) == (qr.EXIT_USAGE, qr.EXIT_MODEL,
                                                                         qr.EXIT_ENVIRONMENT)
    (tmp_path / "out").mkdir()
    tool.check_out(tmp_path / "out", force=False)  # empty: fine
    (tmp_path / "out" / "x").write_text("mine")
    with pytest.raises(tool.MergeError, match="exists and is not empty; pass --force"):
        tool.check_out(tmp_path / "out", force=False)
    tool.check_out(tmp_path / "out", force=True)
    with pytest.raises(tool.MergeError, match="no adapter_config.json there"):
        tool.check_adapter(tmp_path)


def test_a_dtype_this_cpu_cannot_compute_in_is_one_line_with_the_fix(monkeypatch):
    import torch

    import runner.merge_adapter as tool

    tool.check_cpu_dtype("bf16")  # torch's CPU build computes in bfloat16 here

    def refuse(*args, **kwargs):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')

    monkeypatch.setattr(torch, "ones", refuse)
    with pytest.raises(tool.MergeError, match=r"--dtype bf16: torch cannot compute in bfloat16 on this CPU .*use "
                                               r"--dtype fp32") as raised:
        tool.check_cpu_dtype("bf16")
    assert raised.value.exit_code == tool.EXIT_ENVIRONMENT


def test_a_workspace_without_a_shell_refuses_to_run_tools():
    from launcher.errors import UsageError
    from launcher.workspace import Workspace

    with pytest.raises(UsageError, match="not supported on this target .*without --remote"):
        Workspace.run_tool(SimpleNamespace(), Path("merge_adapter.py"), [], "python")


# -- light --help --------------------------------------------------------------------------------------------


def test_the_deploy_commands_help_imports_nothing_heavy():
    code = ("import sys\nfrom launcher import cli\nfor c in (['merge', '--help'], ['push', '--help'], "
            "['chat', '--help'], ['--help']):\n    try:\n        cli.main(c)\n    except SystemExit:\n        pass\n"
            "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'peft', 'huggingface_hub', "
            "'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "usage: launch merge" in out and "--remote" in out and "usage: launch push" in out
    assert "merge RUN | push RUN --repo user/name | chat RUN" in " ".join(out.split())  # the epilog
    assert out.strip().splitlines()[-1] == "HEAVY="
