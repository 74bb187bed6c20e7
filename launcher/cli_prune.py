"""`launch prune [--target T] [--yes]`: list what your own machine keeps between runs (venvs,
assets, run folders), why each is kept or can go, and what removing the rest frees
(launcher/prune.py decides). Without --yes it only shows; nothing is removed on a guess."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from launcher import job, prune
from launcher.providers import provider_for_target
from launcher.runs import RunStore

DESCRIPTION = ("what your own machine keeps between runs (venvs, model and data assets, run folders), and removing "
               "what no run needs; shows only, unless --yes")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="local",
                        help="local (default), ssh://user@host[:port], user@host, or an ~/.ssh/config alias")
    parser.add_argument("--identity", default=None, help="SSH private key for the target")
    parser.add_argument("--workdir", default=None, help="the launcher's folder there (resources.workdir; default: "
                                                        "the target's, e.g. ~/qlora-launch)")
    parser.add_argument("--yes", "-y", action="store_true", help="remove what no run needs")
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_prune(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    provider = provider_for_target(args.target)
    machine = job.own_machine(provider, job.machine_spec("prune", args.identity))
    try:
        workdir = args.workdir or provider.default_workdir()
        records = [r for r in store.list(limit=100000) if r.target in (args.target, machine.name)]
        entries = prune.survey(machine, workdir, records)
        removable = [e for e in entries if e.kept_because is None]
        freed_mb = sum(e.kb for e in removable) / 1024
        if args.yes:
            prune.remove(machine, workdir, removable)
    finally:
        machine.close()
    if args.json:
        console.print_json(json.dumps({"target": args.target, "workdir": workdir, "removed": bool(args.yes),
                                       "entries": [{**asdict(e), "path": e.path} for e in entries],
                                       "removable_mb": round(freed_mb, 1)}))
        return 0
    if not entries:
        console.print(f"{args.target}: nothing kept in {workdir}")
        return 0
    table = Table(title=f"{args.target}: {workdir}", title_justify="left")
    for column in ("kind", "name", "MB", "kept because"):
        table.add_column(column, justify="right" if column == "MB" else "left")
    for e in entries:
        table.add_row(e.kind, e.name, f"{e.kb / 1024:.1f}", e.kept_because or
                      ("[red]removed[/]" if args.yes else "[yellow]no run needs it[/]"))
    console.print(table)
    if args.yes:
        console.print(f"removed {len(removable)}, freed {freed_mb:.1f} MB")
    elif removable:
        target = "" if args.target == "local" else f" --target {args.target}"
        console.print(f"{len(removable)} can go, freeing {freed_mb:.1f} MB: `launch prune{target} --yes`")
    else:
        console.print("every one is needed by a run")
    return 0
