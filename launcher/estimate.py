"""What a QLoRA job needs: peak VRAM, training FLOPs, hours on a GPU, and dollars.

Everything comes from the base model's config.json (a local folder, or the facts shipped in
launcher/model_facts.json for the ready configs' hub models, so planning works offline) and
the job config. The formulas, and where they come from:

Parameters (decoder-only transformer, as transformers builds Llama/Mistral/Qwen2):
  per layer  q,o: h*h each; k,v: h*kv_dim each (grouped-query attention, kv_dim = kv_heads *
             head_dim; Qwen2 adds q/k/v biases); MLP gate/up/down: 3*h*i; two RMSNorms: 2*h.
  embedding  V*h, and as much again for the LM head unless tie_word_embeddings.
  Checked against the published counts of the ready configs' models in tests/unit/test_estimate.py.

VRAM at the peak of a training step (bytes):
  4-bit weights  every decoder linear layer in NF4: 0.5 B/param, plus its quantization
                 constants: blocks of 64 with an fp32 absmax (0.5 bit/param), or with double
                 quantization 8-bit absmax + one fp32 per 256 blocks (0.127 bit/param; the QLoRA
                 paper, Dettmers et al. 2023, section 3).
  fp32 rest      embeddings, LM head and norms: peft's prepare_model_for_kbit_training casts every
                 non-4-bit parameter to fp32 (4 B/param).
  LoRA           r*(in+out) params per adapted linear layer; fp32 weights (4 B) + fp32 gradients
                 (4 B) + optimizer states: 8-bit AdamW 2 B, AdamW 8 B (bitsandbytes' 8-bit
                 optimizers keep two 1-byte states).
  activations    per token and layer, in the compute dtype (2 B), what autograd keeps for a
                 Llama block with SDPA attention (no s^2 score matrix): the two norms' inputs and
                 outputs (4h), q/k/v (h + 2kv), their rotated copies (h + kv), the attention
                 output (h), gate, up, act(gate), product (4i), and LoRA dropout's input copies
                 (6h + i) with their 1-byte masks. With gradient checkpointing only each layer's
                 input (h) stays, plus one layer's activations while it is recomputed.
                 (The accounting follows Korthikanti et al. 2022, "Reducing Activation
                 Recomputation in Large Transformer Models", section 4, redone for SwiGLU/GQA.)
  logits         micro_batch * seq * V in fp32, three times: the logits, their float copy for
                 the loss, and the loss gradient. With a fused loss (train.kernels auto or liger:
                 the runner's chunked loss or Liger's) never more than one chunk: the chunk's fp32
                 logits and their gradient (2 * LOSS_CHUNK_BYTES at most), plus the gradient of
                 the last hidden states it computes in the forward pass (tokens * h, compute dtype).
  LM head copy   V*h in the compute dtype: autocast casts the fp32 head to bf16/fp16 for its
                 matmul, and autograd keeps that copy for the backward pass.
  allocator      PyTorch's caching allocator holds more than the tensors need: x1.15.
  CUDA context   0.95 GB outside the allocator (context, kernels, cuBLAS workspaces).
  tokens         micro_batch * seq: padded batches peak at the micro batch whose longest example
                 is cut at max_length (seq = max_length); padding-free ones (data.packing) at the
                 micro batch holding the most tokens, from the dataset's lengths when known
                 (its micro_batch longest examples: dataset_lengths.LengthStats.largest_batch_tokens),
                 else the same bound.
  The last two are measured, and the whole estimate is checked, by benchmarks/gpu_memory.py: the
  real runner with real NF4 on an H100 (benchmarks/results/gpu_memory_h100.json). There, device
  memory in use less torch's max_memory_reserved was 0.94 GB in every case, reserved/allocated was
  1.02-1.19 (median 1.15), and the estimate came within -4 %..+7 % of the device peak; on five
  held-out shapes measured afterwards on an H200 (gpu_memory_h200_heldout.json), -8 %..+11 %.
  tests/unit/test_estimate.py holds it to +-20 % of all of them.

FLOPs: forward 2*N per token (N: parameters of the matmuls, LM head included) plus attention's
  4*L*s*h; the backward pass computes activation gradients only (the base is frozen): the same
  again; gradient checkpointing recomputes the forward once more: 3 passes instead of 2
  (Kaplan et al. 2020 / Chinchilla's 6N counts weight gradients too, which QLoRA skips).
Hours: per micro-step (micro_batch * seq tokens), the matmuls' FLOPs / (dense TFLOP/s *
  EFFICIENCY), never below what memory bandwidth allows (each pass reads the 4-bit weights and
  writes and reads their dequantized 16-bit copy), plus a fixed LAYER_PASS_OVERHEAD_S for every
  layer in every pass: the many small kernels of a 4-bit LoRA layer (dequantize, dropout, two
  LoRA matmuls, scaling, norms, rotary, casts) and their launches, which do not shrink with the
  batch. On an H100 that fixed part was most of a step at the ready configs' micro batches:
  tokens/s nearly doubled when the sequence length doubled (benchmarks/gpu_memory.py). A least-
  squares fit of the 7 measured steps gave 0.80 of dense peak and 6.5 ms per layer-pass; we use
  EFFICIENCY 0.60 (older GPUs reach less of their datasheet peak than an H100's big matmuls) with
  the 6.1 ms that fits the same measurements at 0.60: within -16 %..+13 % of the H100's
  tokens/s and -18 %..+11 % of the held-out H200's. Only Hopper cards were measured: on an A10G
  or a T4 the FLOPs part weighs more and the model rests on their datasheet TFLOP/s.
  Padded batches compute their padding too: the FLOPs count each micro batch's rows at the
  length of its longest example (padded_seq_len, E[max] of the lengths); padding-free ones only
  the examples' own tokens.
Dollars: (hours + STARTUP_HOURS) * $/h.

This is the uncalibrated model. Once runs of a model have finished on a GPU model, the planner
scales it by their measured / modelled tokens/s, each run modelled at the shape it ran at
(launcher/offers.py: speed_factor), so a speed measured at one micro batch and sequence length
carries over to another as the model says speed changes with them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.gpus import GPU

FACTS_FILE = Path(__file__).with_name("model_facts.json")
BYTES_4BIT = 0.5
QUANT_CONSTANT_BITS = {True: 0.127, False: 0.5}  # double quantization on / off
CUDA_CONTEXT_GB = 0.95
ALLOCATOR_RESERVE = 1.15
EFFICIENCY = 0.60
LAYER_PASS_OVERHEAD_S = 0.0061
STARTUP_HOURS = 0.25  # provisioning, bootstrap, model download, base-model evaluation
COMPUTE_BYTES = 2  # bf16 / fp16 activations
LOSS_CHUNK_BYTES = 256 * 2**20  # the runner's (qlora_runner.LOSS_CHUNK_BYTES): one chunk's fp32 logits


class UnknownModel(ValueError):
    """No config.json for the base model here or in the shipped facts."""


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelFacts":
        heads = config["num_attention_heads"]
        return cls(
            model_type=config.get("model_type", "llama"), hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        """The decoder's linear weights: what is quantized to 4 bits."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes())

    @property
    def matmul_params(self) -> int:
        """The weights every token is multiplied through: the decoder's linears and the LM head."""
        return self.linear_params + self.vocab_size * self.hidden_size

    @property
    def other_params(self) -> int:
        """Embeddings, LM head, norms and biases: kept in fp32 for training."""
        h = self.hidden_size
        biases = (self.q_dim + 2 * self.kv_dim) * self.num_layers if self.qkv_bias else 0
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + head + (2 * self.num_layers + 1) * h + biases

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        """all-linear adapters: r*(in+out) per linear layer of every block."""
        return self.num_layers * sum(r * (a + b) for a, b in self.linear_shapes())


