"""What a preemption costs, measured on the fake Vast.ai API (tests/fakes/vast_api.py: real sshd
instances on loopback, offers and prices from the shipped Vast.ai catalog, spot = its minimum
bid) with the tiny config trained for real on the CPU:

1. an interruptible run (--spot) preempted at random steps N times: per preemption, the steps
   redone (the step the preempted runner had reached minus the checkpoint the new machine
   resumed from; must be <= train.save_every) and the time to recover (preemption -> the
   runner training again on the next offer);
2. its $ (each machine's $/h over its time, as billed by the fake) against the same job run
   uninterrupted on demand (--on-demand), and the ratio;
3. the same ratio projected onto a real job (the Mistral-7B ready config on the plan's GPU):
   spot $/h x (hours + N x (recovery + redone work)) / (on-demand $/h x hours).

    python benchmarks/preemption.py [--preemptions 2] [--seed 0]     # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import getpass
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.runs import RunStore  # noqa: E402
from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast  # noqa: E402
from tests.helpers import tiny_job  # noqa: E402

STEPS, SAVE_EVERY = 120, 10


def launch(folder: Path, fake: FakeVast, *args: str) -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(Path.home()),
           "QLORA_LAUNCH_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1", "VAST_URL": fake.url,
           "VAST_API_KEY": ACCOUNT_KEY, "QLORA_LAUNCH_VAST_SSH_USER": getpass.getuser(),
           "QLORA_LAUNCH_VAST_POLL_S": "0.2", "COLUMNS": "200"}
    config = tiny_job(folder / "job.yaml", train={"max_steps": STEPS, "save_every": SAVE_EVERY, "eval_every": 40},
                      resources={"python": sys.executable, "providers": ["vast"]})
    return subprocess.Popen([sys.executable, "-m", "launcher", "--config", str(config), "--yes", "--runs-dir",
                             str(folder / "runs"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=folder)


def newest(folder: Path):
    store = RunStore(folder / "home" / "runs.sqlite")
    try:
        records = store.list(limit=1)
        return (records[0], store.machines(records[0].id)) if records else (None, [])
    finally:
        store.close()


def wait(condition, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError


def runner_step(fake: FakeVast, instance_id: int, run_id: str) -> int:
    status = fake.instances[instance_id].home / "qlora-launch" / "runs" / run_id / "status.json"
    try:
        return json.loads(status.read_text()).get("step") or 0
    except (OSError, ValueError):
        return 0


def interrupted_run(folder: Path, fake: FakeVast, preemptions: int, rng: random.Random) -> dict:
    proc = launch(folder, fake, "--spot")
    events = []
    at_steps = sorted(rng.sample(range(15, STEPS - 15), preemptions))
    for at in at_steps:
        record, machines = wait(lambda: (lambda r: r if r[0] and r[0].status == "running" and r[1] and
                                         r[1][-1].ended_at is None else None)(newest(folder)))
        instance = int(record.target.split(":")[1])
        wait(lambda: runner_step(fake, instance, record.id) >= at)
        preempted_at = time.time()
        fake.preempt(instance)
        reached = runner_step(fake, instance, record.id)
        # Back to training: a new machine, the runner stepping past where it resumed.
        wait(lambda: (lambda r: r if r[0] and r[0].target != f"vast:{instance}" and r[0].status == "running"
                      else None)(newest(folder)))
        metrics = folder / "runs" / record.id / "metrics.jsonl"

        def resume_steps() -> list[int]:
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            return [e["step"] for e in map(json.loads, lines) if e.get("event") == "resume"]

        # This preemption's resume: one more resume event than the preemptions before it.
        resumed = wait(lambda: (resume_steps()[len(events)] if len(resume_steps()) > len(events) else None))
        new_record, _ = newest(folder)
        new_instance = int(new_record.target.split(":")[1])
        wait(lambda: runner_step(fake, new_instance, record.id) > resumed)
        events.append({"at": reached, "resumed": resumed, "redone": reached - resumed,
                       "recover_s": time.time() - preempted_at})
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the interrupted run failed:\n{out[-3000:]}")
    record, machines = newest(folder)
    billed = sum(fake.billed_usd(int(m.target.split(":")[1])) for m in machines)
    return {"events": events, "usd": sum(m.usd() for m in machines), "billed": billed, "machines": len(machines),
            "seconds": sum(m.seconds() for m in machines)}


def on_demand_run(folder: Path, fake: FakeVast) -> dict:
    proc = launch(folder, fake, "--on-demand")
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the on-demand run failed:\n{out[-3000:]}")
    record, machines = newest(folder)
    return {"usd": sum(m.usd() for m in machines), "seconds": sum(m.seconds() for m in machines)}


def projection(preemptions: int, recover_s: float, redone_steps: float) -> str:
    """The measured overheads on a real job: the Mistral config's plan on the shipped catalog."""
    from launcher import offers
    from launcher.config import load

    config = load(ROOT / "configs" / "mistral-7b-qlora.yaml")
    need = offers.job_need(config)
    rows, _ = offers.plan(offers.catalog_offers(clouds=("vast",)), need, offers.Constraints(providers=("vast",)))
    fitting = [p for p in rows if p.fits and not p.offer.interruptible]
    best = fitting[0]
    hours = best.est_hours
    train = config.job.train
    steps = train.max_steps or max(1, int(need.tokens // (train.micro_batch_size * train.grad_accum * need.seq_tokens)))
    spot = best.offer.usd_per_hour * 0.55  # the fake's (and roughly Vast's) minimum bid share
    per_step_h = hours / steps
    extra_h = preemptions * (recover_s / 3600 + redone_steps * per_step_h)
    ratio = spot * (hours + extra_h) / (best.offer.usd_per_hour * hours)
    return (f"Mistral-7B config on {best.offer.gpu} ({best.est_hours:.2f} h on demand at "
            f"${best.offer.usd_per_hour:.3f}/h): with {preemptions} preemptions, spot costs {ratio:.2f}x on-demand")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preemptions", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fake = FakeVast(ROOT / "catalogs" / "v8" / "vast" / "vms.csv", folder / "fake", loading_s=0.3).start()
        try:
            (folder / "a").mkdir()
            (folder / "b").mkdir()
            spot = interrupted_run(folder / "a", fake, args.preemptions, rng)
            demand = on_demand_run(folder / "b", fake)
        finally:
            fake.stop()
    print(f"tiny config, {STEPS} steps, save_every {SAVE_EVERY}, on the fake Vast.ai (seed {args.seed})")
    print(f"{'preemption':>10} {'at step':>8} {'resumed':>8} {'redone':>7} {'recover s':>10}")
    for i, e in enumerate(spot["events"], 1):
        print(f"{i:>10} {e['at']:>8} {e['resumed']:>8} {e['redone']:>7} {e['recover_s']:>10.1f}")
    worst = max(e["redone"] for e in spot["events"])
    print(f"most steps redone: {worst} (save_every {SAVE_EVERY}: {'ok' if worst <= SAVE_EVERY else 'OVER'})")
    print(f"interrupted spot run: {spot['machines']} machines, {spot['seconds']:.0f} s, ${spot['usd']:.5f} "
          f"(the fake billed ${spot['billed']:.5f})")
    print(f"uninterrupted on-demand run: {demand['seconds']:.0f} s, ${demand['usd']:.5f}")
    print(f"spot with {args.preemptions} preemptions / on demand: {spot['usd'] / demand['usd']:.2f}")
    recover = sum(e["recover_s"] for e in spot["events"]) / len(spot["events"])
    redone = sum(e["redone"] for e in spot["events"]) / len(spot["events"])
    print(projection(args.preemptions, recover, redone))


if __name__ == "__main__":
    main()
