"""benchmarks/gpu_memory.py measures on a GPU, which CI does not have; its plumbing (random-weight
model from the config's shapes, synthetic data cut to max_length, the job file, the real runner,
metrics.jsonl) runs here with --smoke (tiny shapes, CPU), and --report re-reads saved results."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_memory.py"


def test_smoke_runs_the_real_runner_on_each_case(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 2
    for r in results:
        assert r["ok"] and r["steps"] == 5, r
        assert r["tokens_per_s"] > 0 and r["est_vram_gb"] > 0
        assert r["device_peak_gb"] is None  # no GPU: nothing measured, nothing invented
    assert "as configured" in proc.stdout


def test_report_recomputes_the_estimate_for_saved_results(tmp_path):
    saved = json.loads((ROOT / "benchmarks" / "results" / "gpu_memory_h100.json").read_text())[:1]
    saved[0]["est_vram_gb"] = 999.0  # what the file says the estimate was must not be what is printed
    file = tmp_path / "one.json"
    file.write_text(json.dumps(saved))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--report", str(file)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("llama-3.1-8b s1024 b2 gc1"))
    est_gb, peak_gb = float(row.split()[4]), float(row.split()[5])
    assert peak_gb == saved[0]["device_peak_gb"].__round__(2)
    assert 10 < est_gb < 25
