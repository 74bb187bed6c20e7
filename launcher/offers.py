"""Offers across providers, filtered by fit, ranked by the estimated cost of the whole job.

SkyPilot and dstack pick the cheapest $/hour among machines matching what the user typed; we
price the whole job on every machine that can hold it: est_total_usd = (est_hours + start-up) x
$/h, and the cheapest fitting offer wins (ties: fewer hours). A fast expensive GPU often beats a
slow cheap one.

Offers come from SkyPilot's catalog files (catalog.py) for Vast.ai and the clouds: one offer per
row and market (on-demand, and spot where the row has a spot price). Live Vast.ai search replaces
Vast's catalog rows with the Vast.ai provider.

Several GPUs, two ways:
- The job asks for them (resources.gpus, --gpu A10G:4, resources.nodes): data parallel, one
  4-bit copy of the model per GPU (launcher/distributed.py). An offer fits when the job fits ONE
  of its GPUs, and the job goes faster by the number of GPUs times DATA_PARALLEL_EFFICIENCY (one
  machine) or MULTI_NODE_EFFICIENCY (several; each node billed).
- Otherwise the runner spreads a model that does not fit one GPU over all of them
  (device_map="auto"), which runs the layers one GPU at a time: more memory, not more speed. So a
  multi-GPU offer fits when the job fits the GPUs' summed memory, and takes as long as on one GPU."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher import catalog, dataset_lengths, estimate
from launcher.config import LaunchConfig, runner_module
from launcher.gpus import GPU, UnknownGPU, resolve
from launcher.paths import SHIPPED_CATALOGS
from launcher.providers.base import Offer
from launcher.runs import MeasuredSpeed

VRAM_MARGIN = 0.90  # plan to fill at most 90 % of a GPU: the estimate is an estimate
# Data parallel speed-up per GPU, stated, not measured here (no multi-GPU machine to measure on):
# the gradient all-reduce of LoRA adapters is small (tens of MB), so DDP on one machine (NVLink or
# PCIe) keeps ~90 % per GPU in published scaling runs; across cloud machines (TCP, no RDMA) less.
DATA_PARALLEL_EFFICIENCY = 0.90
MULTI_NODE_EFFICIENCY = 0.80
# Training examples of the ready configs' hub datasets (their dataset cards), so planning works
# offline: (id, subset, split) -> examples. Kept in launcher/dataset_facts.json with their lengths.
HUB_DATASET_EXAMPLES = dataset_lengths.hub_examples()


class NoFittingOffer(Exception):
    """Nothing can hold the job under the constraints; the message names the nearest miss."""


@dataclass(frozen=True)
class JobNeed:
    vram_gb: float
    tokens: Optional[int]  # tokens to train on (None: unknown)
    tokens_bound: bool  # True: an upper bound (every example at data.max_length)
    seq_len: int  # data.max_length: what the VRAM peak is sized for
    micro_batch: int
    gradient_checkpointing: bool
    facts: estimate.ModelFacts
    # Mean tokens per training sequence (what sets the number of steps): from the examples' lengths
    # (dataset_lengths.py: local data, the shipped statistics, a hub sample), else max_length (an
    # upper bound, like the token count).
    seq_tokens: float
    # Where the lengths behind tokens and seq_tokens come from, in words: "local data (model
    # tokenizer)", "local data (~4 chars/token)", "shipped statistics of <dataset> (<tokenizer>)",
    # "<n> hub rows sampled (...)", "max_length (upper bound)".
    lengths_source: str
    lengths_warning: Optional[str] = None  # why a better source of lengths failed (a hub sample)
    # How the runner will batch and score (data.packing, train.kernels; see estimate.py):
    padding_free: bool = False
    fused_loss: bool = False
    # Padded batches: the mean row length, their longest example's (None: padding-free, no padding)
    padded_seq_tokens: Optional[float] = None

    def as_json(self) -> dict[str, Any]:
        return {"vram_gb": round(self.vram_gb, 2), "tokens": self.tokens, "tokens_upper_bound": self.tokens_bound,
                "seq_len": self.seq_len, "seq_tokens": round(self.seq_tokens, 1), "micro_batch": self.micro_batch,
                "gradient_checkpointing": self.gradient_checkpointing, "params": self.facts.total_params,
                "lengths_source": self.lengths_source, "lengths_warning": self.lengths_warning,
                "padding_free": self.padding_free, "fused_loss": self.fused_loss,
                "padded_seq_tokens": _round(self.padded_seq_tokens, 1)}


@dataclass(frozen=True)
class PlannedOffer:
    offer: Offer
    est_hours: Optional[float]
    est_total_usd: Optional[float]
    fits: bool
    why_not: Optional[str]  # why it does not fit or was excluded
    calibrated: bool = False  # hours from a measured tokens/s on this GPU

    def as_json(self) -> dict[str, Any]:
        o = self.offer
        return {"provider": o.provider, "region": o.region, "gpu": o.gpu, "gpu_count": o.gpu_count,
                "vram_gb": o.vram_gb, "usd_per_hour": o.usd_per_hour, "interruptible": o.interruptible,
                "est_hours": _round(self.est_hours, 3), "est_total_usd": _round(self.est_total_usd, 2),
                "fits": self.fits, "why_not": self.why_not, "calibrated": self.calibrated,
                "instance_type": o.instance_type, "hours_left": o.hours_left}


def _round(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------
# the job's need
# ---------------------------------------------------------------------------------------------


def job_need(config: LaunchConfig, example_tokens: Optional[list[int]] = None, *,
             exact_counts: Optional[bool] = None, hub_sample: bool = True) -> JobNeed:
    """VRAM and tokens of the job. `example_tokens`: each local example's length in tokens
    (preflight counts them; `exact_counts`: with the model's own tokenizer, None: as preflight
    would have). Without them, a hub dataset's lengths come from the shipped statistics, else a
    sample of its rows when online (`hub_sample`), else every example is bounded at max_length."""
    qr = runner_module()
    job = config.job
    local_path, is_local = qr.resolve_local(job.model.base, config.base_dir)
    facts = estimate.model_facts(job.model.base, local_path if is_local else None)
    lengths = dataset_lengths.example_lengths(config, example_tokens, exact_counts, hub_sample)
    tokens, bound = _training_tokens(config, lengths)
    batch, cap = job.train.micro_batch_size, job.data.max_length
    padding_free = _padding_free(config, facts, lengths.stats)
    fused_loss = job.train.kernels != "none"  # every kernel choice but none keeps the full logits out of memory
    peak_tokens, padded = _micro_batch_shape(lengths.stats, padding_free, batch, cap)
    vram = estimate.estimate_vram(
        facts, micro_batch=batch, seq_len=cap, lora_r=job.lora.r,
        lora_dropout=job.lora.dropout, gradient_checkpointing=job.train.gradient_checkpointing,
        optimizer="paged_adamw_8bit" if job.train.optimizer == "auto" else job.train.optimizer,
        double_quant=job.model.double_quant, fused_loss=fused_loss, peak_tokens=peak_tokens)
    return JobNeed(vram_gb=vram.total_gb, tokens=tokens, tokens_bound=bound, seq_len=cap,
                   micro_batch=batch, gradient_checkpointing=job.train.gradient_checkpointing,
                   facts=facts, seq_tokens=_sequence_tokens(config, lengths), lengths_source=lengths.source,
                   lengths_warning=lengths.warning, padding_free=padding_free, fused_loss=fused_loss,
                   padded_seq_tokens=padded)


def _padding_free(config: LaunchConfig, facts: estimate.ModelFacts,
                  stats: Optional[dataset_lengths.LengthStats]) -> bool:
    """As the runner decides on the machine (qlora_runner.choose_padding_free), from the lengths
    known here: auto packs where the model type keeps packed examples apart and a packed row's
    attention costs less than the padding it removes. Without lengths every example is taken at
    max_length, where padding-free saves nothing: padded. Where these lengths differ from the
    runner's, the choice only flips near a ratio of 1, where lengths are even and both shapes
    hold about the same tokens."""
    qr, job = runner_module(), config.job
    packing, batch, cap = job.data.packing, job.train.micro_batch_size, job.data.max_length
    if packing != "auto":
        return bool(packing)
    if qr.padding_free_refusal(facts.model_type, job.model.trust_remote_code) is not None or stats is None:
        return False
    shape = qr.ComputeShape(facts.matmul_params, facts.num_layers, facts.q_dim)
    return qr.packed_over_padded_flops(shape, batch, stats.mean_capped(cap), stats.mean_longest_of(cap, batch)) < 1


def _micro_batch_shape(stats: Optional[dataset_lengths.LengthStats], padding_free: bool, batch: int,
                       cap: int) -> tuple[Optional[int], Optional[float]]:
    """(the most tokens a micro batch holds, for VRAM; the mean padded row length, for time:
    None when padding-free). Without the examples' lengths: every example at max_length."""
    if stats is None:
        return None, None if padding_free else float(cap)
    if padding_free:
        return stats.largest_batch_tokens(cap, batch), None
    return batch * stats.largest_batch_tokens(cap, 1), stats.mean_longest_of(cap, batch)