def model_facts(base: str, local_path: Optional[str] = None) -> ModelFacts:
    """Facts from a local model folder's config.json, else from the shipped facts file."""
    if local_path:
        config_file = Path(local_path) / "config.json"
        if config_file.is_file():
            return ModelFacts.from_config(json.loads(config_file.read_text()))
    shipped = json.loads(FACTS_FILE.read_text())
    if base in shipped:
        return ModelFacts.from_config(shipped[base])
    raise UnknownModel(f"model.base: no config.json for {base!r} here and no shipped facts; use a local "
                       f"model folder, or one of: {', '.join(sorted(shipped))}")


@dataclass(frozen=True)
class VRAMEstimate:
    weights_4bit_gb: float
    fp32_params_gb: float
    lora_gb: float
    activations_gb: float
    logits_gb: float
    head_copy_gb: float
    context_gb: float

    @property
    def tensors_gb(self) -> float:
        """What torch allocates at the peak (max_memory_allocated)."""
        return (self.weights_4bit_gb + self.fp32_params_gb + self.lora_gb + self.activations_gb
                + self.logits_gb + self.head_copy_gb)

    @property
    def total_gb(self) -> float:
        """What the GPU must have free: the allocator's reserve around the tensors, and the context."""
        return self.tensors_gb * ALLOCATOR_RESERVE + self.context_gb


def activation_bytes_per_token_layer(facts: ModelFacts, lora_dropout: bool) -> float:
    h, i, kv = facts.hidden_size, facts.intermediate_size, facts.kv_dim
    elements = 4 * h + (h + 2 * kv) + (h + kv) + h + 4 * i
    dropout_copies = (6 * h + i) if lora_dropout else 0
    return (elements + dropout_copies) * COMPUTE_BYTES + dropout_copies  # + the 1-byte masks


