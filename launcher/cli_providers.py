"""The commands about providers rather than one run: `launch check` (what `sky check` is to
SkyPilot users: every registered provider, usable here or not, with the exact fix) and
`launch down --all` (every machine labelled by us on every provider that can list them)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.prompt import Confirm
from rich.table import Table

from launcher import job
from launcher.errors import EXIT_ENVIRONMENT, EXIT_TARGET
from launcher.providers import PROVIDERS, provider_named, sweepable
from launcher.providers.base import LabelledMachine, ProviderError, Sweepable, availability
from launcher.remote import USER_SSH_KEYS
from launcher.runs import RunStore, state_dir

TOOLS = (("ssh", "openssh-client", "reaches SSH boxes and rented machines"),
         ("rsync", "rsync", "moves data, checkpoints and results"))


@dataclass(frozen=True)
class CheckLine:
    what: str  # a provider's name, or a tool here
    usable: bool
    detail: str
    fix: Optional[str] = None


def laptop_checks() -> list[CheckLine]:
    """The tools the launcher drives on this machine, and the SSH key rented machines get."""
    lines = []
    for tool, package, why in TOOLS:
        path = shutil.which(tool)
        lines.append(CheckLine(tool, path is not None, f"{path} ({why})" if path else f"not installed ({why})",
                               None if path else f"apt install {package} (macOS: brew install {tool})"))
    key = next((Path(k).expanduser() for k in USER_SSH_KEYS if Path(f"{k}.pub").expanduser().is_file()), None)
    made = state_dir() / "keys"
    lines.append(CheckLine("ssh key", True, f"{key} (its .pub goes on rented machines)" if key else
                           f"none in {', '.join(USER_SSH_KEYS)}: one is made in {made} when a machine is first rented"))
    return lines


def provider_checks() -> list[CheckLine]:
    out = []
    for name, cls in PROVIDERS.items():
        found = availability(cls)
        rents = "rents machines" if cls.rents_machines else "your own machine"
        out.append(CheckLine(name, found.usable, f"{cls.title}, {rents}: {found.detail}", found.fix))
    return out


def market_checks() -> list[CheckLine]:
    """The markets a provider rents besides its own name (the SkyPilot clouds), one line each."""
    return [CheckLine(market, found.usable, f"through {name}: {found.detail}", found.fix)
            for name, cls in PROVIDERS.items() for market, found in cls.market_availability().items()]


def cmd_check(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    providers, markets, laptop = provider_checks(), market_checks(), laptop_checks()
    if args.json:
        console.print_json(json.dumps({"providers": [asdict(c) for c in providers],
                                       "markets": [asdict(c) for c in markets],
                                       "laptop": [asdict(c) for c in laptop]}))
    else:
        for title, lines in (("providers", providers), ("clouds", markets), ("this machine", laptop)):
            table = Table(title=title, show_header=False, expand=False)
            table.add_column(no_wrap=True)
            table.add_column(no_wrap=True)
            table.add_column(overflow="fold")
            for line in lines:
                mark = "[green]ok[/]" if line.usable else "[red]no[/]"
                table.add_row(line.what, mark, line.detail + (f"\n[bold]fix:[/] {line.fix}" if line.fix else ""))
            console.print(table)
    return 0 if all(line.usable for line in laptop) else EXIT_ENVIRONMENT


def cmd_down_all(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    """Every machine with our label on every provider that can list them, including ones no run
    record here knows (another laptop, a lost state directory): runs known here are stopped with
    their results pulled; the others are destroyed. A provider we cannot ask (no credentials, a
    reply we cannot read) is an error, never "nothing to do"."""
    from launcher.progress import RichReporter

    reporter = RichReporter(console)
    found: list[tuple[Sweepable, LabelledMachine]] = []
    unanswered = 0
    for name in sweepable():
        cls = PROVIDERS[name]
        assert issubclass(cls, Sweepable)
        usable = cls.sweep_availability()
        if not usable.usable and not usable.matters:
            console.print(f"{cls.title}: {usable.detail}", highlight=False, style="dim")
            continue
        if not usable.usable:
            unanswered += 1
            errors.print(f"[red]error:[/] {cls.title}: not checked, {usable.detail}; `launch check` says how to set "
                         "it up; nothing was destroyed there", highlight=False)
            continue
        provider = provider_named(name, log=reporter.warn)
        assert isinstance(provider, Sweepable)
        try:
            found += [(provider, machine) for machine in provider.labelled_machines()]
        except ProviderError as e:
            unanswered += 1
            errors.print(f"[red]error:[/] {cls.title}: {e}; nothing was destroyed there, try again", highlight=False)
    if not found:
        if not unanswered:
            console.print("no machine carries a qlora-launch label")
        return EXIT_TARGET if unanswered else 0
    runs = {r.target: r for r in store.list(limit=1_000_000)}
    table = Table(title="machines labelled by qlora-launch")
    for column in ("machine", "label", "status", "$/h", "run here"):
        table.add_column(column)
    for _, machine in found:
        known = runs.get(machine.name)
        table.add_row(machine.name, machine.label, machine.status, f"{machine.usd_per_hour:.3f}",
                      f"{known.id} ({known.status})" if known else "unknown")
    console.print(table)
    if not args.yes and sys.stdin.isatty() and not Confirm.ask(f"Destroy these {len(found)}?", console=console,
                                                               default=False):
        return 0
    failed = 0
    for provider, machine in found:
        known = runs.get(machine.name)
        try:
            if known and known.status in ("starting", "running") and known.remote_dir:
                job.down(job.open_session(store, known.id, log=reporter.warn), reporter)  # results pulled first
            else:
                provider.destroy_machine(machine.machine_id)
                if known:
                    store.end_machine(known.id, machine.name, "stopped")
            console.print(f"{machine.name}: destroyed" + (f" (run {known.id})" if known else
                                                          " (unknown to the run records)"))
        except Exception as e:  # noqa: BLE001  (whatever went wrong with one, the next one still goes)
            failed += 1
            errors.print(f"[red]error:[/] {machine.name}: {e}", highlight=False)
    return EXIT_TARGET if failed or unanswered else 0
