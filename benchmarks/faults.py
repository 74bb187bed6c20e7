"""The fault matrix's table: runs the fault tests (each injects its fault for real: the fake
Vast.ai API with real sshd instances, the test sshd, real rsync, the tiny job trained on the
CPU) and prints one row per fault from what each test measured (tests/integration/fault_table.py).

    python benchmarks/faults.py                  # the whole matrix, ~20 minutes on 2 cores
    python benchmarks/faults.py -k "clock or rsync"   # some of it (pytest's -k)

Columns: recovered (the run reached its documented end: nothing lost, no partial checkpoint
used, losses equal to an uninterrupted run's where it trains on, no instance alive); steps
redone (steps the lost machine trained past the checkpoint the run went on from); $ wasted
(what the fake billed for the run minus what it billed for the same job without a fault, the
"provider API 429s" row's run, which only waits ~0.2 s; for a run that did not train to its end,
all it billed; seconds of start-up differ between runs, so +-$0.0001 is noise); orphans (instances alive at the end);
time to recover (the fault to the first training step after the resume). A fault whose test
failed shows as FAILED with no figures."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every test that reports a row, in the order of the table.
TESTS = [
    "tests/integration/test_vast.py::test_a_whole_run_on_a_rented_instance",
    "tests/integration/test_vast.py::test_preemption_resumes_on_another_offer_with_the_same_losses",
    "tests/integration/test_faults.py",
    "tests/integration/test_vast.py::test_a_lost_create_reply_never_rents_twice",
    "tests/integration/test_vast.py::test_an_instance_that_never_comes_up_is_destroyed_and_the_next_offer_tried",
    "tests/integration/test_budget.py::test_the_cap_stops_a_rented_run_mid_way_and_a_higher_cap_continues_it",
    "tests/integration/test_launch_ssh.py::test_streaming_survives_a_dropped_connection",
    "tests/integration/test_launch_ssh.py::test_killed_runner_then_resume_gives_the_same_losses",
    "tests/integration/test_launch_ssh.py::test_killed_launcher_then_attach_finishes_the_job",
    "tests/integration/test_runner_training.py::test_sigterm_checkpoints_and_resume_matches_uninterrupted",
    "tests/integration/test_runner_training.py::test_kill9_during_save_leaves_no_checkpoint_and_resume_ignores_it",
]
CLEAN_RUN = "provider API 429s"  # the row whose run is the no-fault baseline of $ wasted


def run_matrix(select: list[str], table: Path, keyword: str | None) -> str:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *select]
    if keyword:
        command += ["-k", keyword]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "QLORA_FAULTS_TABLE": str(table)},
                          capture_output=True, text=True)
    return proc.stdout + proc.stderr


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def render(rows: list[dict], failed: list[str]) -> str:
    clean = next((r["billed_usd"] for r in rows if r["fault"] == CLEAN_RUN and r["billed_usd"] is not None), None)
    lines = ["| fault | target | recovered | end state | steps redone | $ wasted | orphans | time to recover |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wasted = None
        if r["billed_usd"] is not None:  # a run that did the job: beyond the clean run; one that did not: all of it
            if r["end_state"] != "done":
                wasted = r["billed_usd"]
            elif clean is not None:
                wasted = 0.0 if r["fault"] == CLEAN_RUN else r["billed_usd"] - clean
        redone = "-" if r["steps_redone"] is None else str(r["steps_redone"])
        took = "-" if r["recover_s"] is None else f"{r['recover_s']:.1f} s"
        lines.append(f"| {r['fault']} | {r['target']} | {'yes' if r['recovered'] else 'NO'} | {r['end_state']} | "
                     f"{redone} | {money(wasted)} | {r['orphans']} | {took} |")
    for test in failed:
        lines.append(f"| {test} | | FAILED | | | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="keyword", help="only the tests pytest's -k selects")
    parser.add_argument("--rows", type=Path, help="also keep the measured rows in this JSON-lines file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "faults.jsonl"
        output = run_matrix(TESTS, table, args.keyword)
        rows = [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
    if args.rows:
        args.rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    failed = [line.split()[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    print(render(rows, failed))
    print("\n" + (output.strip().splitlines() or ["(no pytest output)"])[-1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