def estimate_vram(facts: ModelFacts, *, micro_batch: int, seq_len: int, lora_r: int, lora_dropout: float,
                  gradient_checkpointing: bool, optimizer: str = "paged_adamw_8bit",
                  double_quant: bool = True, fused_loss: bool = False,
                  peak_tokens: Optional[float] = None) -> VRAMEstimate:
    """`peak_tokens`: the most tokens a micro batch holds (padding-free batches); by default
    micro_batch * seq_len, a padded batch whose longest example fills seq_len."""
    gb = 1e9
    tokens = peak_tokens if peak_tokens is not None else micro_batch * seq_len
    weights = facts.linear_params * (BYTES_4BIT + QUANT_CONSTANT_BITS[double_quant] / 8)
    fp32_rest = facts.other_params * 4
    optimizer_bytes = 8 if optimizer in ("adamw_torch", "paged_adamw_32bit") else 2
    lora = facts.lora_params(lora_r) * (4 + 4 + optimizer_bytes)
    per_layer = activation_bytes_per_token_layer(facts, lora_dropout > 0) * tokens
    if gradient_checkpointing:
        activations = facts.num_layers * tokens * facts.hidden_size * COMPUTE_BYTES + per_layer
    else:
        activations = facts.num_layers * per_layer
    if peak_tokens is not None:  # a packed row's block-diagonal mask (bool) and SDPA's compute-dtype
        # copy of it, which its memory-efficient kernel keeps for backward in each layer that keeps
        # activations (aten convert_boolean_attn_mask; read from the source, not yet measured)
        activations += tokens ** 2 * (1 + COMPUTE_BYTES * (1 if gradient_checkpointing else facts.num_layers))
    if fused_loss:
        chunk_logits = min(tokens * facts.vocab_size * 4, LOSS_CHUNK_BYTES)
        logits = 2 * chunk_logits + tokens * facts.hidden_size * COMPUTE_BYTES
    else:
        logits = 3 * tokens * facts.vocab_size * 4
    head_copy = facts.vocab_size * facts.hidden_size * COMPUTE_BYTES
    return VRAMEstimate(weights / gb, fp32_rest / gb, lora / gb, activations / gb, logits / gb, head_copy / gb,
                        CUDA_CONTEXT_GB)


def training_flops(facts: ModelFacts, tokens: int, seq_len: int, gradient_checkpointing: bool) -> float:
    """FLOPs to train on `tokens` tokens (see the module docstring)."""
    forward_per_token = 2 * facts.matmul_params + 4 * facts.num_layers * seq_len * facts.hidden_size
    passes = 3 if gradient_checkpointing else 2
    return forward_per_token * tokens * passes


def estimate_hours(facts: ModelFacts, gpu: GPU, gpu_count: int, tokens: int, seq_len: float, micro_batch: int,
                   gradient_checkpointing: bool, speed: float = 1.0, padded_seq_len: Optional[float] = None,
                   packed_rows: bool = False) -> float:
    """Hours on `gpu_count` x `gpu` for `tokens` in sequences of `seq_len` tokens on average.
    `padded_seq_len`: the rows' length in padded batches (their longest example), whose padding
    is computed too; None: no padding. `packed_rows`: padding-free, a micro batch in one row
    whose attention (SDPA under a block-diagonal mask, as the runner runs it) spans the whole
    row. `speed`: measured over modelled tokens/s on this GPU model (calibration; 1: the model alone)."""
    rows = max(padded_seq_len or seq_len, seq_len)
    computed = tokens * rows / seq_len if seq_len else tokens
    context = micro_batch * seq_len if packed_rows else rows
    compute_s = training_flops(facts, computed, context, gradient_checkpointing) / (
        gpu.tflops_dense * 1e12 * EFFICIENCY * gpu_count)
    passes = 3 if gradient_checkpointing else 2
    bytes_per_micro_step = passes * facts.linear_params * (BYTES_4BIT + 2 * COMPUTE_BYTES)
    micro_steps = math.ceil(tokens / (micro_batch * seq_len) - 1e-9)  # (a float seq_len: no ceil of 1000.0000001)
    memory_s = micro_steps * bytes_per_micro_step / (gpu.mem_bandwidth_gbs * 1e9 * gpu_count)
    fixed_s = micro_steps * passes * facts.num_layers * LAYER_PASS_OVERHEAD_S / gpu_count
    return (max(compute_s, memory_s) + fixed_s) / 3600 / speed


def model_tokens_per_s(facts: ModelFacts, gpu: GPU, micro_batch: int, seq_len: float,
                       gradient_checkpointing: bool, padded_seq_len: Optional[float] = None,
                       packed_rows: bool = False) -> float:
    """The uncalibrated model's training tokens/s (the examples' own tokens) on one `gpu` at this shape."""
    tokens = 1000 * micro_batch * seq_len
    return tokens / (estimate_hours(facts, gpu, 1, tokens, seq_len, micro_batch, gradient_checkpointing,
                                    padded_seq_len=padded_seq_len, packed_rows=packed_rows) * 3600)


def time_model_summary() -> str:
    """The uncalibrated time model in one line, for tables' footers."""
    return (f"FLOPs / (dense TFLOP/s x {EFFICIENCY:.2f}), floored by memory bandwidth, + "
            f"{LAYER_PASS_OVERHEAD_S * 1e3:.1f} ms per layer and pass (fitted on an H100)")


def estimate_usd(hours: float, usd_per_hour: float) -> float:
    return (hours + STARTUP_HOURS) * usd_per_hour