def sequence_tokens(config: LaunchConfig, example_tokens: Optional[list[int]]) -> float:
    """Mean tokens per training sequence: the examples cut at max_length."""
    return _sequence_tokens(config, dataset_lengths.example_lengths(config, example_tokens))


def training_tokens(config: LaunchConfig, example_tokens: Optional[list[int]]) -> tuple[Optional[int], bool]:
    """(tokens the job trains on, whether that is an upper bound)."""
    return _training_tokens(config, dataset_lengths.example_lengths(config, example_tokens))


def _sequence_tokens(config: LaunchConfig, lengths: dataset_lengths.ExampleLengths) -> float:
    data = config.job.data
    if lengths.stats is None:
        return float(data.max_length)
    return lengths.stats.mean_capped(data.max_length)


def _training_tokens(config: LaunchConfig, lengths: dataset_lengths.ExampleLengths) -> tuple[Optional[int], bool]:
    job = config.job
    data, train = job.data, job.train
    per_step = train.micro_batch_size * train.grad_accum
    stats = lengths.stats
    if stats is not None:
        mean = stats.mean_capped(data.max_length)
        if train.max_steps:
            return int(train.max_steps * per_step * mean), False
        if lengths.examples is None:
            return None, False
        # The train split, plus the fractions that split files take over.
        train_share = data.splits.train + (data.splits.validation if data.validation_path else 0) + (
            data.splits.test if data.test_path else 0)
        if lengths.examples == stats.examples:  # every example counted: their sum
            return int(stats.capped_tokens(data.max_length) * train_share * train.epochs), False
        return int(lengths.examples * train_share * train.epochs * mean), False
    if train.max_steps:
        return train.max_steps * per_step * data.max_length, True
    if lengths.examples is None:
        return None, True
    return int(lengths.examples * data.splits.train * train.epochs * data.max_length), True


