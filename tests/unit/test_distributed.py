"""Data parallel: the command line the launcher runs (one process, one node with several GPUs,
several nodes reading their rank and the head's address from the node file at run time), and the
runner's side of it (the global batch kept, ranks from the environment, the launched process's
exit code). The training itself, on two CPU ranks: tests/integration/test_runner_data_parallel.py."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from launcher import job
from launcher.distributed import RANK_SHUTDOWN_TIMEOUT_S, Topology, runner_command, runner_environment
from tests.helpers import load_runner_module

runner = load_runner_module()
ARGS = ["--config", "job.yaml", "--out", ".", "--resume", "auto"]
LAUNCH = ("python qlora_runner.py accelerate-launch --multi_gpu --num_processes {p} --num_machines {m} "
          "--mixed_precision no --dynamo_backend no")
RUNNER_ARGS = "qlora_runner.py --config job.yaml --out . --resume auto"


# ---- the command lines -------------------------------------------------------------------------


def test_one_gpu_is_the_plain_runner():
    assert runner_command("python", ARGS, Topology()) == f"python {RUNNER_ARGS}"
    assert runner_command("/opt/my env/python", ["--config", "job.yaml", "--out", "."], Topology()) == \
        "'/opt/my env/python' qlora_runner.py --config job.yaml --out ."
    assert runner_environment(Topology()) == {}
    assert Topology().processes == 1


def test_one_node_with_four_gpus():
    assert runner_command("python", ARGS, Topology(gpus_per_node=4)) == \
        f"{LAUNCH.format(p=4, m=1)} --main_process_port 0 {RUNNER_ARGS}"
    assert runner_environment(Topology(gpus_per_node=4)) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "100"}


def test_two_nodes_with_eight_gpus_each():
    topology = Topology(nodes=2, gpus_per_node=8)
    assert topology.processes == 16
    command = runner_command("python", ARGS, topology)
    checks, launch = command.rsplit(" && ", 1)
    assert checks.startswith('{ test -r "$HOME"/qlora-launch/.node.env || { echo "qlora-launch: error: node '
                             'environment file ~/qlora-launch/.node.env is missing')
    assert ' && . "$HOME"/qlora-launch/.node.env && { test "$SKYPILOT_NUM_NODES" = 2 || ' in checks
    assert '{ test "$SKYPILOT_NUM_GPUS_PER_NODE" = 8 || ' in checks
    assert launch == (f'{LAUNCH.format(p=16, m=2)} --machine_rank "$SKYPILOT_NODE_RANK" '
                      '--main_process_ip "${SKYPILOT_NODE_IPS%%[!0-9A-Za-z.:-]*}" --main_process_port 29500 '
                      f"{RUNNER_ARGS}")
    assert runner_environment(topology) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "100"}
    assert f"--main_process_port 29501 {RUNNER_ARGS}" in runner_command("python", ARGS, topology, port=29501)


def test_cpu_ranks_use_the_same_launcher_on_one_machine():
    assert runner_command("python", ARGS, Topology(gpus_per_node=2), cpu=True) == \
        f"{LAUNCH.format(p=2, m=1)} --main_process_port 0 {RUNNER_ARGS}"
    with pytest.raises(ValueError, match="one machine"):
        runner_command("python", ARGS, Topology(nodes=2, gpus_per_node=2), cpu=True)
    with pytest.raises(ValueError):
        Topology(nodes=0)


def test_the_agent_ends_the_ranks_before_the_launcher_gives_up():
    # The launcher's SIGKILL reaches the accelerate parent only; the agent must have ended its ranks by then.
    assert RANK_SHUTDOWN_TIMEOUT_S < job.STOP_GRACE_S


def test_accelerate_takes_the_flags_without_a_default_or_a_warning(caplog):
    launch = pytest.importorskip("accelerate.commands.launch")
    for topology in (Topology(gpus_per_node=4), Topology(nodes=2, gpus_per_node=8)):
        words = runner_command("python", ARGS, topology).rsplit(" && ", 1)[-1].split()
        words = [w.replace('"$SKYPILOT_NODE_RANK"', "1").replace('"${SKYPILOT_NODE_IPS%%[!0-9A-Za-z.:-]*}"', "10.0.0.1")
                 for w in words]
        assert words[1:3] == ["qlora_runner.py", "accelerate-launch"]
        args = launch.launch_command_parser().parse_args(words[3:])
        with caplog.at_level(logging.WARNING):
            args, defaults, _ = launch._validate_launch_command(args)
        assert "had defaults used instead" not in caplog.text
        assert (args.multi_gpu, args.num_processes, args.num_machines, args.mixed_precision) == \
            (True, topology.processes, topology.nodes, "no")
        assert args.training_script == "qlora_runner.py" and args.training_script_args == ARGS


# ---- the multi-node line, run for real ---------------------------------------------------------


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """Stands in for python: prints the arguments it got, one a line."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def node_file(path: Path, rank: int = 1, ips: str = "10.0.0.1\n10.0.0.2", nodes: int = 2, gpus: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"export SKYPILOT_NODE_RANK={rank}\nexport SKYPILOT_NODE_IPS='{ips}'\n"
                    f"export SKYPILOT_NUM_NODES={nodes}\nexport SKYPILOT_NUM_GPUS_PER_NODE={gpus}\n")


