"""The run commands as a person reads them: `launch runs`, `launch status RUN`, `launch logs RUN`,
and the summary printed after a run (cli.py's `launch`, attach and resume end with it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from launcher import job
from launcher.remote import RemoteError
from launcher.runs import RunStore


def render_summary(console: Console, outcome: job.Outcome, machines: list[dict[str, Any]], spent: float) -> None:
    record = outcome.record
    console.rule("summary")
    colour = "green" if record.status == "done" else "red"
    console.print(f"run: {record.id}  target: {record.target}  folder: {outcome.run_dir}")
    console.print(f"status: [{colour}]{record.status}[/] (exit code {record.exit_code})  "
                  f"steps: {record.step}/{record.total_steps}  time: {_duration(record.elapsed_s)}  "
                  f"spent: ${spent:.4f}")
    if record.error:
        console.print(f"error: {record.error}", highlight=False)
    if machines:
        table = Table(title="machines")
        for column in ("machine", "GPU", "region", "$/h", "time", "$", "ended"):
            table.add_column(column, justify="right" if column in ("$/h", "time", "$") else "left")
        for m in machines:
            table.add_row(m["target"], m["gpu"] or "-", m["region"] or "-", f"{m['usd_per_hour']:.3f}",
                          _duration(m["seconds"]), f"{m['usd']:.4f}", m["end_reason"] or "running")
        table.add_row("total", "", "", "", _duration(sum(m["seconds"] for m in machines)), f"{spent:.4f}", "")
        console.print(table)
    metrics = job.read_metrics(outcome.run_dir)
    final_train = next((m["loss"] for m in reversed(metrics) if m.get("event") == "train"), None)
    final_eval = next((m["eval_loss"] for m in reversed(metrics) if m.get("event") == "eval"), None)
    ev = outcome.evaluation
    if ev and ev.get("test_loss") is not None:
        table = Table(title="losses")
        for column in ("", "train", "validation", "test", "test perplexity"):
            table.add_column(column, justify="right")
        table.add_row("base model", "-", "-", f"{ev['base_test_loss']:.4f}", _fmt(ev.get("base_test_perplexity")))
        table.add_row("fine-tuned", _fmt(final_train, 4), _fmt(final_eval, 4), f"{ev['test_loss']:.4f}",
                      _fmt(ev.get("test_perplexity")))
        console.print(table)
    if outcome.samples:
        table = Table(title="samples (held-out prompts)", show_lines=True)
        for column in ("prompt", "reference", "before", "after"):
            table.add_column(column, overflow="fold")
        for s in outcome.samples:
            table.add_row(" ".join(s["prompt"].split()), s["reference"], s["before"], s["after"])
        console.print(table)
    for name, label in (("adapter", "adapter"), ("loss.png", "loss curve"), ("checkpoints", "checkpoints")):
        if (outcome.run_dir / name).exists():
            console.print(f"{label}: {outcome.run_dir / name}")
    if record.status in ("interrupted", "preempted", "stopped"):
        console.print(f"continue it with `launch resume {record.id}`")


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def cmd_runs(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    records = store.list(limit=args.limit)
    if args.json:
        console.print_json(json.dumps([asdict(r) for r in records]))
        return 0
    table = Table(title="runs")
    for column in ("id", "status", "target", "GPU", "steps", "elapsed", "$"):
        table.add_column(column, justify="right" if column in ("steps", "elapsed", "$") else "left")
    from launcher.renting import run_usd

    for r in records:
        table.add_row(r.id, r.status, r.target, r.gpu or "-", f"{r.step or 0}/{r.total_steps or '?'}",
                      _duration(r.runner_seconds()), f"{run_usd(store, r):.2f}")
    console.print(table)
    return 0


def cmd_status(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    session = job.open_session(store, args.run)
    live: dict[str, Any] = {}
    if session.record.status in ("starting", "running") and session.record.remote_dir:
        try:
            look = job.probe(session)
            live = {"alive": look.alive, "exit_code": look.exit_code, "phase": look.status.get("phase"),
                    "step": look.status.get("step"), "total_steps": look.status.get("total_steps"),
                    "checkpoints_on_target": look.complete_steps}
        except RemoteError as e:
            live = {"unreachable": str(e)}
    if session.holds_rented_machine:
        # Is it still billing? The provider's word, whatever the run's record says.
        live["machine_state"] = session.provider.state(session.machine)
    from launcher.renting import machines_json, spent

    machines = machines_json(store, session.record.id)
    if args.json:
        console.print_json(json.dumps({"run": asdict(session.record), "live": live, "machines": machines,
                                       "spent_usd": spent(store, session.record.id)}))
        return 0
    table = Table(title=f"run {session.record.id}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in asdict(session.record).items():
        if value is not None and key not in ("created_at", "updated_at", "ended_at", "started_at"):
            table.add_row(key, str(value))
    for key, value in live.items():
        table.add_row(f"live {key}", str(value))
    for m in machines:
        table.add_row("machine", f"{m['target']} {m['gpu'] or ''} ${m['usd_per_hour']:.3f}/h, "
                                 f"{_duration(m['seconds'])}, ${m['usd']:.4f}, {m['end_reason'] or 'running'}")
    console.print(table)
    return 0


def cmd_logs(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    session = job.open_session(store, args.run)
    local_log = session.run_dir / "runner.log"
    if session.record.status not in ("starting", "running") or not session.record.remote_dir:
        if not local_log.is_file():
            raise job.JobError(f"run {args.run} has no log here yet; `launch pull {args.run}` fetches it", 2)
        sys.stdout.write(local_log.read_text())
        return 0
    path = f"{session.remote_dir}/runner.log"
    if not args.follow:
        sys.stdout.write(session.machine.run(f"cat {path} 2>/dev/null || true").stdout)
        return 0
    state = {"done": False, "last": 0.0}

    def ended() -> bool:
        if time.monotonic() - state["last"] > job.POLL_S:
            state["last"] = time.monotonic()
            try:
                look = job.probe(session)
                state["done"] = look.exit_code is not None or not look.alive
            except RemoteError:
                pass
        return state["done"]

    for line in session.machine.follow(path, stop=ended):
        if line:
            print(line, flush=True)
    return 0
