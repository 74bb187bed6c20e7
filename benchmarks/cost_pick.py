"""What picking the cheapest whole job saves, on the real catalogs in catalogs/.

For each ready config at two sequence lengths:
- ours: the estimated total $ of `launch plan`'s choice;
- brute force: the cheapest estimated total $ over every offer that can hold the job (the ratio
  ours / brute force must be 1.00);
- $/h pick: what a $/h optimizer gives for the same job. SkyPilot's optimizer, asked for a GPU,
  launches the cheapest $/h offer of that GPU; the user has to name one, and the natural name is
  the smallest GPU that holds the job. This script applies that rule to the same offers (it
  does not run SkyPilot itself) and prices the result with the same time estimate as ours.

    python benchmarks/cost_pick.py        # a few seconds; QLORA_LAUNCH_CATALOG_DIR overrides catalogs/"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher import config as launch_config  # noqa: E402
from launcher import offers  # noqa: E402
from launcher.catalog import catalog_dir  # noqa: E402
from launcher.gpus import resolve  # noqa: E402

CONFIGS = ["mistral-7b-qlora", "llama-3.1-8b-qlora", "deepseek-r1-distill-qwen-1.5b-qlora"]
SEQ_LENS = (1024, 4096)


def per_hour_pick(market: list[offers.Offer], need: offers.JobNeed) -> offers.PlannedOffer:
    """The smallest GPU that holds the job (fewest GB, then cheapest $/h), then its cheapest $/h offer."""
    evaluated = [offers.evaluate(o, need) for o in market]
    fitting = [p for p in evaluated if p.fits and p.offer.gpu_count == 1]
    smallest = min(fitting, key=lambda p: (resolve(p.offer.gpu).vram_gb, p.offer.usd_per_hour))
    named = resolve(smallest.offer.gpu)
    same_gpu = [p for p in fitting if resolve(p.offer.gpu) is named]
    return min(same_gpu, key=lambda p: p.offer.usd_per_hour)


def main() -> None:
    market = offers.catalog_offers()
    folder = catalog_dir() or offers.SHIPPED_CATALOGS
    print(f"cost pick: {len(market)} offers from {folder} (vast, aws, lambda; on-demand and spot)\n")
    header = (f"{'config':<38}{'seq':>6}{'VRAM GB':>9}  {'ours: offer':<34}{'ours $':>9}{'brute $':>9}{'ratio':>7}"
              f"  {'$/h pick: offer':<34}{'$/h pick $':>11}{'saving':>8}")
    print(header)
    for name in CONFIGS:
        base = launch_config.load(ROOT / "configs" / f"{name}.yaml")
        for seq in SEQ_LENS:
            job = dataclasses.replace(base.job, data=dataclasses.replace(base.job.data, max_length=seq))
            config = dataclasses.replace(base, job=job)
            need = offers.job_need(config)
            rows, choice = offers.plan(market, need, offers.Constraints())
            if choice is None:
                print(f"{name:<38}{seq:>6}{need.vram_gb:>9.1f}  nothing fits")
                continue
            ours = rows[choice]
            brute = min(offers.evaluate(o, need).est_total_usd for o in market if offers.evaluate(o, need).fits)
            pick = per_hour_pick(market, need)
            describe = lambda p: f"{p.offer.gpu_count}x {p.offer.gpu} {p.offer.provider} " \
                                 f"{'spot' if p.offer.interruptible else 'od'} ${p.offer.usd_per_hour:.3f}/h"  # noqa: E731
            saving = 1 - ours.est_total_usd / pick.est_total_usd
            print(f"{name:<38}{seq:>6}{need.vram_gb:>9.1f}  {describe(ours):<34}{ours.est_total_usd:>9.2f}"
                  f"{brute:>9.2f}{ours.est_total_usd / brute:>7.2f}  {describe(pick):<34}{pick.est_total_usd:>11.2f}"
                  f"{saving:>8.0%}")
    print("\n$ are estimates: (hours + 0.25 h start-up) x $/h, hours from FLOPs at 30 % of dense peak "
          "(launcher/estimate.py); token counts are upper bounds for hub datasets (every example at max_length).")


if __name__ == "__main__":
    main()
