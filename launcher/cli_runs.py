"""The run commands as a person reads them: `launch runs`, `launch status RUN`, `launch logs RUN`,
and the summary printed after a run (cli.py's `launch`, attach and resume end with it).

Wherever a RUN is taken, a unique start of its id is enough, as with git's commits:
`launch status 20261201-2212` (resolve_run_argument, called once by cli.main)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher import job
from launcher.workspace import WorkspaceError
from launcher.runs import RunRecord, RunStore

# Train loss = the mean of the last 10 steps: one step is one noisy micro-batch, the test loss a whole split's mean.
TRAIN_MEAN_STEPS = 10  # (the demo: last step 0.036, last ten 0.121, test 0.182)
ACTIVE = ("starting", "running")


def resolve_run_argument(args: argparse.Namespace, store: RunStore) -> None:
    """args.run, a run id or a unique start of one, becomes the whole id (before any command
    looks the run up); an ambiguous or unknown one is a usage error naming the candidates."""
    if getattr(args, "run", None):
        args.run = store.resolve(args.run)


# ---------------------------------------------------------------------------------------------
# the summary after a run
# ---------------------------------------------------------------------------------------------


def _catalog_priced(machine: dict[str, Any]) -> bool:
    from launcher.providers import PROVIDERS

    provider = PROVIDERS.get(str(machine.get("provider")))
    return provider is not None and provider.price_source == "catalog"


def render_summary(console: Console, outcome: job.Outcome, machines: list[dict[str, Any]], spent: float) -> None:
    record = outcome.record
    console.rule("summary")
    colour = "green" if record.status == "done" else "red"
    console.print(f"run: {record.id}  target: {record.target}  folder: {outcome.run_dir}")
    console.print(f"status: [{colour}]{status_text(record)}[/] (exit code {record.exit_code})  "
                  f"steps: {record.step}/{record.total_steps}  time: {_duration(record.elapsed_s)}  "
                  f"spent: ${spent:.4f}")
    if record.error:
        console.print(f"error: {record.error}", highlight=False)
    if machines:
        catalog = [m["target"] for m in machines if _catalog_priced(m)]
        table = Table(title="machines", caption="$/h of " + ", ".join(catalog) + ": the catalog price (the cloud's "
                      "own bill may differ)" if catalog else None)
        for column in ("machine", "GPU", "region", "$/h", "time", "$", "ended"):
            table.add_column(column, justify="right" if column in ("$/h", "time", "$") else "left")
        for m in machines:
            table.add_row(m["target"], m["gpu"] or "-", m["region"] or "-", f"{m['usd_per_hour']:.3f}",
                          _duration(m["seconds"]), f"{m['usd']:.4f}", m["end_reason"] or "running")
        table.add_row("total", "", "", "", _duration(sum(m["seconds"] for m in machines)), f"{spent:.4f}", "")
        console.print(table)
    losses = Losses.of(outcome.run_dir)
    ev = outcome.evaluation
    if ev and ev.get("test_loss") is not None:
        train_label = f"train (last {losses.train_steps} steps)" if losses.train_steps > 1 else "train (last step)"
        table = Table(title="losses", caption=f"train: the mean of the last {losses.train_steps} steps' losses; "
                                              "validation: the last evaluation; test: over the whole test split")
        for column in ("", train_label, "validation", "test", "test perplexity"):
            table.add_column(column, justify="right")
        table.add_row("base model", "-", "-", f"{ev['base_test_loss']:.4f}", _fmt(ev.get("base_test_perplexity")))
        table.add_row("fine-tuned", _fmt(losses.train, 4), _fmt(losses.validation, 4), f"{ev['test_loss']:.4f}",
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
    if record.status in ("interrupted", "preempted", "stopped") and record.stop_reason != "budget":
        console.print(f"continue it with `launch resume {record.id}`")  # (a budget stop's error says how)


def status_text(record: RunRecord) -> str:
    """The status as `launch runs` shows it: `stopped: budget` says why a run stopped."""
    return f"{record.status}: {record.stop_reason}" if record.status == "stopped" and record.stop_reason else record.status


class Losses:
    """A run's losses as pulled here: the mean train loss of its last steps, its last validation."""

    def __init__(self, metrics: list[dict[str, Any]]) -> None:
        train = {m["step"]: m["loss"] for m in metrics if m.get("event") == "train" and m.get("loss") is not None}
        last = list(train.values())[-TRAIN_MEAN_STEPS:]
        self.train_steps = len(last)
        self.train: Optional[float] = sum(last) / len(last) if last else None
        evals = [m for m in metrics if m.get("event") == "eval" and m.get("eval_loss") is not None]
        self.validation: Optional[float] = evals[-1]["eval_loss"] if evals else None
        self.validation_step: Optional[int] = evals[-1].get("step") if evals else None

    @classmethod
    def of(cls, run_dir: Path) -> "Losses":
        return cls(job.read_metrics(run_dir))


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _usd(usd: float) -> str:
    """$ rounded as a person reads them: cents, or tenths of a cent under a dollar."""
    return f"${usd:.2f}" if usd == 0 or usd >= 1 else f"${usd:.3f}"


