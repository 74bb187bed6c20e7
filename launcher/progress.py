"""Live progress of a run: a rich progress bar on a terminal, plain lines elsewhere (CI logs,
pipes), both with step/total, loss, eval loss, tokens/s, ETA and $ spent so far."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from launcher.runs import RunRecord

PLAIN_LINES_PER_RUN = 20  # off a terminal: about this many progress lines for the whole run


class RichReporter:
    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.progress: Optional[Progress] = None
        self.task: Any = None
        self.fields = {"loss": "-", "eval": "-", "tps": "-", "usd": "0.00"}
        self.last_plain_step = -1
        self.rate = _Rate()

    # -- Reporter ---------------------------------------------------------------------------
    def phase(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]•[/] {text}", highlight=False)

    def warn(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/] {text}", highlight=False)

    def started(self, record: RunRecord) -> None:
        if self.quiet:
            return
        self.console.print(f"[dim]•[/] runner started on {record.target} (run {record.id}); Ctrl-C detaches, "
                           "the job keeps running", highlight=False)
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}  {task.fields[tps]} tok/s"),
                TimeRemainingColumn(), TextColumn("${task.fields[usd]}"), console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("training", total=None, **self.fields)

    def metric(self, event: dict[str, Any], total_steps: Optional[int], spent_usd: float) -> None:
        kind = event.get("event")
        step = event.get("step")
        self.fields["usd"] = f"{spent_usd:.2f}"
        if kind == "train":
            self.fields["loss"] = f"{event['loss']:.4f}"
            if event.get("tokens_per_s") is not None:
                self.fields["tps"] = f"{event['tokens_per_s']:.0f}"
            self.rate.add(step, event.get("time"))
        elif kind == "eval":
            self.fields["eval"] = f"{event['eval_loss']:.4f}"
        if self.quiet:
            return
        if kind == "stored":  # the runner uploaded a checkpoint to the run's store
            self.console.print(f"[dim]•[/] checkpoint-{step} is in the store", highlight=False)
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step or 0, total=total_steps, **self.fields)
            return
        self._plain(kind, step, total_steps, event)

    def checkpoint_pulled(self, step: int, path: Path) -> None:
        if not self.quiet:
            self.console.print(f"[dim]•[/] pulled checkpoint-{step} to {path.parent}", highlight=False)

    def stopped_following(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- off a terminal ---------------------------------------------------------------------
    def _plain(self, kind: Optional[str], step: Optional[int], total: Optional[int], event: dict[str, Any]) -> None:
        if kind == "train" and step is not None:
            every = max(1, (total or 100) // PLAIN_LINES_PER_RUN)
            if step - self.last_plain_step < every and step != total:
                return
            self.last_plain_step = step
            eta = self.rate.eta(step, total)
            self.console.print(
                f"step {step}/{total or '?'}  loss {self.fields['loss']}  eval {self.fields['eval']}  "
                f"{self.fields['tps']} tok/s  ETA {eta}  ${self.fields['usd']}", highlight=False)
        elif kind == "eval":
            self.console.print(f"step {step}/{total or '?'}  eval loss {self.fields['eval']}", highlight=False)
        elif kind == "resume":
            self.console.print(f"resumed at step {step}", highlight=False)


class _Rate:
    """Optimizer steps per second from the runner's own timestamps (not our receive times,
    which bunch up after a reconnect)."""

    def __init__(self) -> None:
        self.first: Optional[tuple[int, float]] = None
        self.last: Optional[tuple[int, float]] = None

    def add(self, step: Optional[int], when: Optional[float]) -> None:
        if step is None or when is None:
            return
        if self.first is None or step < self.first[0]:
            self.first = (step, when)
        self.last = (step, when)

    def eta(self, step: int, total: Optional[int]) -> str:
        if not (self.first and self.last and total) or self.last[0] <= self.first[0]:
            return "-"
        per_step = (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
        seconds = int(max(0, total - step) * per_step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))
