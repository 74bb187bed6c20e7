"""Managed mode (`launch --managed`, resources.sky.managed): the job as a SkyPilot managed job.

SkyPilot's jobs controller rents the cluster, runs the task, and on a spot preemption (or a
node failure) rents a new one and runs the task again, without the laptop. What that changes
for a run (docs/skypilot_managed_jobs.md has the SkyPilot 0.14.1 source read behind it):
- The training is the task's `run` (cluster_templates/sky_managed_task.yaml), on a cluster the
  controller owns: no SSH of ours reaches it. Every restart begins on an empty disk and runs
  setup and run from scratch, so the run resumes from the checkpoint store (`--resume auto`),
  which is why managed mode needs `storage.kind: s3`.
- So the workspace (ManagedWorkspace, sky_managed_workspace.py) has no shell: it stages the run folder here and hands it
  to SkyPilot as a file mount; looks at the job through SkyPilot's job queue and the store;
  follows progress through the job's log (the run prints metrics.jsonl there); fetches results
  and checkpoints from the store; stops by cancelling the job.
- A job is never "lost" to the lifecycle (it never rents a replacement: the controller does),
  and the run record's machine is the managed job (machine id `managed:<job name>`).
- The controller is a VM of its own (4+ vCPUs, 16 GiB on AWS: m6i.xlarge) that bills while the
  job lives and 10 minutes after; the plan adds it, and says when it costs more than the GPU.
- The store's keys travel as the task's `secrets`: SkyPilot keeps them out of its job queue,
  dashboard and YAML dumps, but not off the API server's and controller's disks
  (docs/skypilot_managed_jobs.md, section 3): use keys scoped to the bucket's prefix.
- Vast.ai and RunPod cannot mount the files SkyPilot stages for a managed job: only AWS, GCP,
  Azure, Lambda and DigitalOcean are offered."""

from __future__ import annotations

from typing import Any, Optional

from launcher.errors import EXIT_ENVIRONMENT, EXIT_TARGET
from launcher.providers import sky_client
from launcher.remote import Machine, RemoteError

MACHINE_PREFIX = "managed:"  # a run record's machine_id for a managed job: managed:<job name>
# Not RunPod: SkyPilot mounts a managed job's staged files (STORAGE_MOUNTING), which RunPod lacks.
MANAGED_CLOUDS = ("aws", "gcp", "azure", "lambda", "do")
# SkyPilot's default jobs controller (jobs.controller.resources: 4+ vCPUs, 4x memory) at on-demand
# list prices (US regions, 2026), compute only. Lambda cannot host a controller: SkyPilot puts it on
# another enabled cloud, priced here as AWS's. resources.sky.controller_usd_per_hour overrides this
# (0 for an API server in consolidation mode, whose controller is its own process).
CONTROLLER_VMS: dict[str, tuple[str, float]] = {
    "aws": ("m6i.xlarge", 0.192), "gcp": ("n2-standard-4", 0.194), "azure": ("Standard_D4s_v5", 0.192),
    "do": ("g-4vcpu-16gb", 0.188), "lambda": ("m6i.xlarge on AWS", 0.192),
}
CONTROLLER_IDLE_H = 10 / 60  # the controller stops 10 minutes after its last job ends
# SkyPilot's job statuses (sky.jobs.ManagedJobStatus values) and what the run's exit code is then.
ENDED = {"SUCCEEDED": 0, "CANCELLED": 143, "FAILED": 1, "FAILED_SETUP": EXIT_ENVIRONMENT,
         "FAILED_PRECHECKS": EXIT_TARGET, "FAILED_NO_RESOURCE": EXIT_TARGET, "FAILED_CONTROLLER": EXIT_TARGET}


def controller_usd_per_hour(cloud: str, override: Optional[float]) -> tuple[str, float]:
    """The controller's machine and $/h for a job on `cloud`."""
    if override is not None:
        return ("as resources.sky.controller_usd_per_hour says", override)
    return CONTROLLER_VMS.get(cloud, CONTROLLER_VMS["aws"])


def controller_note(cloud: str, override: Optional[float], gpu_usd_per_hour: float,
                    hours: Optional[float]) -> str:
    """The plan's line on the controller: what it costs over the job, and whether more than the GPU."""
    vm, usd = controller_usd_per_hour(cloud, override)
    line = f"managed: SkyPilot's jobs controller ({vm}, ${usd:.3f}/h) bills beside the GPU"
    if hours is not None and usd > 0:
        line += f": ~${usd * (hours + CONTROLLER_IDLE_H):.2f} over the {hours:.1f} h job and the 10 min after"
    if usd > gpu_usd_per_hour:
        line += f"; it costs more than the GPU (${gpu_usd_per_hour:.3f}/h): without --managed the laptop follows " \
                "the run and recovers it, with no controller"
    return line


class ManagedJob(Machine):
    """The run record's machine for a managed job: it has no shell we can reach."""

    def __init__(self, job_name: str) -> None:
        super().__init__()
        self.job_name = job_name
        self.name = f"sky-job:{job_name}"

    @property
    def machine_id(self) -> str:
        return f"{MACHINE_PREFIX}{self.job_name}"

    def command(self, remote_command: str) -> list[str]:
        raise RemoteError(f"{self.name} is a SkyPilot managed job: its cluster belongs to SkyPilot's controller "
                          "and has no shell of ours (`sky jobs logs` shows it)")


def job_name_of(machine_id: str) -> Optional[str]:
    return machine_id.removeprefix(MACHINE_PREFIX) if machine_id.startswith(MACHINE_PREFIX) else None


# ---------------------------------------------------------------------------------------------
# SkyPilot's job queue
# ---------------------------------------------------------------------------------------------

RECORD_FIELDS = ["job_id", "job_name", "status", "recovery_count", "failure_reason", "submitted_at", "end_at"]


def managed_records(sky: Any, name: Optional[str] = None, job_ids: Optional[list[int]] = None) -> list[Any]:
    """SkyPilot's queue records of managed jobs (with our fields), newest first."""
    try:
        records, *_ = sky_client.bounded("the managed-job queue", lambda: sky.get(sky.jobs.queue_v2(
            refresh=False, job_ids=job_ids, name_match=name, fields=RECORD_FIELDS)), 120)
    except sky_client.SkyError as e:
        if e.kind != "ClusterNotUpError":
            raise
        # No jobs controller (never launched, or stopped: it stops only once every job has ended).
        return []
    out = [r for r in records if name is None or field_of(r, "job_name") == name]
    return sorted(out, key=lambda r: field_of(r, "job_id") or 0, reverse=True)


def managed_record(sky: Any, name: str, job_id: Optional[int]) -> Optional[Any]:
    records = managed_records(sky, name, [job_id] if job_id else None)
    return next(iter(records), None)


def live_jobs(sky: Any, name: Optional[str] = None) -> list[Any]:
    """Managed jobs not yet ended (still billing, or about to)."""
    return [r for r in managed_records(sky, name) if status_of(r) not in ENDED]


def cancel(sky: Any, job_ids: list[int]) -> None:
    """Cancel by job id (by name, SkyPilot cancels nothing when two jobs share it)."""
    if job_ids:
        sky_client.bounded("cancelling the managed job", lambda: sky.get(sky.jobs.cancel(job_ids=job_ids)), 300)


def status_of(record: Optional[Any]) -> Optional[str]:
    status = field_of(record, "status") if record is not None else None
    return getattr(status, "value", status)


def field_of(record: Any, name: str) -> Any:
    """A field of a SkyPilot record: a pydantic model in 0.14, a dict in older SDKs (or None)."""
    if record is None:
        return None
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)
