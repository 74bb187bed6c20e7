"""GPU facts: what each GPU a user can rent holds and computes, under every name the markets use.

The figures are dense (no 2:4 sparsity) tensor TFLOP/s for the precision QLoRA trains in (bf16
where the GPU has it, else fp16), with FP32 accumulate (GeForce cards run that at half their
FP16-accumulate rate), and memory bandwidth in GB/s. They start from ../shared/gpus.csv (vendor
datasheets and architecture whitepapers, sourced per row); rows added here say where their
figures come from. `resolve("RTX 4090")`, `resolve("a100-80gb")`, `parse_request("A10G:2")`.

Markets name GPUs differently: SkyPilot's catalogs say A100 (the 40 GB SXM4), A100-80GB,
H100 (SXM), RTXA6000, RTX6000-Ada; Vast.ai says RTX_4090 or "RTX 4090"; nvidia-smi says
"NVIDIA GeForce RTX 4090". All of them normalise to one key here (lower case, without the vendor
words and the separators), and each GPU lists the keys it answers to."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional


class UnknownGPU(ValueError):
    """A GPU name we do not know; the message lists near matches."""


@dataclass(frozen=True)
class GPU:
    name: str
    vram_gb: float
    tflops_dense: float  # bf16 where supported, else fp16; tensor cores, FP32 accumulate, no sparsity
    mem_bandwidth_gbs: float
    bf16: bool
    compute_capability: Optional[str]  # None: not an NVIDIA GPU
    aliases: tuple[str, ...] = ()
    source: str = "../shared/gpus.csv"

    @property
    def cuda(self) -> bool:
        """Can the runner (CUDA torch + bitsandbytes) train on it?"""
        return self.compute_capability is not None and float(self.compute_capability) >= 6.0


# name, VRAM GB, dense TFLOP/s, GB/s, bf16, compute capability, aliases[, source]
GPUS: tuple[GPU, ...] = (
    GPU("T4", 16, 65, 320, False, "7.5", ("Tesla T4", "T4g")),
    GPU("P100", 16, 18.7, 732, False, "6.0", ("Tesla P100", "P100-PCIE-16GB")),
    GPU("V100-16GB", 16, 125, 900, False, "7.0", ("V100", "Tesla V100", "V100-SXM2-16GB", "V100-PCIE-16GB")),
    GPU("V100-32GB", 32, 125, 900, False, "7.0", ("V100-SXM2-32GB", "V100-PCIE-32GB")),
    GPU("A10", 24, 125, 600, True, "8.6", ()),
    GPU("A10G", 24, 70, 600, True, "8.6", ("AWS g5",),
        "NVIDIA publishes no A10G datasheet. Derived like gpus.csv's GeForce rows: 80 SMs x 1.71 GHz x 512 "
        "FLOP/clk/SM (FP32 accumulate, dense) = 70; 24 GB GDDR6 600 GB/s per the AWS G5 page"),
    GPU("L4", 24, 121, 300, True, "8.9", ()),
    GPU("L40", 48, 181.05, 864, True, "8.9", ()),
    GPU("L40S", 48, 362.05, 864, True, "8.9", ()),
    GPU("RTX3060", 12, 25.5, 360, True, "8.6", ("RTX 3060 12GB",)),
    GPU("RTX3070", 8, 40.6, 448, True, "8.6", (),
        "Derived like gpus.csv's RTX3060: 46 SMs x 1.725 GHz x 512 FLOP/clk/SM (FP32 accumulate, dense); "
        "8 GB GDDR6 448 GB/s per NVIDIA's RTX 3070 spec page"),
    GPU("RTX3080", 10, 59.5, 760, True, "8.6", (),
        "NVIDIA Ampere GA102 whitepaper: RTX 3080 FP16/BF16 tensor with FP32 accumulate 59.5 dense; 10 GB 760 GB/s"),
    GPU("RTX3090", 24, 71, 936, True, "8.6", ()),
    GPU("RTX4060", 8, 30.2, 272, True, "8.9", (),
        "Derived: 24 SMs x 2.46 GHz x 512 (FP32 accumulate, dense); 8 GB 272 GB/s per NVIDIA's RTX 4060 spec page"),
    GPU("RTX4060Ti-16GB", 16, 44.1, 288, True, "8.9", ("RTX 4060 Ti 16GB", "RTX4060Ti")),
    GPU("RTX4070", 12, 58.3, 504, True, "8.9", ()),
    GPU("RTX4080", 16, 97.5, 716.8, True, "8.9", ()),
    GPU("RTX4090", 24, 165.2, 1008, True, "8.9", ("4090",)),
    GPU("RTX5090", 32, 209.5, 1792, True, "12.0", ("5090",)),
    GPU("RTX A2000", 12, 32.0, 288, True, "8.6", ("RTXA2000", "A2000"),
        "NVIDIA RTX A2000 12GB datasheet: tensor 63.9* TFLOPS (sparse) -> 32 dense; 288 GB/s"),
    GPU("RTX A4000", 16, 76.7, 448, True, "8.6", ("RTXA4000", "A4000")),
    GPU("RTX A5000", 24, 111.1, 768, True, "8.6", ("RTXA5000", "A5000")),
    GPU("RTX A6000", 48, 154.8, 768, True, "8.6", ("RTXA6000", "A6000")),
    GPU("RTX 6000 Ada", 48, 364.2, 960, True, "8.9", ("RTX 6000 Ada Generation", "RTX6000Ada", "RTX6000-Ada")),
    GPU("Quadro RTX 6000", 24, 130.5, 672, False, "7.5", ("RTX6000",),
        "NVIDIA Quadro RTX 6000 datasheet: tensor 130.5 TFLOPS (Turing: dense, no BF16); 24 GB 672 GB/s "
        "(Lambda's RTX6000)"),
    GPU("RTX PRO 6000", 96, 503.8, 1792, True, "12.0", ("RTXPRO6000S", "RTXPRO6000WS", "RTX PRO 6000 Blackwell"),
        "NVIDIA RTX PRO 6000 Blackwell datasheet: 4 PFLOPS FP4 sparse -> 503.8 BF16 dense (/8); 96 GB 1792 GB/s"),
    GPU("A30", 24, 165, 933, True, "8.0", (),
        "NVIDIA A30 datasheet: BF16/FP16 tensor 165 | 330* TFLOPS; 24 GB HBM2 933 GB/s"),
    GPU("A40", 48, 149.7, 696, True, "8.6", ()),
    GPU("A100-40GB", 40, 312, 1555, True, "8.0", ("A100", "A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB")),
    GPU("A100-80GB-PCIe", 80, 312, 1935, True, "8.0", ("A100-PCIE-80GB", "A100 80GB PCIe")),
    GPU("A100-80GB-SXM", 80, 312, 2039, True, "8.0",
        ("A100-80GB", "A100-SXM4-80GB", "A100 SXM4 80GB", "A100 80GB SXM", "A100 80GB", "A800")),
    GPU("H100 PCIe", 80, 756, 2000, True, "9.0", ("H100-PCIE-80GB", "H100 PCIe 80GB")),
    GPU("H100 SXM", 80, 989.5, 3350, True, "9.0",
        ("H100", "H100-SXM", "H100-SXM5-80GB", "H100 80GB HBM3", "H100-MEGA", "H100-NVLINK")),
    GPU("H100 NVL", 94, 835.5, 3900, True, "9.0", ("H100-NVL", "H100 NVL 94GB")),
    GPU("GH200", 96, 989.5, 4000, True, "9.0", ("GH200 480GB",),
        "NVIDIA GH200 datasheet: the H100's 989.5 dense BF16; 96 GB HBM3 4 TB/s (the 96 GB model Lambda rents)"),
    GPU("H200", 141, 989.5, 4800, True, "9.0", ("H200 SXM", "H200-SXM", "H200-SXM-141GB")),
    GPU("H200 NVL", 141, 835.5, 4800, True, "9.0", ("H200 NVL 141GB", "H200-NVL")),
    GPU("B200", 180, 2250, 8000, True, "10.0", ("HGX B200", "DGX B200")),
    GPU("MI300X", 192, 1307.4, 5300, True, None, ("AMD Instinct MI300X",)),
)

_VENDOR_WORDS = re.compile(r"\b(nvidia|geforce|tesla|amd|instinct)\b")


def normalize(name: str) -> str:
    """`NVIDIA GeForce RTX 4090` -> `rtx4090`; `A100-80GB` -> `a10080gb`."""
    text = _VENDOR_WORDS.sub(" ", name.lower().replace("_", " "))
    return re.sub(r"[\s\-_/.]+", "", text)


def _index() -> dict[str, GPU]:
    index: dict[str, GPU] = {}
    for gpu in GPUS:
        for key in (gpu.name, *gpu.aliases):
            normal = normalize(key)
            if normal in index and index[normal] is not gpu:
                raise AssertionError(f"GPU alias {key!r} names both {index[normal].name} and {gpu.name}")
            index[normal] = gpu
    return index


_BY_KEY = _index()


def resolve(name: str) -> GPU:
    """The GPU a market or a user calls `name`. Raises UnknownGPU naming the near matches."""
    key = normalize(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    if key.isdigit() and f"rtx{key}" in _BY_KEY:  # "4090"
        return _BY_KEY[f"rtx{key}"]
    near = difflib.get_close_matches(key, list(_BY_KEY), n=4, cutoff=0.6)
    names = list(dict.fromkeys(_BY_KEY[k].name for k in near))
    hint = f"; did you mean {', '.join(names)}?" if names else ""
    raise UnknownGPU(f"unknown GPU {name!r}{hint} (known: {', '.join(g.name for g in GPUS)})")


def parse_request(text: str) -> tuple[GPU, int]:
    """`A10G` -> (A10G, 1); `A10G:2` -> (A10G, 2); a bad count is a ValueError saying so."""
    name, _, count = text.partition(":")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"--gpu {text!r}: the count after ':' must be a whole number >= 1, as in A10G:2")
    return resolve(name.strip()), int(count or 1)
