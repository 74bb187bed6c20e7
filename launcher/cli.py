"""`launch`: argument parsing and rich rendering only; the work is in local_run.py.

    launch                                   # the embedded default: configs/tiny-cpu.yaml, here
    launch --config configs/tiny-cpu.yaml    # a job on the local target

This milestone runs jobs on the local target only; remote targets, planning and the run
commands (runs, status, attach, resume, pull, down) arrive with the next ones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from launcher import __version__
from launcher.local_run import LocalTargetError, RunResult, run_locally
from launcher.paths import DEFAULT_CONFIG, RUNNER_FILE
from launcher.runs import RunStore

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="QLoRA fine-tuning, launched from your laptop.")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"job YAML (default: the tiny CPU demo, {DEFAULT_CONFIG.name})")
    parser.add_argument("--target", default="local", choices=["local"],
                        help="where to train (only 'local' in this version)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: ./runs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"qlora-launch {__version__}")
    return parser


def main(argv: Optional[list[str]] = None, console: Optional[Console] = None,
         errors: Optional[Console] = None) -> int:
    console = console or Console()
    errors = errors or Console(stderr=True, soft_wrap=True)  # one error, one line: never wrapped
    args = build_parser().parse_args(argv)
    config = args.config or DEFAULT_CONFIG
    if not config.is_file():
        errors.print(f"[red]error:[/] config file {config} not found; pass --config PATH")
        return EXIT_USAGE
    if args.config is None:
        console.print(f"No --config given: running the embedded default, [bold]{config}[/]")
    # Validate with the runner's own schema before anything starts (no torch needed for this).
    sys.path.insert(0, str(RUNNER_FILE.parent))
    import qlora_runner

    try:
        qlora_runner.load_config(config)
    except qlora_runner.RunnerError as e:
        errors.print(f"[red]{e.kind}:[/] {e}")
        return e.exit_code
    console.rule(f"[bold]qlora-launch[/] {config} on the local target")
    try:
        result = run_locally(config.resolve(), args.runs_dir.resolve(), RunStore.default(), debug=args.debug)
    except LocalTargetError as e:
        errors.print(f"[red]error:[/] {e}")
        return qlora_runner.EXIT_ENVIRONMENT
    render_summary(console, result)
    return result.exit_code


def render_summary(console: Console, result: RunResult) -> None:
    console.rule("summary")
    phase = result.status.get("phase", "unknown")
    colour = "green" if phase == "done" else "red"
    console.print(f"run: {result.run_dir.name}  folder: {result.run_dir}")
    console.print(f"status: [{colour}]{phase}[/] (exit code {result.exit_code})")
    if result.status.get("error"):
        console.print(f"error: {result.status['error']}")
    ev = result.evaluation
    if ev and ev.get("test_loss") is not None:
        table = Table(title="test split")
        table.add_column("")
        table.add_column("loss", justify="right")
        table.add_column("perplexity", justify="right")
        table.add_row("base model", f"{ev['base_test_loss']:.4f}", _fmt(ev.get("base_test_perplexity")))
        table.add_row("fine-tuned", f"{ev['test_loss']:.4f}", _fmt(ev.get("test_perplexity")))
        console.print(table)
    if result.samples:
        table = Table(title="samples (held-out prompts)", show_lines=True)
        for column in ("prompt", "reference", "before", "after"):
            table.add_column(column, overflow="fold")
        for s in result.samples:
            table.add_row(" ".join(s["prompt"].split()), s["reference"], s["before"], s["after"])  # one line per prompt
        console.print(table)
    if (result.run_dir / "adapter").is_dir():
        console.print(f"adapter: {result.run_dir / 'adapter'}")


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