# ---------------------------------------------------------------------------------------------
# offers
# ---------------------------------------------------------------------------------------------


def catalog_offers(folder: Optional[Path] = None) -> list[Offer]:
    """Every GPU offer of the catalogs (each cloud with a v8/<cloud>/vms.csv): each instance type
    and region once on demand, and once as spot where priced so (catalog.offers)."""
    folder = folder or catalog.catalog_dir() or SHIPPED_CATALOGS
    found: list[Offer] = []
    for cloud in sorted(p.parent.name for p in (folder / "v8").glob("*/vms.csv")):
        found += catalog.offers(cloud, folder)
    return found


def data_parallel_speedup(gpus_per_node: int, nodes: int = 1) -> float:
    """How many times faster than one GPU the job runs with one rank per GPU."""
    ranks = gpus_per_node * nodes
    if ranks == 1:
        return 1.0
    return ranks * (DATA_PARALLEL_EFFICIENCY if nodes == 1 else MULTI_NODE_EFFICIENCY)


def evaluate(offer: Offer, need: JobNeed, measured: Optional[list[MeasuredSpeed]] = None, *,
             data_parallel: bool = False, nodes: int = 1) -> PlannedOffer:
    """Fit, hours and total $ of the job on one offer (on `nodes` such machines). `data_parallel`:
    one copy of the model per GPU (the job asked for several GPUs or nodes)."""
    if offer.gpu is None:
        return PlannedOffer(offer, None, None, False, "no NVIDIA GPU")
    gpu = _gpu_of(offer)
    if gpu is None or not gpu.cuda:
        return PlannedOffer(offer, None, None, False, "not a CUDA GPU the runner supports")
    per_gpu = offer.vram_gb or gpu.vram_gb
    parallel = data_parallel and offer.target is None  # own boxes run as they are
    usable = per_gpu * (1 if parallel else offer.gpu_count) * VRAM_MARGIN
    hours = None
    calibrated = False
    if need.tokens is not None:
        speed = speed_factor(measured or [], gpu, need)
        calibrated = speed is not None
        hours = estimate.estimate_hours(need.facts, gpu, 1, need.tokens, need.seq_tokens,
                                        need.micro_batch, need.gradient_checkpointing, speed=speed or 1.0,
                                        padded_seq_len=need.padded_seq_tokens, packed_rows=need.padding_free)
        if parallel:
            hours /= data_parallel_speedup(offer.gpu_count, nodes)
    machines = nodes if parallel else 1
    total = estimate.estimate_usd(hours, offer.usd_per_hour * machines) if hours is not None else None
    if need.vram_gb > usable:
        each = " per GPU (each holds the model)" if parallel and offer.gpu_count > 1 else ""
        return PlannedOffer(offer, hours, total, False,
                            f"too small: {usable:.1f} of {need.vram_gb:.1f} GB{each}", calibrated)
    return PlannedOffer(offer, hours, total, True, None, calibrated)