# ---------------------------------------------------------------------------------------------
# launch runs
# ---------------------------------------------------------------------------------------------


# The columns of `launch runs` a narrow terminal gives up first (the id, status and steps stay).
DROPPED_FIRST = ("GPU", "target", "checkpoint", "$", "elapsed")
FOLDED_MIN = 8  # a folding column (target, GPU) narrower than this is dropped instead


def cmd_runs(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    from launcher.budget import month_start, month_usd
    from launcher.renting import run_usd

    records = store.list(limit=args.limit)
    if args.json:  # a list, as it always was; each run with its $ so far
        console.print_json(json.dumps([{**asdict(r), "spent_usd": round(run_usd(store, r), 6)} for r in records]))
        return 0
    month = month_usd(store, month_start())
    columns: dict[str, list[str]] = {
        "id": [r.id for r in records],
        "status": [status_text(r) for r in records],
        "target": [r.target or "-" for r in records], "GPU": [r.gpu or "-" for r in records],
        "steps": [f"{r.step or 0}/{r.total_steps or '?'}" for r in records],
        "checkpoint": [newest_checkpoint(r) for r in records],
        "elapsed": [_duration(r.runner_seconds()) for r in records],
        "$": [f"{run_usd(store, r):.2f}" for r in records],
    }
    shown = fit_columns(columns, console.width)
    if shown is None:  # not even the ids fit in a table: one line each, never cut
        for r in records:
            console.print(f"{r.id} {r.status}", soft_wrap=True, highlight=False)
        return 0
    caption = (f"spent this month: {_usd(month)}; RUN: an id, or any unique start of one" if records
               else "no runs yet")
    table = Table(title="runs", caption=caption)
    for name in shown:
        folds = name in ("target", "GPU")
        table.add_column(name, justify="right" if name in ("steps", "elapsed", "$") else "left",
                         no_wrap=not folds, overflow="fold" if folds else "ellipsis",
                         min_width=max(map(len, columns["id"]), default=2) if name == "id" else None)
    for row in zip(*(columns[name] for name in shown)):
        table.add_row(*row)
    console.print(table)
    return 0


def newest_checkpoint(record: RunRecord) -> str:
    """Where the run's newest checkpoint lives, as the record knows it: `40 here`, `60 store`
    (the store's is newer than what was pulled), `40 here+store`, or `-`."""
    here, stored = record.pulled_step, record.stored_step
    if here is None and stored is None:
        return "-"
    if stored is None or (here is not None and here > stored):
        return f"{here} here"
    if here == stored:
        return f"{here} here+store"
    return f"{stored} store"


def fit_columns(columns: dict[str, list[str]], width: int) -> Optional[list[str]]:
    """The columns that fit in `width` with the id whole: empty columns (all '-') go first,
    then DROPPED_FIRST in order; None when the id alone does not fit."""
    def needed(name: str) -> int:
        widest = max([len(name), *map(len, columns[name])])
        return (min(widest, FOLDED_MIN) if name in ("target", "GPU") else widest) + 3  # padding and a border

    droppable = [n for n in DROPPED_FIRST if n in columns]
    empty = [n for n in droppable if columns[n] and all(cell == "-" for cell in columns[n])]
    shown = list(columns)
    for name in [*empty, *(n for n in droppable if n not in empty), "steps", "status"]:
        if sum(map(needed, shown)) + 1 <= width:
            return shown
        shown.remove(name)
    return shown if sum(map(needed, shown)) + 1 <= width else None


# ---------------------------------------------------------------------------------------------
# launch status
# ---------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    session = job.open_session(store, args.run)
    live: dict[str, Any] = {}
    if session.record.status in ACTIVE and session.workspace is not None:
        try:
            look = job.look(session)
            live = {"alive": look.alive, "exit_code": look.exit_code, "phase": look.status.get("phase"),
                    "step": look.status.get("step"), "total_steps": look.status.get("total_steps"),
                    "checkpoints_on_target": look.complete_steps}
        except WorkspaceError as e:
            live = {"unreachable": str(e)}
    if session.holds_rented_machine and session.machine is not None:
        # Is it still billing? The provider's word, whatever the run's record says.
        live["machine_state"] = session.provider.state(session.machine)
    live.update(look_in_store(session))
    from launcher.renting import machines_json, run_usd, spent

    machines = machines_json(store, session.record.id)
    if args.json:
        console.print_json(json.dumps({"run": asdict(session.record), "live": live, "machines": machines,
                                       "spent_usd": spent(store, session.record.id)}))
        return 0
    render_status(console, session.record, live, machines, run_usd(store, session.record))
    return 0


def look_in_store(session: job.Session) -> dict[str, Any]:
    """The run's checkpoints in its store, asked now (quick: a store that does not answer is said, not waited for)."""
    from launcher import storage

    try:
        listing = storage.stored_checkpoints(session.config, session.record.id, quick=True)
    except storage.StorageProblem as e:
        return {"store_unreachable": str(e)}
    if listing is None:
        return {}
    url, steps = listing
    return {"store": url, "checkpoints_in_store": steps}


def render_status(console: Console, record: RunRecord, live: dict[str, Any], machines: list[dict[str, Any]],
                  usd: float) -> None:
    """One run for a person: where it is, how it learns, what it costs, and what to type next.
    Plain `name  value` lines, never folded: a path or a command copied from them stays whole."""
    rows: list[tuple[str, str]] = [("status", _status_text(record, live))]
    step, total = live.get("step") or record.step, live.get("total_steps") or record.total_steps
    rows.append(("steps", f"{step or 0}/{total or '?'}" + (" (on the target, now)" if live.get("step") else "")))
    losses = Losses.of(Path(record.run_dir))
    if losses.train is not None:
        rows.append(("train loss", f"{losses.train:.4f} (the mean of the last {losses.train_steps} steps)"))
    if losses.validation is not None:
        rows.append(("validation loss", f"{losses.validation:.4f} (at step {losses.validation_step})"))
    evaluation = _read_json(Path(record.run_dir) / "eval.json") if record.status == "done" else None
    if evaluation and evaluation.get("test_loss") is not None:
        base = evaluation.get("base_test_loss")
        rows.append(("test loss", f"{evaluation['test_loss']:.4f}"
                     + (f" (the base model: {base:.4f})" if base is not None else "")))
    rows.append(("checkpoint", _checkpoint_text(record, live)))
    rows.append(("machine", f"{record.target or 'none rented yet'}, GPU: {record.gpu or '-'}"
                 + (f"; the provider says: {escape(str(live['machine_state']))}" if "machine_state" in live else "")))
    for m in machines:
        rows.append(("", f"{m['target']} {m['gpu'] or '-'} at ${m['usd_per_hour']:.3f}/h"
                         f"{' (catalog price)' if _catalog_priced(m) else ''} for "
                         f"{_duration(m['seconds'])}: {_usd(m['usd'])}, {m['end_reason'] or 'running'}"))
    rows.append(("time", _duration(record.runner_seconds()) + (" so far" if record.status in ACTIVE else "")))
    rows.append(("spent", _usd(usd) if usd or record.usd_per_hour or machines
                 else "$0 (your machine: --usd-per-hour prices its time)"))
    if record.error:
        rows.append(("error", f"[red]{escape(record.error)}[/]"))
    rows.append(("folder", escape(record.run_dir)))
    if (Path(record.run_dir) / "adapter").is_dir():
        rows.append(("adapter", escape(str(Path(record.run_dir) / "adapter"))))
    rows += [("next", command) for command in _next_commands(record, live)]
    console.print(f"[bold]run {record.id}[/]", highlight=False)
    for name, value in rows:
        console.print(f"  [bold]{name:<17}[/]{value}", soft_wrap=True, highlight=False)


def _checkpoint_text(record: RunRecord, live: dict[str, Any]) -> str:
    """Where the newest checkpoints are: here, on the target, in the store."""
    places = []
    if record.pulled_step is not None:
        places.append(f"checkpoint-{record.pulled_step} here")
    if live.get("checkpoints_on_target"):
        places.append(f"checkpoint-{live['checkpoints_on_target'][-1]} on the target")
    if live.get("checkpoints_in_store"):
        places.append(f"checkpoint-{live['checkpoints_in_store'][-1]} in {live['store']}")
    elif "store" in live:
        places.append(f"none yet in {live['store']}")
    elif "store_unreachable" in live:
        places.append(f"the store does not answer: {escape(live['store_unreachable'])}")
    elif record.stored_step is not None:
        places.append(f"checkpoint-{record.stored_step} in {record.store_url} (when last seen)")
    return "; ".join(places) or "none yet"


def _status_text(record: RunRecord, live: dict[str, Any]) -> str:
    code = f" (exit code {record.exit_code})" if record.exit_code is not None else ""
    colour = {"done": "green", "failed": "red", "running": "cyan", "starting": "cyan"}.get(record.status, "yellow")
    text = f"[{colour}]{record.status}[/]{code}"
    if record.status not in ACTIVE:
        return text
    if "unreachable" in live:
        return f"{text}; the target does not answer: {escape(live['unreachable'])}"
    if live and (live.get("exit_code") is not None or live.get("alive") is False):
        ended = f"exit code {live['exit_code']}" if live.get("exit_code") is not None else "no exit code"
        return f"{text}; the runner has ended on the target ({ended}), not yet recorded here"
    if live.get("phase"):
        return f"{text}: {live['phase']} (the runner's word, now)"
    return text


def _next_commands(record: RunRecord, live: dict[str, Any]) -> list[str]:
    run = record.id
    if record.status in ACTIVE:
        if live.get("exit_code") is not None or live.get("alive") is False:
            return [f"`launch attach {run}` records how it ended and pulls the results"]
        return [f"`launch attach {run}` follows it", f"`launch logs {run} -f` shows its log",
                f"`launch pull {run}` fetches its checkpoints now", f"`launch down {run}` stops it"]
    if record.status in ("preempted", "interrupted", "stopped"):
        return [f"`launch resume {run}` continues it from its newest checkpoint"]
    if record.status == "failed":
        return [f"`launch logs {run}` shows the runner's log"]
    if record.status == "done" and not (Path(record.run_dir) / "adapter").is_dir():
        return [f"`launch pull {run}` fetches the adapter and results"]
    return []


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------
# launch logs
# ---------------------------------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    session = job.open_session(store, args.run)
    local_log = session.run_dir / "runner.log"
    workspace = session.workspace
    if session.record.status not in ("starting", "running") or workspace is None:
        if not local_log.is_file():
            raise job.JobError(f"run {args.run} has no log here yet; `launch pull {args.run}` fetches it", 2)
        sys.stdout.write(local_log.read_text())
        return 0
    if not args.follow:
        sys.stdout.write(workspace.read("runner.log"))
        return 0
    state = {"done": False, "last": 0.0}

    def ended() -> bool:
        if time.monotonic() - state["last"] > job.POLL_S:
            state["last"] = time.monotonic()
            try:
                state["done"] = not job.look(session).running
            except WorkspaceError:
                pass
        return state["done"]

    for line in workspace.stream("runner.log", stop=ended):
        if line:
            print(line, flush=True)
    return 0
