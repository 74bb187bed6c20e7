"""Merge a LoRA adapter into its base model, unquantized, and save a standard model folder.

    python merge_adapter.py --base B --adapter A --out O [--dtype bf16|fp16|fp32] [--revision R]
                            [--device auto|cpu|cuda] [--force]

B is a hub id or a local model folder, A the adapter folder the runner wrote (runs/<id>/adapter).
O gets safetensors weights, config.json, generation_config.json and the tokenizer: a model that
loads with AutoModelForCausalLM.from_pretrained(O) alone, no peft needed.

The base is loaded in the chosen dtype, never in 4 bits: peft's Linear4bit.merge re-quantizes
base + delta to 4 bits and rounds most of a LoRA delta away (peft #2586). A base checkpoint that
is itself quantized is refused for the same reason.

One file, stdlib-only at import (heavy imports inside functions): the launcher imports it for
`launch merge` and copies it into the run's folder on the target for `launch merge --remote`.
Progress goes to stderr; the last stdout line is `QLORA_MERGE {json}` for the launcher. Errors
are one line `merge_adapter: error: ...` on stderr with the runner's exit codes."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

# The runner's exit codes (runner/qlora_runner.py), so both tools mean the same by each.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MODEL = 5
EXIT_ENVIRONMENT = 7

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_DTYPE = "bf16"  # what most bases ship in: half of fp32's size, none of fp16's overflow
RESULT_PREFIX = "QLORA_MERGE "
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PACKAGES = ("torch", "transformers", "peft", "safetensors")


class MergeError(Exception):
    """A merge that cannot be done; the message says which input and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checks that need no torch
# ---------------------------------------------------------------------------------------------


def check_out(out: Path, force: bool) -> None:
    """A non-empty --out is someone's files: refused unless --force."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MergeError(f"--out {out} exists and is not empty; pass --force to replace it, or name another folder")


def check_adapter(adapter: Path) -> None:
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise MergeError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; name the folder the runner wrote "
                         "(runs/<run-id>/adapter)")


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------


def choose_device(requested: str, dtype: str, log: Callable[[str], None] = _stderr) -> str:
    """auto: the GPU when there is one that computes in `dtype` (bf16 needs Ampere or newer),
    else the CPU; a merge is one addition per layer, so the CPU is slow only to load."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise MergeError("--device cuda: no CUDA GPU is visible; use --device auto or cpu", EXIT_ENVIRONMENT)
    if requested == "cpu" or not has_cuda:
        check_cpu_dtype(dtype)
        return "cpu"
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        if requested == "cuda":
            raise MergeError("--dtype bf16: this GPU has no bfloat16 (pre-Ampere); use --dtype fp16 or fp32",
                             EXIT_ENVIRONMENT)
        log("this GPU has no bfloat16: merging on the CPU")
        check_cpu_dtype(dtype)
        return "cpu"
    return "cuda"


def check_cpu_dtype(dtype: str) -> None:
    """Try the one operation a merge needs (a matmul and an add) in `dtype` on this CPU, rather
    than guess from its feature flags: torch builds and CPUs differ in what they can do."""
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype])
    try:
        a = torch.ones(4, 4, dtype=torch_dtype)
        (a @ a + a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise MergeError(f"--dtype {dtype}: torch cannot compute in {DTYPES[dtype]} on this CPU ({e}); "
                         "use --dtype fp32", EXIT_ENVIRONMENT) from None


# ---------------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------------


def load_unquantized(base: str, dtype: str, device: str, revision: Optional[str], trust_remote_code: bool) -> Any:
    """The base model in `dtype` on `device`; a base whose checkpoint is quantized is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=getattr(torch, DTYPES[dtype]), revision=revision, trust_remote_code=trust_remote_code,
            device_map={"": 0 if device == "cuda" else "cpu"})
    except Exception as e:  # OSError, ValueError, HTTP errors: all "cannot load this model"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        raise MergeError(f"--base {base}: cannot load the model ({type(e).__name__}: {first}); a local folder needs "
                         "config.json and weights, a hub id must exist (check the revision and HF_TOKEN)",
                         EXIT_MODEL) from None
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise MergeError(f"--base {base} is a quantized checkpoint: a merge into quantized weights rounds the "
                         "adapter away (peft #2586); name the unquantized base model", EXIT_MODEL)
    return model


def merge(base: str, adapter: Path, out: Path, dtype: str = DEFAULT_DTYPE, revision: Optional[str] = None,
          device: str = "auto", force: bool = False, trust_remote_code: bool = False,
          log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Load `base` unquantized, apply `adapter`, merge_and_unload, save the result with the
    tokenizer into `out` (written beside it, then renamed into place). Returns what was done."""
    check_out(out, force)
    check_adapter(adapter)
    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    missing = missing_packages()
    if missing:
        raise MergeError(f"cannot import {', '.join(missing)}; pip install 'qlora-launch[deploy]'", EXIT_ENVIRONMENT)
    started = time.time()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's business
    from peft import PeftModel
    from transformers import AutoTokenizer

    device = choose_device(device, dtype, log)
    log(f"loading {base} in {DTYPES[dtype]} on the {device.upper() if device == 'cuda' else 'CPU'} (unquantized)")
    model = load_unquantized(base, dtype, device, revision, trust_remote_code)
    log(f"applying the adapter {adapter}")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    # The tokenizer the run trained with is saved beside the adapter; older adapters lack it.
    tokenizer_source = str(adapter) if any((adapter / f).is_file() for f in TOKENIZER_FILES) else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, revision=None if tokenizer_source == str(adapter)
                                              else revision, trust_remote_code=trust_remote_code)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"saving to {out}")
    merged.save_pretrained(tmp)  # safetensors, sharded as transformers shards
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)  # check_out let it through: empty, or --force
    tmp.rename(out)
    return {"out": str(out), "dtype": dtype, "device": device, "base": base, "revision": revision,
            "parameters": sum(p.numel() for p in merged.parameters()),
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "seconds": round(time.time() - started, 1)}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="merge_adapter.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model: a hub id or a local folder")
    parser.add_argument("--adapter", required=True, type=Path, help="the LoRA adapter folder")
    parser.add_argument("--out", required=True, type=Path, help="the merged model's folder")
    parser.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE, help="of the saved weights")
    parser.add_argument("--revision", default=None, help="the base's hub revision")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = merge(args.base, args.adapter, args.out, args.dtype, args.revision, args.device, args.force,
                       args.trust_remote_code)
    except MergeError as e:
        _stderr(f"merge_adapter: error: {e}")
        return e.exit_code
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
