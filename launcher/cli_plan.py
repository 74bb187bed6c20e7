"""`launch plan` (and the plan `launch` shows before it rents): its arguments and its output.
The planning is planning.py's; the table is plan_table.py's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from launcher import job, planning
from launcher.config import LaunchConfig, load as load_config
from launcher.errors import EXIT_NO_OFFER, UsageError
from launcher.offers import no_fit_message
from launcher.paths import DEFAULT_CONFIG, find_config
from launcher.plan_table import UNRENTABLE_MARK, render_plan
from launcher.preflight import PreflightReport, check_data
from launcher.providers.base import Need, Offer
from launcher.providers.local import LocalProvider
from launcher.providers.ssh import SSHProvider
from launcher.remote import RemoteError
from launcher.runs import RunStore


def add_market_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how to rent, for `launch plan` and `launch`: each overrides its resources.* key."""
    parser.add_argument("--gpu", default=None,
                        help="only this GPU, e.g. A10G or A10G:2 (resources.gpu); `any` drops the config's GPU")
    parser.add_argument("--providers", default=None, help="comma-separated providers and catalog clouds to plan on (resources.providers); "
                             "`launch check` lists the providers")
    market = parser.add_mutually_exclusive_group()
    market.add_argument("--spot", action="store_true", help="interruptible offers only (resources.interruptible)")
    market.add_argument("--on-demand", action="store_true", help="on-demand offers only")
    parser.add_argument("--max-price", type=float, default=None, help="USD per hour cap (resources.max_price)")
    parser.add_argument("--max-total", type=float, default=None,
                        help="USD cap for the whole job (resources.max_total_usd)")
    parser.add_argument("--managed", action="store_true",
                        help="on the SkyPilot clouds, as a managed job that SkyPilot recovers from preemptions "
                             "without this laptop (resources.sky.managed; needs storage.kind: s3)")


def market_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The market flags as overrides of resources.*, so the job file records the job as launched."""
    count = (args.gpu or "").partition(":")[2]
    return {"gpu": args.gpu,
            "gpus": int(count) if count.isdigit() else None,  # --gpu A10G:4 also overrides resources.gpus
            "providers": [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None,
            "interruptible": True if args.spot else False if args.on_demand else None,
            "max_price": args.max_price, "max_total_usd": args.max_total,
            "sky.managed": True if getattr(args, "managed", False) else None}


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="job YAML, or the name of a ready config (e.g. mistral-7b-qlora)")
    add_market_arguments(parser)
    parser.add_argument("--target", default=None,
                        help="also price this machine (local, ssh://user@host[:port], an ssh config alias)")
    parser.add_argument("--identity", default=None, help="SSH private key for --target")
    parser.add_argument("--usd-per-hour", type=float, default=None, help="what --target costs you per hour")
    parser.add_argument("--rows", type=int, default=15, help="rows in the table (--json and --all have every offer)")
    parser.add_argument("--all", action="store_true", help="every offer, one row each (by default: the best per "
                                                           "provider, GPU and market)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_plan(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    overrides = {**market_overrides(args), "target": args.target, "ssh_identity": args.identity,
                 "usd_per_hour": args.usd_per_hour}
    config = load_config(find_config(args.config), overrides)
    report = PreflightReport()
    check_data(report, config)
    if report.errors:
        for finding in report.errors:
            errors.print(f"[red]error:[/] {finding.message}", highlight=False)
        return report.exit_code
    plan = planning.compute_plan(config, store.measured_speeds(config.job.model.base), _warner(errors),
                                 example_tokens=report.example_tokens, extra_offers=target_offers(config, errors))
    if args.json:
        console.print_json(json.dumps(plan.as_json()))
    else:
        render_offers(console, plan, args.rows, args.all)
    if plan.choice is None:
        errors.print(f"[red]error:[/] {no_fit_message(plan.rows, plan.need)}", highlight=False)
        return EXIT_NO_OFFER
    return 0


def plan_rental(config: LaunchConfig, store: RunStore, errors: Console,
                example_tokens: Optional[list[int]]) -> planning.Plan:
    """No target: the plan `launch` rents from (raises planning.PlanError before anything is spent)."""
    return planning.compute_plan(config, store.measured_speeds(config.job.model.base), _warner(errors),
                                 example_tokens=example_tokens, renting=True)


def target_offers(config: LaunchConfig, errors: Console) -> list[Offer]:
    """The machine --target (resources.target) names, priced at --usd-per-hour, with the GPUs
    its nvidia-smi lists; an unreachable one is a warning, not the end of the plan."""
    target = config.resources.target
    if not target:
        return []
    price = config.resources.usd_per_hour
    if target == "local":
        return LocalProvider().offers(Need(), price)
    try:
        provider = SSHProvider(target, job.machine_spec("plan", config.resources.ssh_identity))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        return provider.offers(Need(), price)
    except RemoteError as e:
        errors.print(f"[yellow]warning:[/] {e}; {target} left out of the plan", highlight=False)
        return []


def render_offers(console: Console, plan: planning.Plan, limit: int, show_all: bool = False) -> None:
    render_plan(console, plan.rows, plan.choice, plan.need, limit=limit, show_all=show_all,
                rentable=planning.can_rent)
    for line in plan.mode_notes:  # how the chosen offer runs this job (managed: the controller's cost)
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for line in planning.unrentable_notes(plan.rows):  # why the † offers cannot be rented, and the fix
        console.print(f"{UNRENTABLE_MARK} {line}", highlight=False, markup=False, soft_wrap=True)


def _warner(errors: Console) -> Any:
    return lambda text: errors.print(f"[yellow]warning:[/] {text}", highlight=False)