@dataclass(frozen=True)
class Constraints:
    gpu: Optional[GPU] = None
    gpu_count: Optional[int] = None
    providers: Optional[tuple[str, ...]] = None
    interruptible: Optional[bool] = None  # None: both markets
    max_usd_per_hour: Optional[float] = None
    max_total_usd: Optional[float] = None
    data_parallel: bool = False  # the job asked for several GPUs per machine or several nodes
    nodes: int = 1
    # With nodes > 1: the markets that can make several machines train together (None: any).
    multi_node_markets: Optional[frozenset[str]] = None


def plan(offers: list[Offer], need: JobNeed, constraints: Constraints,
         measured: Optional[list[MeasuredSpeed]] = None) -> tuple[list[PlannedOffer], Optional[int]]:
    """Every offer of the requested GPU (or every offer), evaluated and sorted by total $ (fitting
    ones first); the index of the choice, or None when nothing fits."""
    c = constraints
    rows = []
    for offer in offers:
        if c.providers and offer.provider not in c.providers and offer.target is None:
            continue  # (a machine named with --target is always priced)
        if c.gpu is not None and _gpu_of(offer) is not c.gpu:
            continue
        planned = evaluate(offer, need, measured, data_parallel=c.data_parallel, nodes=c.nodes)
        reason = _excluded(planned, c)
        if reason:
            planned = PlannedOffer(offer, planned.est_hours, planned.est_total_usd, False, reason, planned.calibrated)
        rows.append(planned)
    rows.sort(key=lambda p: (not p.fits, _key(p.est_total_usd), _key(p.est_hours), p.offer.usd_per_hour))
    choice = 0 if rows and rows[0].fits else None
    return rows, choice


def _excluded(p: PlannedOffer, c: Constraints) -> Optional[str]:
    if not p.fits:
        return p.why_not
    o = p.offer
    if c.nodes > 1 and (o.target is not None or (c.multi_node_markets is not None
                                                  and o.provider not in c.multi_node_markets)):
        return f"one machine only, {c.nodes} nodes asked for"
    if c.gpu_count is not None and o.gpu_count != c.gpu_count and o.target is None:  # own box: as it is
        return f"{o.gpu_count} GPUs, {c.gpu_count} asked for"
    if c.interruptible is not None and o.interruptible != c.interruptible and o.target is None:  # own box: no market
        return "spot" if o.interruptible else "on-demand"
    if c.max_usd_per_hour is not None and o.usd_per_hour > c.max_usd_per_hour:
        return f"above the ${_cap_text(c.max_usd_per_hour)}/h cap"
    if c.max_total_usd is not None and p.est_total_usd is not None and p.est_total_usd > c.max_total_usd:
        return f"above the ${_cap_text(c.max_total_usd)} total cap"
    if o.hours_left is not None and p.est_hours is not None and p.est_hours > o.hours_left:
        return f"needs {_hours_text(p.est_hours)}, {_hours_text(o.hours_left)} left"  # a free quota (Kaggle's week)
    return None


def _cap_text(usd: float) -> str:
    """A cap in dollars with its first two figures: 20.00, 1.50, 0.021, not 0.00."""
    return f"{usd:.{max(2, 1 - math.floor(math.log10(usd)))}f}"


