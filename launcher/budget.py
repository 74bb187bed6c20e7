"""The run's spending cap (resources.max_total_usd, --max-total), held while the run goes.

The plan refuses a job whose estimate is above the cap; this is what holds it after that. At
every look the launcher adds to the run's $ so far (every machine it used, at the $/h each
reported) what one more save-and-pull would cost at the $/h billing now: the rest of the step the
runner is in, its save, our pull of the checkpoint and one more look. When that reaches the cap
the runner is stopped (it checkpoints), the checkpoint pulled, the machines released, and the run
recorded `stopped` for the budget. So a run never costs more than its cap, whatever it ran on.

The margin's parts are measured on this run as it goes (its steps and saves from metrics.jsonl,
our pulls as they happen); before the first save and pull, they are estimated from the size of a
checkpoint (the adapter and its fp32 optimizer state) at a modest disk and downlink."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from launcher import clock
from launcher.runs import RunRecord, RunStore

DEFAULT_SAVE_S = 15.0  # a checkpoint's save and pull when its size cannot be estimated either
DEFAULT_PULL_S = 30.0
SAVE_BYTES_PER_S = 200e6  # a cloud disk's sequential write
PULL_BYTES_PER_S = 25e6  # 200 Mbit/s: a modest home downlink
STOP_S = 3.0  # from TERM to released: the stop's looks (one a second) and the provider's destroy call
CHECKPOINT_BYTES_PER_LORA_PARAM = 12  # fp32 weight + AdamW's two fp32 moments (8-bit AdamW keeps less)
STOPPED_FOR = "budget"  # the run record's stop_reason when the cap stopped it


@dataclass(frozen=True)
class Spend:
    """Where a run stands against its cap, at one moment."""

    cap_usd: float
    spent_usd: float  # every machine of the run so far
    usd_per_hour: float  # what is billing now (every open machine, or your box while the runner runs)
    margin_s: float  # one more save-and-pull

    @property
    def margin_usd(self) -> float:
        return self.usd_per_hour * self.margin_s / 3600

    @property
    def reached(self) -> bool:
        return self.spent_usd + self.margin_usd >= self.cap_usd

    def line(self, run_id: str) -> str:
        """What happened and how to go on, in one line."""
        return (f"budget: ${self.spent_usd:.4f} of the run's ${self.cap_usd:.2f} cap spent, and one more save and "
                f"pull (${self.margin_usd:.4f} at ${self.usd_per_hour:.2f}/h) would pass it; "
                f"`launch resume {run_id} --max-total {suggested_cap(self)}` continues it")


def suggested_cap(spend: Spend) -> str:
    """A cap to resume with: twice the old one, or the spend so far and one dollar more."""
    return f"{max(spend.cap_usd * 2, spend.spent_usd + 1):.2f}"


def billing_usd_per_hour(store: RunStore, record: RunRecord) -> float:
    """The $/h the run pays now: its rented machines not yet released; on your own box the $/h
    you gave, while the runner runs there."""
    if store.machines(record.id) or record.started_at:
        return usd_per_hour_held(store, record)
    return 0.0


def usd_per_hour_held(store: RunStore, record: RunRecord) -> float:
    """The $/h of what the run holds: its rented machines not yet released, else your own box's."""
    machines = store.machines(record.id)
    if machines:
        return sum(m.usd_per_hour for m in machines if m.ended_at is None)
    return record.usd_per_hour or 0.0


@dataclass(frozen=True)
class Guess:
    """A save's and a pull's seconds before the run has measured them."""

    save_s: float = DEFAULT_SAVE_S
    pull_s: float = DEFAULT_PULL_S

    @classmethod
    def for_job(cls, config: Any) -> "Guess":
        size = checkpoint_bytes(config)
        if size is None:
            return cls()
        return cls(save_s=1.0 + size / SAVE_BYTES_PER_S, pull_s=2.0 + size / PULL_BYTES_PER_S)


def checkpoint_bytes(config: Any) -> Optional[float]:
    """About how big one checkpoint of the job is; None when the model's shape is unknown here."""
    from launcher import estimate
    from launcher.paths import runner_module

    job = config.job
    local_path, is_local = runner_module().resolve_local(job.model.base, config.base_dir)
    try:
        facts = estimate.model_facts(job.model.base, local_path if is_local else None)
    except estimate.UnknownModel:
        return None
    return float(facts.lora_params(job.lora.r) * CHECKPOINT_BYTES_PER_LORA_PARAM)


def margin_s(metrics: list[dict[str, Any]], longest_pull_s: Optional[float], poll_s: float,
             guess: Guess = Guess()) -> float:
    """Seconds one more save-and-pull takes, from the run's own metrics: one look's wait, the
    step the runner is in (the longest recent step), its longest save, our longest pull twice
    (the checkpoint, then the results), and the stop itself (seeing the runner end, the release)."""
    pull = longest_pull_s or guess.pull_s
    return poll_s + step_s(metrics) + save_s(metrics, guess.save_s) + 2 * pull + STOP_S


def step_s(metrics: list[dict[str, Any]]) -> float:
    """The longest of the last ten steps' times (0 before two steps)."""
    times = [e["time"] for e in metrics if e.get("event") == "train" and isinstance(e.get("time"), (int, float))]
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a][-10:]
    return max(gaps, default=0.0)


def save_s(metrics: list[dict[str, Any]], guess_s: float = DEFAULT_SAVE_S) -> float:
    """The longest save so far: a checkpoint event's time less its step's train event's."""
    logged = {e.get("step"): e.get("time") for e in metrics if e.get("event") == "train"}
    saves = [e["time"] - logged[e.get("step")] for e in metrics
             if e.get("event") == "checkpoint" and isinstance(e.get("time"), (int, float))
             and isinstance(logged.get(e.get("step")), (int, float))]
    return max([s for s in saves if s >= 0], default=guess_s)


def spend(store: RunStore, record: RunRecord, cap_usd: float, metrics: list[dict[str, Any]],
          longest_pull_s: Optional[float], poll_s: float, guess: Guess = Guess(), now: Optional[float] = None) -> Spend:
    from launcher.renting import run_usd

    return Spend(cap_usd=cap_usd, spent_usd=run_usd(store, record, now or clock.now()),
                 usd_per_hour=billing_usd_per_hour(store, record),
                 margin_s=margin_s(metrics, longest_pull_s, poll_s, guess))


def month_start(now: Optional[float] = None) -> float:
    """Midnight on the first of this month, local time: where `launch runs`'s monthly total starts."""
    t = time.localtime(now or clock.now())
    return time.mktime((t.tm_year, t.tm_mon, 1, 0, 0, 0, 0, 0, -1))


def month_usd(store: RunStore, since: float, now: Optional[float] = None) -> float:
    """$ spent since `since` over every run: each rented machine's time after it, and own boxes'
    runs (whose segments are not kept one by one) whole when they were created after it."""
    from launcher.renting import run_usd

    now = now or clock.now()
    total = 0.0
    for record in store.touched_since(since):
        machines = store.machines(record.id)
        if machines:
            total += sum(m.usd_per_hour * max(0.0, (m.ended_at or now) - max(m.started_at, since)) / 3600
                         for m in machines)
        elif record.created_at >= since:
            total += run_usd(store, record, now)
    return total
