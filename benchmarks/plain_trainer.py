#!/usr/bin/env python3
"""The QLoRA fine-tune a user writes by hand from the libraries' docs: (a) of benchmarks/runner_speed.py,
and with --unsloth the same fine-tune through Unsloth's FastLanguageModel: (d).

    python benchmarks/plain_trainer.py JOB.yaml OUT_DIR [--unsloth]

transformers' quantization guide (BitsAndBytesConfig, NF4, double quantization, bf16 compute),
peft's prepare_model_for_kbit_training + LoraConfig + get_peft_model, and a Trainer with
DataCollatorForSeq2Seq padding each micro batch to its longest example. It reads the same job
file as our runner (model folder, data file, max_length, LoRA, batch, lr, steps, gradient
checkpointing, optimizer) so both train the same job, and writes OUT_DIR/speed.json: the
non-padding tokens/s of each step (transformers' own count) and torch's peak memory. Unsloth
(its README's API: FastLanguageModel.from_pretrained with load_in_4bit, get_peft_model with
use_gradient_checkpointing="unsloth") must be imported before transformers, so it is a mode of
this child process rather than another script. On a CPU (the benchmark's --smoke) the plain
path trains in fp32 with AdamW; Unsloth needs CUDA.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

if "--unsloth" in sys.argv:
    importlib.import_module("unsloth")  # first: it patches transformers as it is imported

import torch
import yaml
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear, by name


def examples(job: dict, tokenizer) -> Dataset:
    """Alpaca-style rows as prompt + answer, labels on the answer only, cut at max_length."""
    max_length = job["data"]["max_length"]
    rows = [json.loads(line) for line in Path(job["data"]["path"]).read_text().splitlines()]
    ids, labels = [], []
    for row in rows:
        prompt = f"### Instruction:\n{row['instruction']}\n\n### Response:\n"
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append((p + a)[:max_length])
        labels.append(([-100] * len(p) + a)[:max_length])
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "attention_mask": [[1] * len(i) for i in ids]})


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.last = (time.perf_counter(), 0)
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        self.steps.append({"step": state.global_step, "tokens_per_s": (tokens - self.last[1]) / (now - self.last[0])})
        self.last = (now, tokens)


def plain_model(job: dict, cuda: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir, lora = job["model"]["base"], job["lora"]
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map={"": 0} if cuda else None, dtype=dtype,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job["train"]["gradient_checkpointing"])
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    return model, tokenizer


def unsloth_model(job: dict):
    from unsloth import FastLanguageModel

    lora = job["lora"]
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=job["model"]["base"], load_in_4bit=True,
                                                         max_seq_length=job["data"]["max_length"], dtype=None)
    targets = LINEAR if lora["target_modules"] == "all-linear" else lora["target_modules"]
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
        bias="none", use_gradient_checkpointing="unsloth" if job["train"]["gradient_checkpointing"] else False)
    return model, tokenizer


def main(job_file: str, out: str, with_unsloth: bool = False) -> int:
    job = yaml.safe_load(Path(job_file).read_text())
    train = job["train"]
    cuda = torch.cuda.is_available()
    model, tokenizer = unsloth_model(job) if with_unsloth else plain_model(job, cuda)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    timer = StepTimes()
    args = TrainingArguments(
        output_dir=str(Path(out) / "trainer"), per_device_train_batch_size=train["micro_batch_size"],
        gradient_accumulation_steps=train.get("grad_accum", 1), learning_rate=train["lr"], max_steps=train["max_steps"],
        bf16=cuda, use_cpu=not cuda, gradient_checkpointing=train["gradient_checkpointing"] and not with_unsloth,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        logging_steps=10, save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples(job, tokenizer), callbacks=[timer],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8))
    trainer.train()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "speed.json").write_text(json.dumps({
        "steps": timer.steps, "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], with_unsloth="--unsloth" in sys.argv[3:]))
