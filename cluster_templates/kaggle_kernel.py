"""The script of a qlora-launch Kaggle kernel (pushed by the launcher as the kernel's code file,
with MARKER filled in: launcher/providers/kaggle.py, kernel_script()). Stdlib only: it runs in
Kaggle's image before anything is installed.

    1. find the run's files: glob the input root for the marker file (the mount layout has moved
       before: /kaggle/input/<slug>/, /kaggle/input/datasets/<owner>/<slug>/); the marker (JSON)
       is the plan: the GPU, the session limit, when to stop;
    2. check the GPUs first (torch.cuda.device_count() and the name) and stop at once, with one
       clear line, when the session is not what was planned (no GPU, or a P100 where a T4 was asked);
    3. pip install the runner's pinned requirements;
    4. seed <working>/out with the checkpoint the plan names (a new kernel version continuing a
       run without a checkpoint store: the launcher republished the previous version's newest
       checkpoint, with metrics.jsonl and base_eval.json, in the run's dataset);
    5. run `qlora_runner.py --config job.yaml --out <working>/out --resume auto` (it continues from
       the seeded checkpoint, or downloads the store's newest), its metrics echoed to the log as
       `QLORA_METRIC {json}` lines for the launcher to follow;
    6. SIGTERM the runner stop_before_s before the session ends (it saves a checkpoint and exits
       143), SIGKILL it if it has not exited near the end, and write <working>/kernel_status.json.
       The session ends at its limit, or sooner when the week's GPU quota left at the push
       (SESSION, filled in per push) is shorter: then `stopped: quota`.

Settings from the environment, for tests and trials off Kaggle:
    QLORA_KAGGLE_ROOT        prefix of /kaggle/input and /kaggle/working (default "/")
    QLORA_KAGGLE_SKIP_PIP=1  no pip install (the environment has the runner's packages)
    QLORA_KAGGLE_FAKE_GPUS   the GPU names this session "has", comma-separated ("" for none):
                             the check runs on these instead of torch's
Exit codes: the runner's; 0 after a planned stop (kernel_status.json says `stopped: session_limit`
or `stopped: quota`); 7 when the session cannot run the job (GPU, pip); 2 when the run's
files are not found."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

MARKER = "__QLORA_MARKER__"  # the run's marker file name: qlora-launch-<run id>.json
SESSION = {}  # this push's session (kernel_script fills it in): {"quota_left_s": the week's GPU time left}
EXIT_NOT_FOUND = 2
EXIT_ENVIRONMENT = 7  # the runner's code for "this machine cannot run the job"
EXIT_PREEMPTED = 143  # the runner after SIGTERM: a checkpoint was saved
METRIC_PREFIX = "QLORA_METRIC "
KILL_GRACE_S = 0.5  # of stop_before_s: after the SIGTERM, how much of the margin the runner gets

STARTED = time.monotonic()
ROOT = os.environ.get("QLORA_KAGGLE_ROOT", "/")
INPUT = os.path.join(ROOT, "kaggle", "input")
WORKING = os.path.join(ROOT, "kaggle", "working")
OUT = os.path.join(WORKING, "out")


def say(text):
    print(f"qlora-launch: {text}", flush=True)


def finish(code, **status):
    """Write kernel_status.json (what the launcher reads back with the output) and exit."""
    status.update(exit_code=code, seconds=round(time.monotonic() - STARTED, 1))
    os.makedirs(WORKING, exist_ok=True)
    with open(os.path.join(WORKING, "kernel_status.json"), "w") as f:
        json.dump(status, f)
    if status.get("error"):
        say(f"error: {status['error']}")
    sys.exit(code)


def find_plan():
    """The marker anywhere under the input root: (its folder, the plan it holds)."""
    found = sorted(glob.glob(os.path.join(INPUT, "**", MARKER), recursive=True))
    if not found:
        seen = sorted(glob.glob(os.path.join(INPUT, "*")) + glob.glob(os.path.join(INPUT, "*", "*")))[:20]
        finish(EXIT_NOT_FOUND, phase="failed", error=f"the run's files ({MARKER}) are not under {INPUT} (it holds: "
               f"{', '.join(seen) or 'nothing'}); was the run's dataset attached and ready?")
    with open(found[-1]) as f:
        return os.path.dirname(found[-1]), json.load(f)


def session_gpus():
    fake = os.environ.get("QLORA_KAGGLE_FAKE_GPUS")
    if fake is not None:
        return [name.strip() for name in fake.split(",") if name.strip()]
    try:
        import torch
    except ImportError:
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def check_gpus(plan):
    want_name, want_count = plan.get("gpu_name"), int(plan.get("gpu_count") or 0)
    if not want_count:
        return
    gpus = session_gpus()
    planned = f"{want_count}x {want_name}"
    if len(gpus) < want_count or any(want_name.lower() not in name.lower() for name in gpus[:want_count]):
        has = f"{len(gpus)}x {gpus[0]}" if gpus else "no GPU"
        finish(EXIT_ENVIRONMENT, phase="failed", gpus=gpus,
               error=f"this session has {has}, the run was planned for {planned}: stopping before anything runs "
                     "(is the kernel's accelerator on, and the account phone-verified for GPUs?)")
    say(f"GPUs: {', '.join(gpus[:want_count])}")


def install(folder, plan):
    if os.environ.get("QLORA_KAGGLE_SKIP_PIP") == "1":
        return
    requirements = os.path.join(folder, plan.get("requirements", "requirements.txt"))
    say("installing the runner's requirements")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "-r", requirements])
    if done.returncode != 0:
        finish(EXIT_ENVIRONMENT, phase="failed", error=f"pip install -r requirements.txt failed ({done.returncode}); "
               "is the kernel's internet on (new accounts: phone verification first)?")


def echo_metrics(stop):
    """Each new line of out/metrics.jsonl to the log, prefixed: the launcher's progress."""
    path, offset, pending = os.path.join(OUT, "metrics.jsonl"), 0, ""
    while True:
        ended = stop.is_set()
        try:
            with open(path) as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except OSError:
            chunk = ""
        pending += chunk
        *lines, pending = pending.split("\n")
        for line in lines:
            if line.strip():
                print(METRIC_PREFIX + line, flush=True)
        if ended:
            return
        stop.wait(1.0)


