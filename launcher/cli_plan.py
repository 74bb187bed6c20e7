"""`launch plan` (and `launch --gpu` without a target): argument parsing and rendering of the
plan; the planning itself is in offers.py and estimate.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from launcher import job
from launcher.config import ConfigError, LaunchConfig, load as load_config
from launcher.errors import EXIT_NO_OFFER, EXIT_USAGE, UsageError
from launcher.paths import DEFAULT_CONFIG
from launcher.preflight import PreflightReport, check_data
from launcher.remote import RemoteError
from launcher.runs import RunStore


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job YAML")
    parser.add_argument("--gpu", default=None, help="only this GPU, e.g. A10G or A10G:2")
    parser.add_argument("--providers", default=None, help="comma-separated, e.g. vast,aws")
    market = parser.add_mutually_exclusive_group()
    market.add_argument("--spot", action="store_true", help="interruptible offers only")
    market.add_argument("--on-demand", action="store_true", help="on-demand offers only")
    parser.add_argument("--max-price", type=float, default=None, help="USD per hour cap")
    parser.add_argument("--max-total", type=float, default=None, help="USD cap for the whole job")
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
    rows, choice, need = made
    if args.json:
        console.print_json(json.dumps(offers.plan_json(rows, choice, need)))
    else:
        render_offers(console, rows, choice, need, args.rows)
    if choice is None:
        errors.print(f"[red]error:[/] {offers.no_fit_message(rows, need)}", highlight=False)
        return EXIT_NO_OFFER
    return 0


def make_plan(config: LaunchConfig, args: argparse.Namespace, store: RunStore, errors: Console) -> Any:
    """(rows, choice, need) for `launch plan` and `launch --gpu`, or an exit code after printing
    the data errors."""
    from launcher import offers
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
    spot, on_demand = getattr(args, "spot", False), getattr(args, "on_demand", False)
    max_price, max_total = getattr(args, "max_price", None), getattr(args, "max_total", None)
    constraints = offers.Constraints(
        gpu=gpu, gpu_count=count if gpu_text and ":" in gpu_text else None, providers=providers,
        interruptible=True if spot else False if on_demand else None,
        max_usd_per_hour=max_price if max_price is not None else config.resources.max_price,
        max_total_usd=max_total if max_total is not None else config.resources.max_total_usd)
    market = offers.catalog_offers() + target_offers(config, args, errors)
    rows, choice = offers.plan(market, need, constraints, store.measured_rates(config.job.model.base))
    return rows, choice, need


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


def rented_target_not_yet(config: LaunchConfig, args: argparse.Namespace, store: RunStore, errors: Console) -> int:
    """A GPU asked for and no --target: the plan says what we would rent. Renting itself comes
    with the Vast.ai and SkyPilot providers; until then say so, before anything is spent."""
    from launcher import offers

    made = make_plan(config, args, store, errors)
    if isinstance(made, int):
        return made
    rows, choice, need = made
    if choice is None:
        errors.print(f"[red]error:[/] {offers.no_fit_message(rows, need)}", highlight=False)
        return EXIT_NO_OFFER
    o, best = rows[choice].offer, rows[choice]
    errors.print(f"[red]error:[/] the plan picks {o.gpu_count}x {o.gpu} on {o.provider} "
                 f"({'spot' if o.interruptible else 'on-demand'}, ${o.usd_per_hour:.3f}/h, est. "
                 f"${best.est_total_usd:.2f} in all), but renting on {o.provider} is not built yet; "
                 "`launch plan` lists the offers; to train now pass --target ssh://you@your-gpu-box (or local)",
                 highlight=False)
    return EXIT_USAGE


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
    console.print("est. hours: FLOPs / (dense TFLOP/s x 0.30), floored by memory bandwidth; * = calibrated by "
                  "your measured runs on that GPU. est. total: (hours + 0.25 h start-up) x $/h.", highlight=False)
