"""The command line that starts the runner in its run folder: one process, or data parallel with
one process (rank) per GPU on one or several machines, through `accelerate launch`.

    1 x 1   python qlora_runner.py --config job.yaml --out .
    1 x N   python qlora_runner.py accelerate-launch --multi_gpu --num_processes N --num_machines 1
              --mixed_precision no --dynamo_backend no --main_process_port 0 qlora_runner.py --config job.yaml --out .
    M x N   . ~/qlora-launch/.node.env && <checks> && python qlora_runner.py accelerate-launch --multi_gpu
              --num_processes M*N --num_machines M --machine_rank "$SKYPILOT_NODE_RANK"
              --main_process_ip "$(head of $SKYPILOT_NODE_IPS)" --main_process_port 29500 ... qlora_runner.py ...

`qlora_runner.py accelerate-launch ARGS` is `accelerate launch ARGS` run inside the runner file, so
that the process the launcher starts (and signals) exits with the runner's own codes: accelerate's
command exits 1 for anything, a TERM included (torch's elastic agent raises SignalException after it
has passed the signal to every rank, and ChildFailedError when a rank exits non-zero), where the
lifecycle needs 143 after a preemption's checkpoint and 3/4/5/6/7 for the errors it explains.

The flags are chosen from accelerate 1.15's launch parser so that it neither reads nor asks for an
accelerate config and warns about no default it filled in: --num_processes, --num_machines,
--mixed_precision and --dynamo_backend are those it would otherwise fill in with a warning (the
runner sets the precision itself, through the Trainer). On one machine --main_process_port 0 lets
accelerate pick a free port for the local rendezvous, so two jobs on one machine never collide.

Standard library only: this runs on the laptop.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from launcher.paths import RUNNER_FILE

# The file in the workdir where a node's SkyPilot job (cluster_templates/sky_task.yaml, which spells
# the same name) writes SkyPilot's node variables as `export` lines; the command reads it at run
# time: the node's rank and the head's address exist only there.
NODE_ENV_NAME = ".node.env"
NODE_ENV_FILE = f"~/qlora-launch/{NODE_ENV_NAME}"
# Keep below job.STOP_GRACE_S (120 s): the launcher's SIGKILL after its grace reaches only the
# accelerate parent, whose ranks live in sessions of their own, so the agent must end them first.
RANK_SHUTDOWN_TIMEOUT_S = 100
ACCELERATE_LAUNCH = "accelerate-launch"  # the runner's wrapper of `accelerate launch` (see the runner's main)
EXIT_ENVIRONMENT = 7  # the runner's code for "the environment is wrong"; a missing node file is one


@dataclass(frozen=True)
class Topology:
    """Where the ranks go: `gpus_per_node` processes on each of `nodes` machines."""

    nodes: int = 1
    gpus_per_node: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"a topology needs >= 1 node and >= 1 GPU per node, "
                             f"got {self.nodes} x {self.gpus_per_node}")

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


def topology_for(resources: Any) -> Topology:
    """The job's ranks from its resources: data parallel when it asks for several GPUs per machine
    (resources.gpus, or a count in resources.gpu such as A10G:4) or several nodes; else one process
    (which spreads a model too big for one GPU over all of the machine's GPUs, as before)."""
    named = str(resources.gpu or "").partition(":")[2]
    gpus = int(named) if named.isdigit() else (resources.gpus or 1)
    return Topology(nodes=getattr(resources, "nodes", 1) or 1, gpus_per_node=max(gpus, 1))


def runner_command(python: str, runner_args: list[str], topology: Topology, *, cpu: bool = False,
                   node_env_file: str = NODE_ENV_FILE, port: int = 29500) -> str:
    """The shell command line (quoted) that starts the runner in its run folder.

    `runner_args` are the runner's own (--config job.yaml --out . [--resume auto]). `port` is the
    head node's rendezvous port when there are several nodes. `cpu`: the ranks train on the CPU
    (the job's train.device: cpu; gloo instead of NCCL), one machine only: the same launcher as
    GPUs, since accelerate's own --cpu forks several processes only through MPI. Set the variables
    of runner_environment(topology) with `export` before it: the multi-node line starts with `.`."""
    runner = RUNNER_FILE.name
    tail = " ".join(shlex.quote(a) for a in [runner, *runner_args])
    if topology.processes == 1:
        return f"{shlex.quote(python)} {tail}"
    if cpu and topology.nodes > 1:
        raise ValueError("cpu ranks run on one machine only")
    launch = [shlex.quote(python), runner, ACCELERATE_LAUNCH, "--multi_gpu",
              "--num_processes", str(topology.processes), "--num_machines", str(topology.nodes),
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    if topology.nodes == 1:
        return " ".join([*launch, "--main_process_port", "0", tail])
    # The head's address: SKYPILOT_NODE_IPS up to its first separator (a newline, or the two
    # characters \n of a file written with them spelled out), taken by the shell itself.
    launch += ["--machine_rank", '"$SKYPILOT_NODE_RANK"',
               "--main_process_ip", '"${SKYPILOT_NODE_IPS%%[!0-9A-Za-z.:-]*}"',
               "--main_process_port", str(port)]
    return f"{_node_checks(node_env_file, topology)} && {' '.join([*launch, tail])}"


def runner_environment(topology: Topology) -> dict[str, str]:
    """Variables the launched process needs beyond the machine's own (none for one process)."""
    if topology.processes == 1:
        return {}
    # The elastic agent passes a TERM on to every rank and SIGKILLs those still running after
    # this many seconds (default 30): a rank stops at the end of its current optimizer step and
    # then writes the checkpoint, which on a 7B model can take longer than 30 s.
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(RANK_SHUTDOWN_TIMEOUT_S)}


def _node_checks(node_env_file: str, topology: Topology) -> str:
    """Read the node file, failing with a line that names it; check it describes the planned cluster.
    Failures are `(exit 7)`, never `exit`: the launcher's wrapper shell must go on to record the code."""
    path = _shell_path(node_env_file)

    def fail(*parts: str) -> str:  # parts: literal text, and $NAME to expand
        text = "".join(p if p.startswith("$") else _double_quoted(p) for p in parts)
        return f'{{ echo "qlora-launch: error: {text}" >&2; (exit {EXIT_ENVIRONMENT}); }}'

    missing = fail(f"node environment file {node_env_file} is missing or unreadable; the node's setup writes "
                   "SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES and SKYPILOT_NUM_GPUS_PER_NODE there")
    nodes = fail(f"{node_env_file} says SKYPILOT_NUM_NODES=", "$SKYPILOT_NUM_NODES",
                 f" but the job was planned for {topology.nodes} nodes")
    gpus = fail(f"{node_env_file} says SKYPILOT_NUM_GPUS_PER_NODE=", "$SKYPILOT_NUM_GPUS_PER_NODE",
                f" but the job was planned for {topology.gpus_per_node} GPUs per node")
    return (f"{{ test -r {path} || {missing}; }} && . {path} && "
            f'{{ test "$SKYPILOT_NUM_NODES" = {topology.nodes} || {nodes}; }} && '
            f'{{ test "$SKYPILOT_NUM_GPUS_PER_NODE" = {topology.gpus_per_node} || {gpus}; }}')


def _double_quoted(text: str) -> str:
    """`text` safe inside a shell's double quotes."""
    return "".join("\\" + c if c in '"\\$`' else c for c in text)


def _shell_path(path: str) -> str:
    """`path` for the shell: ~/ expanded there, the rest quoted; `.` needs a slash not to search PATH."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path if "/" in path else f"./{path}")
