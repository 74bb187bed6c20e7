"""`launch`: argument parsing and rich rendering only; the work is in job.py.

    launch                                        # the embedded default: configs/tiny-cpu.yaml, here
    launch --config job.yaml --target ssh://me@gpu-box [--detach] [--yes]
    launch plan --config job.yaml [--gpu A10G]   # cli_plan.py
    launch export --colab --config job.yaml [--output FILE]   # cli_export.py: a Colab notebook
    launch runs | status RUN | logs RUN [-f] | attach RUN | resume RUN | pull RUN | down RUN

Errors are one line on stderr with an exit code per class (errors.py; tracebacks only with
--debug): 0 ok, 1 internal, 2 usage, 3 config, 4 data, 5 model, 6 out of memory (the runner's),
7 the environment (tools, bootstrap), 8 the target (unreachable, refused, out of disk), 9 no offer
fits, 130 Ctrl-C.
A failed or stopped run exits with the runner's own code (143: preempted)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm
from rich.table import Table

from launcher import __version__, clock, job, planning
from launcher.config import ConfigError, LaunchConfig, load as load_config
from launcher.paths import DEFAULT_CONFIG, find_config
from launcher.planning import ANY_GPU
from launcher.preflight import (
    PreflightReport, check_data, check_identity, check_model, check_packing, check_provider_settings, check_storage,
    check_target, check_tools, needed_disk_gb,
)
from launcher.cli_plan import (
    add_market_arguments, add_plan_arguments, cmd_plan, market_overrides, plan_rental, render_offers,
)
from launcher.cli_deploy import DEPLOY_COMMANDS, DESCRIPTIONS as DEPLOY_DESCRIPTIONS, add_deploy_arguments
from launcher.cli_deploy import cmd_chat, cmd_merge, cmd_push
from launcher.cli_export import DESCRIPTION as EXPORT_DESCRIPTION, add_export_arguments, cmd_export
from launcher.cli_providers import cmd_check, cmd_down_all
from launcher.cli_prune import DESCRIPTION as PRUNE_DESCRIPTION, add_prune_arguments, cmd_prune
from launcher.cli_runs import cmd_logs, cmd_runs, cmd_status, render_summary, resolve_run_argument
from launcher.errors import EXIT_ENVIRONMENT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TARGET, EXIT_USAGE, UsageError
from launcher.follow_lock import AlreadyFollowed, following
from launcher.progress import RichReporter
from launcher.remote import RemoteError
from launcher.runs import RunNotFound, RunRecord, RunStore
from launcher.sync import assets_bytes, local_assets

COMMANDS = ("plan", "check", "runs", "status", "logs", "attach", "resume", "pull", "down", *DEPLOY_COMMANDS, "export",
            "prune")


def launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch", description="QLoRA fine-tuning, launched from your laptop.",
        epilog="other commands: launch plan | check | runs | status RUN | logs RUN [-f] | attach RUN | resume RUN | pull RUN | "
               "down RUN | merge RUN | push RUN --repo user/name | chat RUN | export --colab --config job.yaml | prune   "
               "(launch COMMAND --help for each)")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"job YAML (default: the tiny CPU demo, {DEFAULT_CONFIG.name})")
    parser.add_argument("--target", default=None,
                        help="local (default), ssh://user@host[:port], user@host, or an ~/.ssh/config alias")
    add_market_arguments(parser)
    parser.add_argument("--no-recover", action="store_true",
                        help="a preempted rented machine ends the run (resumable) instead of moving to the next offer")
    parser.add_argument("--identity", default=None, help="SSH private key for the target (resources.ssh_identity)")
    parser.add_argument("--python", default=None,
                        help="an interpreter on the target that has the runner's packages (skips the venv)")
    parser.add_argument("--usd-per-hour", type=float, default=None,
                        help="what the target costs you per hour, for the $ spent (default 0 for own boxes)")
    parser.add_argument("--detach", action="store_true", help="start the job and return; follow it with attach")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask before starting")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: ./runs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"qlora-launch {__version__}")
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    descriptions = {
        "runs": "list recorded runs, newest first", "status": "one run's record (and a live look when running)",
        "logs": "the runner's log", "attach": "follow a running job again (resumes it if it died)",
        "resume": "continue an interrupted run from its newest checkpoint",
        "pull": "fetch checkpoints, metrics, logs and the adapter now", "down": "stop the job and release its machine",
        "check": "which providers are usable here (credentials), and the tools this machine needs, with the fix for each",
    }
    descriptions["plan"] = "price the whole job on every offer that can hold it, and pick the cheapest"
    descriptions.update(DEPLOY_DESCRIPTIONS, export=EXPORT_DESCRIPTION, prune=PRUNE_DESCRIPTION)
    parser = argparse.ArgumentParser(prog=f"launch {command}", description=descriptions[command])
    if command == "plan":
        add_plan_arguments(parser)
        return parser
    if command == "export":
        add_export_arguments(parser)
        return parser
    if command == "prune":
        add_prune_arguments(parser)
        parser.add_argument("--debug", action="store_true", help="show tracebacks")
        return parser
    if command in DEPLOY_COMMANDS:
        add_deploy_arguments(command, parser)
        parser.add_argument("--debug", action="store_true", help="show tracebacks")
        return parser
    if command == "down":
        parser.add_argument("run", nargs="?", help="run id (see `launch runs`)")
        parser.add_argument("--all", action="store_true",
                            help="every machine labelled by us on every provider that can list them, known to the "
                                 "run records or not")
        parser.add_argument("--yes", "-y", action="store_true", help="do not ask before destroying")
    elif command not in ("runs", "check"):
        parser.add_argument("run", help="run id, or a unique prefix of one (see `launch runs`)")
    if command in ("runs", "status", "pull", "check"):
        parser.add_argument("--json", action="store_true", help="print JSON")
    if command == "logs":
        parser.add_argument("-f", "--follow", action="store_true", help="keep printing as the runner writes")
    if command == "resume":
        parser.add_argument("--max-total", type=float, default=None, metavar="USD",
                            help="a new cap for the whole run, what it already cost included (resources.max_total_usd)")
        add_move_arguments(parser)
    if command == "runs":
        parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def add_move_arguments(parser: argparse.ArgumentParser) -> None:
    """`launch resume RUN --target T | --providers P`: continue the run on another machine."""
    moving = parser.add_argument_group("resume on another machine (its newest checkpoint comes from the run's "
                                       "store, or from this machine)")
    target = moving.add_mutually_exclusive_group()
    target.add_argument("--target", default=None, help="your own machine: local, ssh://user@host[:port], an alias")
    target.add_argument("--providers", default=None,
                        help="rent the cheapest fitting offer on these providers (comma-separated, e.g. aws,gcp)")
    moving.add_argument("--identity", default=None, help="SSH private key for --target")
    moving.add_argument("--python", default=None, help="an interpreter on --target that has the runner's packages")
    moving.add_argument("--usd-per-hour", type=float, default=None, help="what --target costs you per hour")


def move_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The resources a resume elsewhere overrides; {} when it stays where it is."""
    if args.target is None and args.providers is None:
        for flag, value in (("--identity", args.identity), ("--python", args.python),
                            ("--usd-per-hour", args.usd_per_hour)):
            if value is not None:
                raise UsageError(f"{flag} goes with --target (resume on your own machine); add --target, or drop it")
        return {}
    if args.providers is not None:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        return {"providers": providers, "target": None}
    return {"target": args.target, "ssh_identity": args.identity, "python": args.python,
            "usd_per_hour": args.usd_per_hour, "providers": None}


