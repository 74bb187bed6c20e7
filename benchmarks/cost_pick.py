"""What picking the cheapest whole job saves, on the real catalogs in catalogs/.

For each ready config at two sequence lengths:
- ours: the estimated total $ of `launch plan`'s choice;
- brute force: the cheapest estimated total $ over every offer that can hold the job (the ratio
  ours / brute force must be 1.00);
- SkyPilot's pick: the user of SkyPilot has to name a GPU, and the natural name is the smallest
  GPU that holds the job; SkyPilot's optimizer (OptimizeTarget.COST) then launches the cheapest
  $/h offer of that name. With --sky-python, SkyPilot itself is asked, offline, on the same
  catalogs (benchmarks/sky_pick.py); without it the same rule is applied to our offer list. The
  pick is priced with the same hour estimate as ours.

    python benchmarks/cost_pick.py --sky-python /path/to/sky-venv/bin/python   # ~15 s
    python benchmarks/cost_pick.py                                             # rule only, 2 s"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher import config as launch_config  # noqa: E402
from launcher import estimate, offers  # noqa: E402
from launcher.catalog import catalog_dir  # noqa: E402
from launcher.gpus import resolve  # noqa: E402

CONFIGS = ["mistral-7b-qlora", "llama-3.1-8b-qlora", "deepseek-r1-distill-qwen-1.5b-qlora"]
SEQ_LENS = (1024, 4096)


def named_gpu(evaluated: list[offers.PlannedOffer], need: offers.JobNeed) -> str:
    """The catalog name of the smallest GPU that holds the job by its spec sheet (the name's
    nominal memory, as a user reading specs would choose), then the cheapest $/h."""
    fitting = [p for p in evaluated if p.fits and p.offer.gpu_count == 1
               and resolve(p.offer.gpu).vram_gb * offers.VRAM_MARGIN >= need.vram_gb]
    return min(fitting, key=lambda p: (resolve(p.offer.gpu).vram_gb, p.offer.usd_per_hour)).offer.gpu


def rule_pick(evaluated: list[offers.PlannedOffer], name: str) -> offers.PlannedOffer:
    """SkyPilot's rule on our offers: the cheapest $/h single-GPU offer of that name that fits."""
    same = [p for p in evaluated if p.fits and p.offer.gpu_count == 1 and p.offer.gpu == name]
    return min(same, key=lambda p: p.offer.usd_per_hour)


def describe(p: offers.PlannedOffer) -> str:
    return f"{p.offer.gpu_count}x {p.offer.gpu} {p.offer.provider} " \
           f"{'spot' if p.offer.interruptible else 'od'} ${p.offer.usd_per_hour:.3f}/h"


def sky_picks(sky_python: str, names: list[str]) -> dict[str, dict]:
    proc = subprocess.run([sky_python, str(ROOT / "benchmarks" / "sky_pick.py"), *names], capture_output=True,
                          text=True, timeout=600, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SKY_PICKS "))
    return json.loads(line.removeprefix("SKY_PICKS "))


def as_planned(market: list[offers.Offer], need: offers.JobNeed, pick: dict) -> offers.PlannedOffer:
    """SkyPilot's pick as one of our offers (same row: same memory and price), evaluated."""
    row = next(o for o in market if o.provider == pick["cloud"] and o.instance_type == pick["instance_type"]
               and o.region == pick["region"] and o.interruptible == pick["spot"]
               and abs(o.usd_per_hour - pick["usd_per_hour"]) < 1e-6)
    return offers.evaluate(row, need)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sky-python", default=None, help="a Python with skypilot 0.14.x: ask SkyPilot itself")
    args = parser.parse_args()
    market = offers.catalog_offers()
    folder = catalog_dir() or offers.SHIPPED_CATALOGS
    source = "SkyPilot 0.14 optimizer, offline" if args.sky_python else "SkyPilot's rule applied here"
    print(f"cost pick: {len(market)} offers from {folder} (vast, aws, lambda; on-demand and spot)")
    print(f"SkyPilot's pick: {source}\n")
    cases = []
    for name in CONFIGS:
        base = launch_config.load(ROOT / "configs" / f"{name}.yaml")
        for seq in SEQ_LENS:
            job = dataclasses.replace(base.job, data=dataclasses.replace(base.job.data, max_length=seq))
            need = offers.job_need(dataclasses.replace(base, job=job))
            cases.append((name, seq, need, [offers.evaluate(o, need) for o in market]))  # every offer, once
    names = {case[:2]: named_gpu(case[3], case[2]) for case in cases}
    skies = sky_picks(args.sky_python, sorted(set(names.values()))) if args.sky_python else {}
    header = (f"{'config':<38}{'seq':>6}{'VRAM GB':>9}  {'ours: offer':<34}{'ours $':>9}{'brute $':>9}{'ratio':>7}"
              f"  {'SkyPilot pick (named GPU)':<36}{'its $':>8}{'saving':>8}")
    print(header)
    for name, seq, need, evaluated in cases:
        rows, choice = offers.plan(market, need, offers.Constraints())  # what `launch plan` does, as it does it
        ours = rows[choice]
        brute = min(p.est_total_usd for p in evaluated if p.fits)
        gpu_name = names[(name, seq)]
        pick = as_planned(market, need, skies[gpu_name]) if skies else rule_pick(evaluated, gpu_name)
        fits = "" if pick.fits else " (does not fit!)"
        saving = 1 - ours.est_total_usd / pick.est_total_usd
        print(f"{name:<38}{seq:>6}{need.vram_gb:>9.1f}  {describe(ours):<34}{ours.est_total_usd:>9.2f}"
              f"{brute:>9.2f}{ours.est_total_usd / brute:>7.2f}  {describe(pick) + fits:<36}{pick.est_total_usd:>8.2f}"
              f"{saving:>8.0%}")
    print(f"\n$ are estimates: (hours + {estimate.STARTUP_HOURS:g} h start-up) x $/h, hours: {estimate.time_model_summary()} "
          "(launcher/estimate.py); token counts are upper bounds for hub datasets (every example at max_length).")


if __name__ == "__main__":
    main()
