"""`launch plan` (and `launch --gpu` without a target): argument parsing and rendering of the
plan; the planning itself is in offers.py and estimate.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from launcher import estimate, job
from launcher.config import ConfigError, LaunchConfig, load as load_config
from launcher.errors import EXIT_NO_OFFER, EXIT_USAGE, UsageError
from launcher.paths import DEFAULT_CONFIG
from launcher.preflight import PreflightReport, check_data
from launcher.remote import RemoteError
from launcher.runs import RunStore


def add_market_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how to rent, for `launch plan` and `launch` (each overrides its resources.* key)."""
    parser.add_argument("--providers", default=None, help="comma-separated, e.g. vast,aws (resources.providers)")
    market = parser.add_mutually_exclusive_group()
    market.add_argument("--spot", action="store_true", help="interruptible offers only (resources.interruptible)")
    market.add_argument("--on-demand", action="store_true", help="on-demand offers only")
    parser.add_argument("--max-price", type=float, default=None, help="USD per hour cap (resources.max_price)")
    parser.add_argument("--max-total", type=float, default=None, help="USD cap for the whole job")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job YAML")
    parser.add_argument("--gpu", default=None, help="only this GPU, e.g. A10G or A10G:2")
    add_market_arguments(parser)
    parser.add_argument("--target", default=None,
                        help="also price this machine (local, ssh://user@host[:port], an ssh config alias)")
    parser.add_argument("--identity", default=None, help="SSH private key for --target")
    parser.add_argument("--usd-per-hour", type=float, default=None, help="what --target costs you per hour")
    parser.add_argument("--rows", type=int, default=15, help="offers shown in the table (--json has all)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_plan(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    from launcher import offers

    config = load_config(args.config)
    made = make_plan(config, args, store, errors)
    if isinstance(made, int):
        return made
    rows, choice, need, _ = made
    if args.json:
        console.print_json(json.dumps(offers.plan_json(rows, choice, need)))
    else:
        render_offers(console, rows, choice, need, args.rows)
    if choice is None:
        errors.print(f"[red]error:[/] {offers.no_fit_message(rows, need)}", highlight=False)
        return EXIT_NO_OFFER
    return 0


def make_plan(config: LaunchConfig, args: argparse.Namespace, store: RunStore, errors: Console,
              renting: bool = False) -> Any:
    """(rows, choice, need, constraints) for `launch plan` and for `launch` without a target
    (`renting`: only offers we can rent), or an exit code after printing the data errors."""
    from launcher import offers
    from launcher.renting import RENTABLE, market
    from launcher.estimate import UnknownModel
    from launcher.gpus import UnknownGPU, parse_request

    report = PreflightReport()
    check_data(report, config)
    if report.errors:
        for finding in report.errors:
            errors.print(f"[red]error:[/] {finding.message}", highlight=False)
        return report.exit_code
    gpu_text = getattr(args, "gpu", None) or config.resources.gpu
    try:
        gpu, count = parse_request(gpu_text) if gpu_text else (None, None)
        need = offers.job_need(config, report.example_tokens)
    except (UnknownGPU, ValueError) as e:
        raise UsageError(str(e)) from None
    except UnknownModel as e:
        raise ConfigError(str(e)) from None
    providers_text = getattr(args, "providers", None)
    providers = (tuple(p.strip() for p in providers_text.split(",")) if providers_text
                 else tuple(config.resources.providers) if config.resources.providers else None)
    if renting:
        # Only where we can rent; asked for none of those: plan them anyway, to say so.
        providers = tuple(p for p in (providers or RENTABLE) if p in RENTABLE) or providers
    spot, on_demand = getattr(args, "spot", False), getattr(args, "on_demand", False)
    max_price, max_total = getattr(args, "max_price", None), getattr(args, "max_total", None)
    constraints = offers.Constraints(
        gpu=gpu, gpu_count=count if gpu_text and ":" in gpu_text else None, providers=providers,
        interruptible=True if spot else False if on_demand else config.resources.interruptible,
        max_usd_per_hour=max_price if max_price is not None else config.resources.max_price,
        max_total_usd=max_total if max_total is not None else config.resources.max_total_usd)
    warn = lambda text: errors.print(f"[yellow]warning:[/] {text}", highlight=False)  # noqa: E731
    found = market(config, need, constraints, warn) + ([] if renting else target_offers(config, args, errors))
    rows, choice = offers.plan(found, need, constraints, store.measured_speeds(config.job.model.base))
    return rows, choice, need, constraints


def target_offers(config: LaunchConfig, args: argparse.Namespace, errors: Console) -> list:
    """The machine --target (or resources.target) names, priced at --usd-per-hour, with the GPUs
    its nvidia-smi lists; an unreachable one is a warning, not the end of the plan."""
    from launcher.providers.base import Need
    from launcher.providers.local import LocalProvider
    from launcher.providers.ssh import SSHProvider

    target = getattr(args, "target", None) or config.resources.target
    if not target:
        return []
    price = getattr(args, "usd_per_hour", None)
    price = config.resources.usd_per_hour if price is None else price
    if target == "local":
        return LocalProvider().offers(Need(), price)
    identity = getattr(args, "identity", None) or config.resources.ssh_identity
    try:
        return SSHProvider(target, job.machine_spec("plan", identity)).offers(Need(), price)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except RemoteError as e:
        errors.print(f"[yellow]warning:[/] {e}; {target} left out of the plan", highlight=False)
        return []


def plan_rental(config: LaunchConfig, args: argparse.Namespace, store: RunStore, errors: Console) -> Any:
    """No --target: the plan, and the offers `launch` may rent (fitting, on a provider we can rent
    on, cheapest whole job first). Returns (candidates, rows, constraints, need), or an exit code after
    saying why nothing can be rented, before anything is spent."""
    from launcher import offers, renting

    made = make_plan(config, args, store, errors, renting=True)
    if isinstance(made, int):
        return made
    rows, choice, need, constraints = made
    if not rows:  # nothing where we can rent: what the whole market offers says what to do
        everywhere = make_plan(config, args, store, errors)
        if not isinstance(everywhere, int):
            rows, choice, need, constraints = everywhere
    if choice is None:
        errors.print(f"[red]error:[/] {offers.no_fit_message(rows, need)}", highlight=False)
        return EXIT_NO_OFFER
    candidates = [p.offer for p in rows if p.fits and p.offer.offer_id is not None]
    if not candidates:
        best = rows[choice]
        o = best.offer
        how = ("set VAST_API_KEY (or `vastai set api-key`) for live Vast.ai offers"
               if o.provider == "vast" or not renting.vast_is_configured() else "try --providers vast")
        errors.print(f"[red]error:[/] the plan picks {o.gpu_count}x {o.gpu} on {o.provider} "
                     f"({'spot' if o.interruptible else 'on-demand'}, ${o.usd_per_hour:.3f}/h, est. "
                     f"${best.est_total_usd:.2f} in all), but it cannot be rented from here: renting works on "
                     f"{', '.join(renting.RENTABLE)} so far ({how}); to train now pass --target "
                     "ssh://you@your-gpu-box (or local)", highlight=False)
        return EXIT_USAGE
    return candidates, rows, constraints, need


def render_offers(console: Console, rows: list, choice: Optional[int], need: Any, limit: int) -> None:
    tokens = "unknown" if need.tokens is None else f"{'≤ ' if need.tokens_bound else ''}{need.tokens:,}"
    console.print(f"need: {need.vram_gb:.1f} GB of GPU memory, {tokens} training tokens "
                  f"({need.facts.total_params / 1e9:.2f}B parameters, micro batch {need.micro_batch} x "
                  f"{need.seq_len} tokens)", highlight=False)
    table = Table(title="offers, cheapest whole job first")
    for column in ("", "provider", "region", "GPU", "VRAM", "$/h", "est. hours", "est. total $", "market", "note"):
        table.add_column(column, justify="right" if column in ("VRAM", "$/h", "est. hours", "est. total $") else "left")
    fitting = [p for p in rows if p.fits][:limit]
    misses = [p for p in rows if not p.fits][:5]
    for index, p in enumerate(fitting + misses):
        o = p.offer
        hours = "-" if p.est_hours is None else f"{p.est_hours:.2f}{'*' if p.calibrated else ''}"
        table.add_row("→" if choice is not None and index == choice else "", o.provider, o.region or "-",
                      f"{o.gpu_count}x {o.gpu}", f"{o.vram_gb or 0:.0f} GB", f"{o.usd_per_hour:.3f}", hours,
                      "-" if p.est_total_usd is None else f"{p.est_total_usd:.2f}",
                      "spot" if o.interruptible else "on-demand", p.why_not or "")
    console.print(table)
    console.print(f"est. hours: {estimate.time_model_summary()}; * = calibrated by your measured runs on that GPU. "
                  f"est. total: (hours + {estimate.STARTUP_HOURS:g} h start-up) x $/h.", highlight=False)
