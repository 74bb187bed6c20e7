"""What the launcher costs on top of the training, measured in one run:

1. `launch --help` wall time against `sky --help` (median of 5 cold processes each);
2. time from `launch` to the runner's first optimizer step on an SSH target (a real sshd on
   127.0.0.1) whose Python environment is ready, split into preflight + plan, bootstrap + sync
   + start, and the runner's own start-up (model load, tokenization, base-model evaluation);
3. bytes sent to the target by a first and a second launch of a job with 100 MB of data,
   counted by a TCP proxy between ssh and sshd (everything: SSH handshake, commands, rsync).

    python benchmarks/launch_overhead.py            # ~3 minutes on 2 cores
    python benchmarks/launch_overhead.py --sky /path/to/venv/bin/sky

`sky` is looked up on PATH unless given; without it that row says so."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.runs import RunStore  # noqa: E402
from tests.helpers import tiny_job  # noqa: E402
from tests.sshd import start_sshd  # noqa: E402
from tests.tcp_proxy import TcpProxy  # noqa: E402

DATA_MB = 100


def median_wall(argv: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_data(path: Path, megabytes: int) -> int:
    words = "cat dog bee owl fox cow hen pig rat bat lives in a house field web cave coop says".split()
    rng = random.Random(0)
    count = 0
    with path.open("w") as f:
        while f.tell() < megabytes * 1_000_000:
            record = {"instruction": " ".join(rng.choices(words, k=12)), "output": " ".join(rng.choices(words, k=24))}
            f.write(json.dumps(record) + "\n")
            count += 1
    return count


def launch(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QLORA_LAUNCH_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "launcher", *args, "--runs-dir", str(folder / "runs")],
                          capture_output=True, text=True, env=env, cwd=folder, check=False)


def newest_record(folder: Path):
    store = RunStore(folder / "home" / "runs.sqlite")
    try:
        return store.list(limit=1)[0]
    finally:
        store.close()


def first_step_time(remote_dir: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    metrics = Path(remote_dir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "train":
                    return event["time"]
        time.sleep(0.05)
    raise RuntimeError("the runner took no step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sky", default=shutil.which("sky"), help="the sky executable (default: from PATH)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="launch-overhead-"))
    server = start_sshd(folder / "sshd")
    try:
        rows = []
        launch_help = median_wall([sys.executable, "-m", "launcher", "--help"])
        rows.append(("`launch --help` (median of 5)", f"{launch_help:.2f} s"))
        if args.sky:
            rows.append(("`sky --help` (median of 5)", f"{median_wall([args.sky, '--help']):.2f} s"))
        else:
            rows.append(("`sky --help`", "sky not installed: pass --sky PATH"))

        target = ["--target", server.target, "--identity", str(server.client_key), "--python", sys.executable]
        config = tiny_job(folder / "job.yaml", train={"max_steps": 30}, resources={"workdir": str(folder / "remote")})
        warm = launch(folder, "--config", str(config), *target, "--yes")  # warms caches, the master connection
        assert warm.returncode == 0, warm.stderr
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "--config", str(config), *target, "--yes",
                                 "--runs-dir", str(folder / "runs")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=folder,
                                env={**os.environ, "QLORA_LAUNCH_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1",
                                     "PYTHONPATH": str(ROOT)})
        while True:
            record = newest_record(folder) if (folder / "home" / "runs.sqlite").exists() else None
            if record and record.created_at >= start and record.started_at:
                break
            time.sleep(0.05)
        first = first_step_time(record.remote_dir)
        proc.wait()
        created, started = record.created_at, record.started_at
        rows.append(("launch -> first step, ssh target, environment ready", f"{first - start:.1f} s"))
        rows.append(("  python start, imports, config", f"{created - start:.1f} s"))
        rows.append(("  preflight, bootstrap (stack check), sync, start", f"{started - created:.1f} s"))
        rows.append(("  runner: load, tokenize, base eval, first step", f"{first - started:.1f} s"))

        data = folder / "big.jsonl"
        examples = make_data(data, DATA_MB)
        big = tiny_job(folder / "big.yaml", data={"path": str(data)}, train={"max_steps": 1},
                       resources={"workdir": str(folder / "remote")})
        proxy = TcpProxy(server.port)
        via_proxy = ["--target", f"ssh://{server.user}@127.0.0.1:{proxy.port}", "--identity", str(server.client_key),
                     "--python", sys.executable]
        sent = []
        for _ in range(2):
            before = proxy.sent
            proc = launch(folder, "--config", str(big), *via_proxy, "--yes", "--detach")
            assert proc.returncode == 0, proc.stderr
            sent.append(proxy.sent - before)
            launch(folder, "down", newest_record(folder).id)
        size = data.stat().st_size
        rows.append((f"data: {size / 1e6:.0f} MB, {examples} examples", ""))
        rows.append(("bytes sent by the first launch", f"{sent[0] / 1e6:.2f} MB"))
        rows.append(("bytes sent by the second launch (data unchanged)",
                     f"{sent[1] / 1e3:.0f} kB = {100 * sent[1] / size:.3f} % of the data"))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"launch overhead (host: {os.cpu_count()} CPUs, python {sys.version.split()[0]})\n")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