def session_end(plan):
    """(seconds from the start at which the session ends, why): its limit, or the quota left."""
    limit_s = float(plan.get("session_limit_s") or 12 * 3600)
    quota_s = SESSION.get("quota_left_s")
    if quota_s is not None and float(quota_s) < limit_s:
        return float(quota_s), "quota"
    return limit_s, "session_limit"


def seed(folder, plan):
    """Put the plan's seed checkpoint (and the run's history) into OUT, unless OUT holds a newer one."""
    chosen = plan.get("seed")
    if not chosen:
        return
    step = int(chosen["step"])
    checkpoints = os.path.join(OUT, "checkpoints")
    have = [int(name.rsplit("-", 1)[1]) for name in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else [])
            if name.startswith("checkpoint-") and name.rsplit("-", 1)[1].isdigit()]
    if have and max(have) >= step:
        return
    import shutil
    import tarfile

    os.makedirs(checkpoints, exist_ok=True)
    with tarfile.open(os.path.join(folder, chosen["checkpoint"])) as tar:
        tar.extractall(checkpoints, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(checkpoints)
    for name, source in (chosen.get("history") or {}).items():
        shutil.copy2(os.path.join(folder, source), os.path.join(OUT, name))
    say(f"continuing from checkpoint-{step} (the previous session's)")


def run(folder, plan):
    end_s, reason = session_end(plan)
    limit_s = float(plan.get("session_limit_s") or 12 * 3600)
    stop_before_s = float(plan.get("stop_before_s") or 0)
    term_at = max(0.0, end_s - stop_before_s)  # from the session's start (this script's)
    kill_at = term_at + stop_before_s * KILL_GRACE_S
    command = [sys.executable, os.path.join(folder, plan.get("runner", "qlora_runner.py")),
               "--config", os.path.join(folder, plan.get("config", "job.yaml")), "--out", OUT, "--resume", "auto"]
    os.makedirs(OUT, exist_ok=True)
    ends = (f"the {limit_s / 3600:g} h session limit" if reason == "session_limit"
            else f"the week's GPU quota runs out ({end_s / 3600:.2f} h)")
    say(f"running the runner; it is stopped {stop_before_s / 60:.0f} min before {ends}")
    runner = subprocess.Popen(command, cwd=WORKING, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stop = threading.Event()
    echo = threading.Thread(target=echo_metrics, args=(stop,), daemon=True)
    echo.start()
    stopped = None
    while runner.poll() is None:
        now = time.monotonic() - STARTED
        if stopped is None and now >= term_at:
            say(f"the {'session limit' if reason == 'session_limit' else 'end of the GPU quota'} is near: "
                "SIGTERM to the runner (it saves a checkpoint)")
            runner.send_signal(signal.SIGTERM)
            stopped = reason
        elif stopped and now >= kill_at:
            say("the runner did not stop in time: SIGKILL")
            runner.kill()
        time.sleep(0.2)
    stop.set()
    echo.join(timeout=10)
    code = runner.returncode if runner.returncode >= 0 else 128 - runner.returncode  # killed: 128 + signal
    if stopped and code in (EXIT_PREEMPTED, 0):
        finish(0, phase="stopped", stopped=stopped, runner_exit_code=code)
    finish(code, phase="done" if code == 0 else "failed", runner_exit_code=code,
           **({"stopped": stopped} if stopped else {}))


def unpack(folder, plan):
    """The job's folder assets travel as tars (Kaggle uploads a dataset's top level only): a
    scratch folder with the input's files linked and each archive unpacked; job.yaml names them
    relative to itself. The input stays read-only; the scratch is not output."""
    archives = plan.get("unpack") or {}
    if not archives:
        return folder
    import tarfile
    import tempfile

    import shutil

    job = tempfile.mkdtemp(prefix="qlora-job-")
    config = plan.get("config", "job.yaml")
    for name in os.listdir(folder):
        if name == config:  # a copy: the runner resolves paths from the config's real folder
            shutil.copy2(os.path.join(folder, name), os.path.join(job, name))
        elif name not in archives:
            os.symlink(os.path.join(folder, name), os.path.join(job, name))
    for name in archives:
        with tarfile.open(os.path.join(folder, name)) as tar:
            tar.extractall(job, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(job)
    return job


def main():
    folder, plan = find_plan()
    check_gpus(plan)
    install(folder, plan)
    seed(folder, plan)
    run(unpack(folder, plan), plan)


if __name__ == "__main__":
    main()
