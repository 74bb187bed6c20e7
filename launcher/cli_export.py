"""`launch export --colab --config job.yaml [--output FILE]`: the job as a notebook to run
elsewhere (colab.py writes it). Arguments and rendering only; nothing heavy is imported."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from launcher.colab import EMBED_LIMIT_BYTES, GPU_TYPES, export_colab
from launcher.config import load as load_config
from launcher.errors import UsageError
from launcher.paths import find_config
from launcher.runs import RunStore

DESCRIPTION = ("write the job as a notebook for a free GPU elsewhere: --colab, a Google Colab notebook that "
               "installs the runner, carries the config and small data, keeps the run folder on Google Drive "
               "and resumes there after a disconnect")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--colab", action="store_true", help="a Google Colab notebook (the only kind so far)")
    parser.add_argument("--config", type=Path, required=True, help="job YAML, or the name of a ready config")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="the notebook to write (default: <config name>-colab.ipynb here)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    parser.add_argument("--gpu", choices=GPU_TYPES, default="T4",
                        help="the runtime's GPU in the notebook's metadata (default T4, Colab's free one)")
    parser.add_argument("--name", default=None,
                        help="the run folder's name on Drive (default: the config's name and a hash of the job, "
                             "so the same job exported again continues the same run)")
    parser.add_argument("--embed-limit-mb", type=float, default=EMBED_LIMIT_BYTES / 1e6,
                        help=f"local data and model files up to this much in all go inside the notebook; larger "
                             f"ones are uploaded to Drive by you (default {EMBED_LIMIT_BYTES / 1e6:.0f})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_export(args: argparse.Namespace, store: RunStore, console: Console, errors: Console) -> int:
    if not args.colab:
        raise UsageError("launch export: which kind? --colab (a Google Colab notebook; the only kind so far)")
    config = load_config(find_config(args.config))
    output = args.output or Path(f"{config.path.stem}-colab.ipynb")
    result = export_colab(config, output, force=args.force, gpu=args.gpu, name=args.name,
                          embed_limit_bytes=int(args.embed_limit_mb * 1e6))
    for warning in result.warnings:
        errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    console.print(f"wrote {result.path} ({result.cells} cells, {result.bytes / 1e6:.1f} MB; run folder on Drive: "
                  f"MyDrive/qlora-launch/{result.run_name}). Open colab.research.google.com, File > Upload notebook, "
                  f"Runtime > Change runtime type > {args.gpu} GPU, Runtime > Run all; after a disconnect, "
                  "Run all again continues the run.", highlight=False, soft_wrap=True, markup=False)
    return 0
