"""Putting a finished run's model to use: `launch merge RUN`, `launch push RUN --repo user/name`,
`launch chat RUN`. Arguments and rendering only; the work is in merge.py, hub_push.py
(model_card.py) and chat.py, which import torch & co. only when a command runs, so `launch
--help` stays light. Progress goes to stderr: stdout is the result (a path, a URL, an answer)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from launcher.errors import UsageError
from launcher.runs import RunStore

DEPLOY_COMMANDS = ("merge", "push", "chat")
DESCRIPTIONS = {
    "merge": "merge the run's adapter into its base model (unquantized) and save a standard model folder",
    "push": "upload the run's adapter (or merged model) to the Hugging Face Hub with a model card",
    "chat": "talk to the run's model (base + adapter) in the prompt format it was trained on",
}


def add_deploy_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    from runner.merge_adapter import DEFAULT_DTYPE, DTYPES

    parser.add_argument("run", help="run id, or a unique prefix of one (see `launch runs`)")
    if command == "merge":
        parser.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE,
                            help=f"of the merged weights (default {DEFAULT_DTYPE})")
        parser.add_argument("--out", type=Path, default=None, help="where to save it (default: <run folder>/merged)")
        parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
        parser.add_argument("--remote", action="store_true",
                            help="merge on the run's machine (while it is up), then fetch the result here")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
    elif command == "push":
        parser.add_argument("--repo", required=True, help="the Hub repo: user/name or org/name (created if absent)")
        parser.add_argument("--merged", action="store_true",
                            help="push the merged model `launch merge` wrote instead of the adapter")
        parser.add_argument("--private", action="store_true", help="create the repo private")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
    else:
        parser.add_argument("--prompt", default=None, help="answer this one prompt on stdout and exit")
        parser.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default 256)")


def cmd_merge(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    from launcher import merge

    log = _progress(errors)
    if args.remote:
        from launcher import job

        session = job.open_session(store, args.run, log=log)
        result = merge.merge_remote(session, args.dtype, args.out, args.force, log)
    else:
        result = merge.merge_here(store.get(args.run), args.dtype, args.out, args.force, log)
    if args.json:
        console.print_json(json.dumps(result))
    else:
        console.print(f"merged model ({result['dtype']}, {result['parameters']:,} parameters, "
                      f"{result['bytes'] / 1e6:.1f} MB, {result['seconds']:.0f} s on the {result['device']}): "
                      f"{result['out']}", highlight=False, soft_wrap=True)
    return 0


def cmd_push(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    from launcher.deploy import run_model
    from launcher.hub_push import push
    from launcher.model_card import run_facts
    from launcher.renting import run_usd

    record = store.get(args.run)
    model = run_model(record)
    facts = run_facts(model, record.step, record.gpu, record.elapsed_s or 0.0, run_usd(store, record))
    result = push(model, facts, args.repo, args.merged, args.private, _progress(errors))
    if args.json:
        console.print_json(json.dumps(result))
    else:
        console.print(f"pushed {'the merged model' if args.merged else 'the adapter'} of run {record.id} "
                      f"({len(result['files'])} files, license: {result['license']}): {result['url']}",
                      highlight=False, soft_wrap=True)
    return 0


def cmd_chat(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    from launcher import chat
    from launcher.deploy import run_model

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    max_new = args.max_new_tokens or chat.DEFAULT_MAX_NEW_TOKENS
    model = run_model(store.get(args.run))
    log = _progress(errors)
    peft_model, tokenizer = chat.load(model, log)
    if args.prompt is not None:
        prompt = chat.build_prompt(model.job, tokenizer, args.prompt, [])
        log(f"prompt format: {prompt.kind}")
        chat.answer(peft_model, tokenizer, prompt, max_new, sys.stdout)
        return 0
    log(f"prompt format: {chat.build_prompt(model.job, tokenizer, '', []).kind}")
    chat.converse(peft_model, tokenizer, model, max_new)
    return 0


def _progress(errors: Console):
    return lambda text: errors.print(text, highlight=False, markup=False)