def run_sh(command: str, home: Path) -> subprocess.CompletedProcess:
    """As the launcher's wrapper runs it: the exit code recorded after the command, whatever it did."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    return subprocess.run(["sh", "-c", f"{command}; echo \"exit $?\""], capture_output=True, text=True, env=env,
                          cwd=home, timeout=30)


def launched_args(stdout: str) -> dict[str, str]:
    words = stdout.splitlines()
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}


@pytest.mark.parametrize("ips", ["10.0.0.1\n10.0.0.2", r"10.0.0.1\n10.0.0.2", "10.0.0.1 10.0.0.2", "10.0.0.1"])
def test_the_two_node_line_reads_the_node_file(tmp_path, fake_python, ips):
    node_file(tmp_path / "qlora-launch" / ".node.env", rank=1, ips=ips)
    proc = run_sh(runner_command(fake_python, ARGS, Topology(nodes=2, gpus_per_node=8)), tmp_path)
    assert proc.stdout.splitlines()[-1] == "exit 0", proc.stderr
    got = launched_args(proc.stdout)
    assert (got["--machine_rank"], got["--main_process_ip"], got["--main_process_port"]) == ("1", "10.0.0.1", "29500")
    assert (got["--num_processes"], got["--num_machines"]) == ("16", "2")
    assert proc.stdout.splitlines()[-8:-1] == ["qlora_runner.py", *ARGS]


def test_a_node_file_elsewhere(tmp_path, fake_python):
    node_file(tmp_path / "my node.env", rank=0)
    command = runner_command(fake_python, ARGS, Topology(nodes=2, gpus_per_node=8),
                             node_env_file=str(tmp_path / "my node.env"))
    got = launched_args(run_sh(command, tmp_path).stdout)
    assert got["--machine_rank"] == "0"


def test_a_missing_node_file_is_a_clear_error(tmp_path, fake_python):
    proc = run_sh(runner_command(fake_python, ARGS, Topology(nodes=2, gpus_per_node=8)), tmp_path)
    assert proc.stdout == "exit 7\n"  # nothing ran, and the wrapper went on to record the code
    assert proc.stderr.startswith("qlora-launch: error: node environment file ~/qlora-launch/.node.env is missing")


@pytest.mark.parametrize("nodes, gpus, says", [
    (3, 8, "SKYPILOT_NUM_NODES=3 but the job was planned for 2 nodes"),
    (2, 4, "SKYPILOT_NUM_GPUS_PER_NODE=4 but the job was planned for 8 GPUs"),
])
def test_a_node_file_of_another_cluster_is_refused(tmp_path, fake_python, nodes, gpus, says):
    node_file(tmp_path / "qlora-launch" / ".node.env", nodes=nodes, gpus=gpus)
    proc = run_sh(runner_command(fake_python, ARGS, Topology(nodes=2, gpus_per_node=8)), tmp_path)
    assert proc.stdout == "exit 7\n"
    assert says in proc.stderr and "~/qlora-launch/.node.env says" in proc.stderr


# ---- the runner's side -------------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum, world, per_rank", [
    (4, 1, 4), (4, 2, 2), (8, 8, 1),  # divides: the global batch is kept exactly
    (6, 4, 2),   # 1.5: halves round up (global 8 for the planned 6; 4 would be as far)
    (9, 4, 2),   # 2.25 -> 2: global 8 for the planned 9
    (16, 3, 5),  # 5.33 -> 5: global 15 for 16
    (4, 8, 1), (1, 8, 1),  # fewer than one per rank: never 0
])
def test_each_rank_accumulates_its_share_of_the_global_batch(grad_accum, world, per_rank):
    assert runner.per_rank_grad_accum(grad_accum, world) == per_rank


def test_ranks_from_the_environment():
    assert runner.Ranks.from_env({}) == runner.Ranks(0, 1, 0, 1)
    ranks = runner.Ranks.from_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.nodes) == (9, 16, 1, 2)
    assert not ranks.is_main and not ranks.is_local_main
    head_of_node_1 = {"RANK": "8", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}
    assert runner.Ranks.from_env(head_of_node_1).is_local_main


def test_a_rank_but_0_writes_no_status_or_metrics(tmp_path):
    run = runner.RunDir(tmp_path, writes=False)
    run.set_status("training", step=3)
    run.append_metric({"event": "train", "step": 3})
    assert list(tmp_path.iterdir()) == []


def test_other_ranks_lines_are_marked():
    class Sink:
        text = ""

        def write(self, text):
            self.text += text

    sink = Sink()
    stream = runner.Prefixed(sink, "[rank 1] ")
    for piece in ("warning: a", "b\nsecond", " line\n", "", "third\n"):
        stream.write(piece)
    assert sink.text == "[rank 1] warning: ab\n[rank 1] second line\n[rank 1] third\n"


def test_a_signal_after_the_stop_changes_nothing():
    stop = runner._StopFlag()
    with pytest.raises(runner.Stopped):  # before training: nothing to checkpoint, stop now
        stop.handler(signal.SIGTERM, None)
    stop.training = True
    stop.handler(signal.SIGTERM, None)
    stop.training = False  # stopped at the step's end, checkpoint saved, on the way out
    stop.handler(signal.SIGTERM, None)  # the agent passes its TERM on: no Stopped mid-exit
    assert stop.signum == signal.SIGTERM


@pytest.fixture
def launch_outcome(monkeypatch):
    """Makes accelerate's launch end the way given, to see what the launched process exits with."""
    launch = pytest.importorskip("accelerate.commands.launch")

    def arrange(error: BaseException | None) -> int:
        def launch_command(args):
            if error is not None:
                raise error

        monkeypatch.setattr(launch, "launch_command", launch_command)
        return runner.main(["accelerate-launch", "--multi_gpu", "--num_processes", "2",
                            "qlora_runner.py", "--out", "."])

    return arrange


def test_the_launched_process_exits_with_the_runners_codes(launch_outcome, tmp_path, capsys):
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(*codes: int) -> ChildFailedError:
        return ChildFailedError("qlora_runner.py", {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                                                         error_file=str(tmp_path / "none.json"))
                                                    for rank, code in codes})

    assert launch_outcome(None) == 0
    assert launch_outcome(SignalException("got SIGTERM", sigval=signal.SIGTERM)) == 143  # after the ranks' checkpoint
    assert launch_outcome(SignalException("got SIGINT", sigval=signal.SIGINT)) == 130
    assert launch_outcome(failed((1, 143), (0, 143))) == 143  # a TERM on rank 1: every rank stopped with it
    assert launch_outcome(failed((3, 6), (0, -signal.SIGTERM))) == 6  # rank 3 ran out of memory first
    assert "rank 3 exited with 6" in capsys.readouterr().err
    assert launch_outcome(failed((0, -signal.SIGKILL))) == 137
    assert launch_outcome(ConnectionError("port 29500 in use")) == runner.EXIT_ENVIRONMENT
    assert "accelerate launch failed: ConnectionError: port 29500 in use" in capsys.readouterr().err