def main(argv: Optional[list[str]] = None, console: Optional[Console] = None,
         errors: Optional[Console] = None) -> int:
    import signal
    import threading

    # Ctrl-C detaches however we were started. A background job of a non-interactive shell
    # (`launch ... &` in a script, a CI step) starts with SIGINT ignored, and Python then leaves
    # it ignored: Ctrl-C or `kill -INT` would never reach us, and we would follow to the end.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = sys.argv[1:] if argv is None else argv
    console = console or Console()
    errors = errors or Console(stderr=True, soft_wrap=True)  # one error, one line: never wrapped
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = (command_parser(command) if command else launch_parser()).parse_args(argv[1:] if command else argv)
    try:
        store = open_state()
    except UsageError as e:
        return _fail(errors, e, EXIT_ENVIRONMENT, args.debug)
    try:
        if command is None:
            return cmd_launch(args, store, console, errors)
        resolve_run_argument(args, store)  # a unique start of a run id names that run, for every command
        return COMMAND_FUNCTIONS[command](args, store, console, errors)
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
    except (ConfigError, UsageError, job.JobError, planning.PlanError, AlreadyFollowed) as e:
        return _fail(errors, e, e.exit_code, args.debug)
    except RunNotFound as e:
        return _fail(errors, e, EXIT_USAGE, args.debug)
    except RemoteError as e:
        return _fail(errors, e, EXIT_TARGET, args.debug)
    except Exception as e:  # noqa: BLE001  (classify, one line; the traceback under --debug)
        return _fail(errors, RuntimeError(f"internal error: {type(e).__name__}: {e} (rerun with --debug)"),
                     EXIT_INTERNAL, args.debug)
    finally:
        store.close()


