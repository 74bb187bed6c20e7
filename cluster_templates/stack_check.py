"""Prove the training stack works on this machine before any model is downloaded.

A bitsandbytes NF4 layer is quantized onto the device and its forward pass is compared with a
plain matmul of its dequantized weights: "CUDA setup failed" and friends show up here, in
seconds, not after a 15 GB download. Prints `QLORA_BOOTSTRAP {json}` with the versions."""

import argparse
import json
import platform
import sys

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    args = parser.parse_args()
    report = {"python": sys.executable, "python_version": platform.python_version(), "versions": {}}
    missing = []
    for name in PACKAGES:
        try:
            module = __import__(name)
            report["versions"][name] = getattr(module, "__version__", "?")
        except Exception as e:  # noqa: BLE001  (an import that crashes is as missing as one that is absent)
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    if missing:
        print(f"stack check: cannot import {', '.join(missing)}; pip install -r requirements.txt", file=sys.stderr)
        return 1
    import torch
    import bitsandbytes as bnb

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            print(f"stack check: torch {torch.__version__} sees no CUDA device (built for CUDA "
                  f"{torch.version.cuda}); the driver may be older than this torch needs", file=sys.stderr)
            return 1
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["cuda"] = torch.version.cuda
        report["bf16"] = torch.cuda.get_device_capability(0)[0] >= 8  # native (a T4 only emulates it)
    compute_dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
    layer = layer.to(device)  # quantizes the weights on the device
    x = torch.randn(8, 64, dtype=compute_dtype, device=device)
    with torch.no_grad():
        got = layer(x)
        weights = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(compute_dtype)
        expected = x @ weights.t()
    error = (got.float() - expected.float()).abs().max().item()
    if not error < 0.05:
        print(f"stack check: a 4-bit matmul on {device} is wrong (max error {error:.3g})", file=sys.stderr)
        return 1
    report["device"] = device
    report["matmul_4bit_max_error"] = error
    print("QLORA_BOOTSTRAP " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
