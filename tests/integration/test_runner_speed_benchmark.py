"""benchmarks/runner_speed.py compares four ways to train on a GPU, which CI does not have; its
plumbing (the random-weight model, the length mix from the shipped statistics, the plain Trainer
script, the runner as shipped) runs here with --smoke on tiny shapes, and Unsloth is skipped with
its reason. Nothing is measured: the rows say so (no peak, no MFU without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "runner_speed.py"


def test_smoke_trains_the_plain_script_and_the_shipped_runner_and_skips_unsloth(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--configs", "mistral-7b-qlora.yaml",
                           "--mixes", "mix", "--variants", "a", "c", "d", "--steps", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"][:3]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"(a)", "(c)", "(d)"}
    for key in ("(a)", "(c)"):
        assert rows[key]["tokens_per_s"] > 0 and rows[key]["skipped"] is None, rows[key]
        assert rows[key]["peak_gb"] is None and rows[key]["mfu"] is None  # no GPU: nothing invented
    assert rows["(d)"]["tokens_per_s"] is None and rows["(d)"]["skipped"] == "Unsloth needs a CUDA GPU"
    assert "Goal: (c) >= 1.50x (a)'s tok/s" in proc.stdout