def open_state() -> RunStore:
    """The run records, in a state directory we can write (else one line saying where it is)."""
    import sqlite3

    from launcher.runs import state_dir

    try:
        return RunStore.default()
    except (OSError, sqlite3.Error) as e:
        raise UsageError(f"cannot keep run records in {state_dir()} ({getattr(e, 'strerror', None) or e}); set "
                         "QLORA_LAUNCH_HOME (or XDG_STATE_HOME) to a folder you can write") from None


def writable_folder(path: Path, flag: str) -> None:
    """`path` is a folder we can write in, or could be made one, or one UsageError naming `flag`.

    Nothing is created here: a refused job leaves no folder behind. The nearest part of the path
    that exists must be a folder this user may write (os.access: root passes it, as root may)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        why = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = "Permission denied"
    else:
        return
    raise UsageError(f"{flag} {path}: cannot write there ({why}: {existing}); pass {flag} a folder you can write")


def _fail(errors: Console, e: BaseException, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    errors.print(f"[red]error:[/] {escape(str(e))}", markup=True, highlight=False)  # the message's [..] are text
    return code


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------


def cmd_launch(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    config_path = find_config(args.config) if args.config else DEFAULT_CONFIG
    if not config_path.is_file():
        raise UsageError(f"config file {config_path} not found; pass --config PATH")
    if args.config is None and not args.json:
        console.print(f"No --config given: running the embedded default, [bold]{config_path}[/]")
    overrides = {"target": args.target, "ssh_identity": args.identity, "python": args.python,
                 "usd_per_hour": args.usd_per_hour, "recover": False if args.no_recover else None,
                 **market_overrides(args)}
    config = load_config(config_path, overrides)
    writable_folder(args.runs_dir, "--runs-dir")
    renting = config.resources.target is None and wants_a_rented_machine(config)
    refuse_unused_market_flags(config, args, renting)
    # What this machine can check costs nothing and comes first: no run record for a typo. The
    # plan counts the examples' lengths, so the data is read before planning.
    report = PreflightReport()
    plan = None
    if renting:
        check_tools(report, needs_ssh=True)
        check_provider_settings(report, config)
    check_identity(report, config)
    check_data(report, config)
    check_model(report, config, runs_here=not renting and (config.resources.target or "local") == "local")
    check_packing(report, config)
    if report.errors:
        return _print_errors(errors, report)
    if renting:
        plan = plan_rental(config, store, errors, report.example_tokens)
    session = _create_session(config, args, store, plan)
    report = preflight(config, session, report, tools_checked=renting)
    for finding in report.findings:
        if finding.level == "warning" and not args.json:
            errors.print(f"[yellow]warning:[/] {finding.message}", highlight=False)
    if report.errors:
        session.update(status="failed", error=report.errors[0].message, exit_code=report.exit_code,
                       ended_at=clock.now())
        if session.machine is not None:
            session.machine.close()
        return _print_errors(errors, report)
    if report.gpus:
        session.update(gpu=_gpu_summary(report.gpus))
    if plan is not None:
        if not args.json:
            render_offers(console, plan, limit=5)
            console.print(f"run {session.record.id}: renting the first of these that comes up "
                          f"({session.provider.max_offers_tried} tried at most); results in {session.run_dir}")
    elif not args.json:
        render_plan(console, config, session.record, report)
    # The embedded demo (no --config) costs nothing and is what a first `launch` is for: no question.
    ask = not args.yes and args.config is not None and sys.stdin.isatty()
    if ask and not Confirm.ask("Start?", console=console, default=True):
        session.update(status="stopped", error="not started: declined at the prompt", ended_at=clock.now())
        return 0
    reporter = RichReporter(console, quiet=args.json)
    try:
        with following(session.record.id):
            outcome = job.launch(session, reporter, detach=args.detach, candidates=plan.candidates if plan else None)
    except KeyboardInterrupt:
        reporter.stopped_following()
        return _interrupted(errors, store, session.record.id)
    return _report_outcome(console, outcome, args.json, store)


def _print_errors(errors: Console, report: PreflightReport) -> int:
    for finding in report.errors:
        errors.print(f"[red]error:[/] {finding.message}", highlight=False)
    return report.exit_code


def wants_a_rented_machine(config: LaunchConfig) -> bool:
    """No target named: rent when a GPU, a provider or a market is asked for (by the YAML or the
    flags, which override it), or when the job trains on a GPU; a CPU job without any of these,
    or `providers: [local]`, runs here."""
    r = config.resources
    named = list(r.providers or [])
    if named and set(named) <= {"local"}:  # providers: [local] (the tiny config) means this machine
        return False
    gpu = r.gpu if r.gpu and r.gpu.lower() != ANY_GPU else None
    return bool(gpu or named or r.interruptible is not None or config.job.train.device != "cpu")


def refuse_unused_market_flags(config: LaunchConfig, args: argparse.Namespace, renting: bool) -> None:
    """A flag that would not change anything is a mistake to say, not to ignore: market flags on a
    job that rents nothing, --gpu on a job that trains on the CPU."""
    given = [flag for flag, value in (("--gpu", args.gpu), ("--max-price", args.max_price),
                                      ("--spot", args.spot or None),
                                      ("--on-demand", args.on_demand or None),
                                      ("--managed", args.managed or None)) if value is not None]
    if args.gpu and args.gpu.lower() != ANY_GPU and config.job.train.device == "cpu":
        raise UsageError(f"--gpu {args.gpu}: this job trains on the CPU (train.device: cpu in {config.path.name}); "
                         "set train.device: auto to train on a GPU, or drop --gpu")
    if given and not renting:
        where = (f"--target {config.resources.target}" if config.resources.target else
                 f"resources.providers: [local] in {config.path.name}")
        raise UsageError(f"{', '.join(given)} only choose a machine to rent, and this job rents none ({where}); "
                         "drop the flag, or drop the target to rent one")
    if args.max_total is not None and not renting and not config.resources.usd_per_hour:
        raise UsageError(f"--max-total {args.max_total:g}: this job runs on your own machine, which costs $0/h as far "
                         "as the launcher knows; give its price with --usd-per-hour (resources.usd_per_hour) for the "
                         "cap to count, or drop --max-total")


def _create_session(config: LaunchConfig, args: argparse.Namespace, store: RunStore,
                    plan: Optional[planning.Plan]) -> job.Session:
    try:
        if plan is not None:
            return job.create_run(config, args.runs_dir, store, planned_provider=plan.candidates[0].provider)
        return job.create_run(config, args.runs_dir, store, target=config.resources.target or "local")
    except ValueError as e:  # a malformed --target
        raise UsageError(str(e)) from None


def preflight(config: LaunchConfig, session: job.Session, report: PreflightReport,
              tools_checked: bool) -> PreflightReport:
    """The rest of the checks before anything costs; `report` holds the data and model checked
    here already (and the tools, for a rented launch: `tools_checked`)."""
    if not tools_checked:
        check_tools(report, needs_ssh=not (session.machine is not None and session.machine.is_this_machine))
    check_storage(report, config)
    if not report.errors and session.machine is not None:  # touch the target only when all is right here
        workdir = config.resources.workdir or session.provider.default_workdir()
        need = needed_disk_gb(config, assets_bytes(local_assets(config)), has_python=bool(config.resources.python)
                              or session.machine.is_this_machine)
        check_target(report, session.machine, workdir, need, needs_gpu=config.job.train.device != "cpu")
    return report


def _gpu_summary(names: list[str]) -> str:
    """['NVIDIA A10G', 'NVIDIA A10G'] -> '2x NVIDIA A10G'."""
    counts = {name: names.count(name) for name in dict.fromkeys(names)}
    return ", ".join(f"{n}x {name}" if n > 1 else name for name, n in counts.items())


def render_plan(console: Console, config: LaunchConfig, record: RunRecord, report: PreflightReport) -> None:
    table = Table(title=f"plan for run {record.id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("config", str(config.path))
    table.add_row("target", record.target)
    table.add_row("GPU", _gpu_summary(report.gpus) if report.gpus else "none (CPU)")
    python = config.resources.python or ("this Python, when it has the runner's packages; else a venv"
                                         if record.provider == "local" else
                                         "a venv keyed by runner/requirements.txt (built once, then reused)")
    table.add_row("python", python)
    table.add_row("data", f"{report.examples} examples" if report.examples is not None else "read on the target")
    table.add_row("steps", str(report.planned_steps or "?"))
    table.add_row("time", "measured once training starts (estimates arrive with planning)")
    table.add_row("price", f"${record.usd_per_hour:.2f}/h" if record.usd_per_hour else "$0 (your machine)")
    if report.free_disk_gb is not None:
        table.add_row("disk", f"{report.free_disk_gb} GB free, about {report.needed_disk_gb} GB needed")
    table.add_row("results", record.run_dir)
    console.print(table)


def _interrupted(errors: Console, store: RunStore, run_id: str) -> int:
    """Ctrl-C: ask nothing; say exactly what is still running and how to reach it."""
    record = store.get(run_id)
    if record.status == "running":
        errors.print(f"[yellow]detached:[/] run {run_id} is still running on {record.target}; "
                     f"`launch attach {run_id}` follows it, `launch down {run_id}` stops it", highlight=False)
    else:
        errors.print(f"[yellow]interrupted:[/] run {run_id} is {record.status}; nothing is running", highlight=False)
    return EXIT_INTERRUPTED


def _report_outcome(console: Console, outcome: job.Outcome, as_json: bool, store: RunStore) -> int:
    from launcher.renting import machines_json, run_usd

    machines = machines_json(store, outcome.record.id)
    spent = run_usd(store, outcome.record)
    if as_json:
        console.print_json(json.dumps({"run": asdict(outcome.record), "detached": outcome.detached,
                                       "evaluation": outcome.evaluation, "machines": machines, "spent_usd": spent}))
        return outcome.exit_code
    if outcome.detached:
        console.print(f"started run [bold]{outcome.record.id}[/] on {outcome.record.target}, detached: "
                      f"`launch attach {outcome.record.id}` follows it, `launch logs {outcome.record.id} -f` "
                      "shows its log")
        return 0
    render_summary(console, outcome, machines, spent)
    return outcome.exit_code


# ---------------------------------------------------------------------------------------------
# the run commands
# ---------------------------------------------------------------------------------------------


def cmd_attach(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    return _drive(job.attach, args, store, console, errors)


def cmd_resume(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    if args.max_total is not None and args.max_total <= 0:
        raise UsageError(f"--max-total {args.max_total:g}: a cap is a positive number of dollars for the whole run")
    overrides = move_overrides(args)
    if overrides:
        if args.max_total is not None:
            overrides["max_total_usd"] = args.max_total
        return _drive(lambda session, reporter: job.resume_elsewhere(session, reporter, overrides), args, store,
                      console, errors)
    return _drive(lambda session, reporter: job.resume(session, reporter, max_total_usd=args.max_total), args, store,
                  console, errors)


def _drive(action: Any, args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    reporter = RichReporter(console)
    with following(args.run):  # before the session: a second follower is told, and touches nothing
        session = job.open_session(store, args.run, log=reporter.warn)
        try:
            outcome = action(session, reporter)
        except KeyboardInterrupt:
            reporter.stopped_following()
            return _interrupted(errors, store, session.record.id)
        return _report_outcome(console, outcome, False, store)


def cmd_pull(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    session = job.open_session(store, args.run)
    steps = job.pull(session, RichReporter(console, quiet=args.json))
    if args.json:
        console.print_json(json.dumps({"run": args.run, "folder": str(session.run_dir), "checkpoints": steps}))
    else:
        held = ", ".join(f"checkpoint-{s}" for s in steps) or "no checkpoints yet"
        console.print(f"pulled into {session.run_dir}: {held}")
    return 0


def cmd_down(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    if args.all:
        return cmd_down_all(args, store, console, errors)
    if not args.run:
        raise UsageError("which run? `launch down RUN` (see `launch runs`), or `launch down --all`")
    reporter = RichReporter(console)
    session = job.open_session(store, args.run, log=reporter.warn)
    record = job.down(session, reporter)
    console.print(f"run {record.id}: {record.status}; files in {record.run_dir}"
                  + (f"; `launch resume {record.id}` continues it" if record.status == "stopped" else ""))
    return 0


COMMAND_FUNCTIONS = {"plan": cmd_plan, "check": cmd_check, "runs": cmd_runs, "status": cmd_status, "logs": cmd_logs,
                     "attach": cmd_attach, "resume": cmd_resume, "pull": cmd_pull, "down": cmd_down,
                     "merge": cmd_merge, "push": cmd_push, "chat": cmd_chat, "export": cmd_export, "prune": cmd_prune}


if __name__ == "__main__":
    sys.exit(main())