def _hours_text(hours: float) -> str:
    return f"{hours:.1f}".removesuffix(".0") + " h"


def speed_factor(measured: list[MeasuredSpeed], gpu: GPU, need: JobNeed) -> Optional[float]:
    """Measured over modelled tokens/s of this model's finished runs on this GPU model (the median),
    each run modelled at the shape it ran at; None without such runs. A record older than the
    shape columns is taken at this job's shape, as if its speed were this job's."""
    ratios = []
    # A record does not say how its run batched: taken as this job batches (padded rows this
    # much longer than its mean sequence, or none). A padded run calibrating a padding-free job
    # counts its padding as slowness: conservative.
    padding = (need.padded_seq_tokens / need.seq_tokens) if need.padded_seq_tokens and need.seq_tokens else None
    for m in measured:
        if _smi_gpu(m.gpu) is not gpu:
            continue
        seq = m.seq_tokens or need.seq_tokens
        modelled = estimate.model_tokens_per_s(
            need.facts, gpu, m.micro_batch or need.micro_batch, seq,
            need.gradient_checkpointing if m.gradient_checkpointing is None else m.gradient_checkpointing,
            padded_seq_len=seq * padding if padding else None, packed_rows=need.padding_free)
        ratios.append(m.tokens_per_s / modelled)
    return statistics.median(ratios) if ratios else None


def _smi_gpu(name: str) -> Optional[GPU]:
    """The GPU model a target's nvidia-smi named ("NVIDIA A10G", "2x NVIDIA A10G")."""
    try:
        return resolve(name.split("x ", 1)[-1] if name[:1].isdigit() else name)
    except UnknownGPU:
        return None


def _gpu_of(offer: Offer) -> Optional[GPU]:
    if offer.gpu is None:
        return None
    try:
        return resolve(offer.gpu)
    except UnknownGPU:
        return None


def _key(value: Optional[float]) -> float:
    return math.inf if value is None else value


def no_fit_message(rows: list[PlannedOffer], need: JobNeed) -> str:
    """What to change, naming the cheapest near miss."""
    misses = [p for p in rows if p.why_not]
    # The market and GPU count are what the user chose: a miss for another reason is the news.
    chosen = [p for p in misses if p.why_not not in ("spot", "on-demand") and "asked for" not in p.why_not]
    misses = chosen or misses
    if not rows:
        return "no offer matches the GPU and providers asked for; try another --gpu or --providers"
    nearest = min(misses, key=lambda p: (_key(p.est_total_usd), p.offer.usd_per_hour))
    o = nearest.offer
    miss = f"the cheapest near miss is {o.gpu_count}x {o.gpu} on {o.provider} at ${o.usd_per_hour:.2f}/h: {nearest.why_not}"
    fix = fix_for(nearest.why_not or "")
    if fix is None:  # the offer itself cannot run it (memory, no CUDA GPU): what the job needs is the news
        return (f"no offer can hold this job (it needs about {need.vram_gb:.1f} GB); {miss}. Try a smaller "
                "train.micro_batch_size or data.max_length, train.gradient_checkpointing: true, or a bigger GPU")
    return f"no offer holds this job as asked; {miss}. Try {fix}"


def fix_for(why_not: str) -> Optional[str]:
    """What to change for an offer that could run the job but was excluded by what was asked
    (_excluded's reasons); None for an offer that cannot run it (evaluate's)."""
    if why_not == "on-demand":
        return "--on-demand (resources.interruptible: false) to take on-demand machines, or another --gpu"
    if why_not == "spot":
        return "--spot (resources.interruptible: true) to take spot machines, or another --gpu"
    if "cap" in why_not:
        return "a higher --max-price / --max-total (resources.max_price, resources.max_total_usd), or another --gpu"
    if "GPUs," in why_not:
        return "the GPU count offered (--gpu NAME:N, resources.gpus), or another --gpu"
    if "nodes" in why_not:
        return "resources.nodes: 1, or providers that rent several machines (SkyPilot's clouds)"
    if "left" in why_not:
        return "a paid GPU (another provider in --providers), or wait until the free quota refreshes"
    return None


def plan_json(rows: list[PlannedOffer], choice: Optional[int], need: JobNeed) -> dict[str, Any]:
    return {"need": need.as_json(), "offers": [p.as_json() for p in rows], "choice": choice}

