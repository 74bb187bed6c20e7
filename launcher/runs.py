"""Run records: one SQLite row per run in the user's state directory, updated at every
transition, so a run stays known after the launcher was killed or the laptop closed.

The state directory is $QLORA_LAUNCH_HOME when set (the tests set it), else
$XDG_STATE_HOME/qlora-launch, else ~/.local/state/qlora-launch. Secrets never go here."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher import clock

# created -> starting -> running -> done | failed | preempted | interrupted | stopped
# (interrupted: the runner or its machine died mid-run, or Ctrl-C on the local target; stopped:
# `launch down`). Every status but done and failed can be continued with `launch resume`.
STATUSES = ("created", "starting", "running", "done", "failed", "preempted", "interrupted", "stopped")
RESUMABLE = ("starting", "running", "preempted", "interrupted", "stopped")


def state_dir() -> Path:
    home = os.environ.get("QLORA_LAUNCH_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "qlora-launch"


def private_folder(path: Path) -> Path:
    """A folder of the state directory, made so that only this user may list or enter it (0700).
    One that exists keeps its mode: QLORA_LAUNCH_HOME may name a folder that is not ours alone
    (the files in it are 0600 all the same)."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return path


def private_file(path: Path) -> Path:
    """A state file (the run records, a known_hosts file, a lock): this user's alone (0600)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    return path


class RunNotFound(KeyError):
    def __str__(self) -> str:
        return f"no run {self.args[0]!r} in the run records; `launch runs` lists them"


@dataclass(frozen=True)
class RunRecord:
    id: str
    config_path: str
    run_dir: str
    # How the user sees the machine: local | ssh://user@host:port | an ssh config alias | vast:123;
    # None while a rented run has no machine yet.
    target: Optional[str] = None
    status: str = "created"
    provider: str = "local"  # the registered provider of the machine (the planned one until rented)
    machine_id: Optional[str] = None  # the provider's id of the machine, what reconnect() takes
    remote_dir: Optional[str] = None  # the run's folder on the target (absolute)
    pid: Optional[int] = None  # the detached job's wrapper process on the target
    python: Optional[str] = None  # the interpreter the runner uses there
    identity: Optional[str] = None  # path of the SSH key used (a path, never the key)
    started_at: Optional[float] = None  # when the runner was (last) started; None while it is not running
    elapsed_s: float = 0.0  # runner time of the finished segments (a resumed run has several)
    pulled_step: Optional[int] = None  # newest checkpoint pulled to this machine
    stored_step: Optional[int] = None  # newest checkpoint the runner reported in the store (storage.kind: s3)
    store_url: Optional[str] = None  # the run's folder in the store, s3://bucket/prefix/<run-id>/
    model: Optional[str] = None  # model.base, for calibrating later estimates
    tokens_per_s: Optional[float] = None  # measured: the median of the run's training steps
    # The shape that speed was measured at (a step's fixed costs make tokens/s depend on it):
    micro_batch: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    seq_tokens: Optional[float] = None  # measured: mean non-padding tokens per training sequence
    gpu: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    usd_per_hour: float = 0.0  # 0 for the local target and own boxes
    exit_code: Optional[int] = None
    error: Optional[str] = None
    stop_reason: Optional[str] = None  # why a `stopped` run stopped: budget | down | quota | no-progress
    created_at: float = 0.0
    updated_at: float = 0.0
    ended_at: Optional[float] = None

    def runner_seconds(self, now: Optional[float] = None) -> float:
        """The runner's time: its finished segments, plus the one running since started_at."""
        running = (now or clock.now()) - self.started_at if self.started_at else 0.0
        return (self.elapsed_s or 0.0) + running


@dataclass(frozen=True)
class MachineRecord:
    """One rented machine a run used: what it cost per hour and for how long. A run preempted
    twice has three. The $ of a run is the sum over its machines."""

    run_id: str
    target: str  # vast:<instance id>
    provider: str
    usd_per_hour: float  # as the instance reports it after start
    started_at: float  # when it was seen running
    gpu: Optional[str] = None
    region: Optional[str] = None
    ended_at: Optional[float] = None  # destroyed, or seen preempted / gone
    end_reason: Optional[str] = None  # done | failed | preempted | gone | stopped | released
    id: Optional[int] = None

    def seconds(self, now: Optional[float] = None) -> float:
        return max(0.0, (self.ended_at or now or clock.now()) - self.started_at)

    def usd(self, now: Optional[float] = None) -> float:
        return self.usd_per_hour * self.seconds(now) / 3600


_COLUMNS = [f.name for f in dataclasses.fields(RunRecord)]
_SQL_TYPES = {"str": "TEXT", "Optional[str]": "TEXT", "int": "INTEGER", "Optional[int]": "INTEGER",
              "float": "REAL", "Optional[float]": "REAL", "Optional[bool]": "INTEGER"}


@dataclass(frozen=True)
class MeasuredSpeed:
    """A finished run's training speed on one GPU model, and the shape it was measured at
    (None for records written before the launcher kept the shape)."""

    gpu: str  # as the target's nvidia-smi named it
    tokens_per_s: float
    micro_batch: Optional[int] = None
    seq_tokens: Optional[float] = None
    gradient_checkpointing: Optional[bool] = None


_BOOL_FIELDS = [f.name for f in dataclasses.fields(RunRecord) if str(f.type) == "Optional[bool]"]


def _record(row: sqlite3.Row) -> RunRecord:
    """A row as a record; SQLite keeps booleans as 0/1."""
    values = dict(row)
    for name in _BOOL_FIELDS:
        if values.get(name) is not None:
            values[name] = bool(values[name])
    return RunRecord(**values)


class RunStore:
    """The run records table. Each call commits: a killed launcher loses nothing it recorded."""

    def __init__(self, path: Path) -> None:
        private_folder(path.parent)
        self.path = private_file(path)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")  # a reader (launch status) never blocks a writer
        for companion in (Path(f"{path}-wal"), Path(f"{path}-shm")):  # SQLite makes them 0644 by the umask
            if companion.exists():
                os.chmod(companion, 0o600)
        columns = ", ".join(
            f"{f.name} {_SQL_TYPES[str(f.type)]}{' PRIMARY KEY' if f.name == 'id' else ''}"
            for f in dataclasses.fields(RunRecord)
        )
        self._db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")
        # Records written by an older launcher lack the newer columns: add them (NULLs).
        existing = {row["name"] for row in self._db.execute("PRAGMA table_info(runs)")}
        for f in dataclasses.fields(RunRecord):
            if f.name not in existing:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {f.name} {_SQL_TYPES[str(f.type)]}")
        self._db.execute("CREATE TABLE IF NOT EXISTS machines (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, "
                         "target TEXT, provider TEXT, usd_per_hour REAL, started_at REAL, gpu TEXT, region TEXT, "
                         "ended_at REAL, end_reason TEXT)")

    @classmethod
    def default(cls) -> "RunStore":
        return cls(state_dir() / "runs.sqlite")

    def create(self, record: RunRecord) -> RunRecord:
        now = clock.now()
        record = dataclasses.replace(record, created_at=now, updated_at=now)
        values = dataclasses.asdict(record)
        self._db.execute(
            f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
            [values[c] for c in _COLUMNS],
        )
        return record

    def update(self, run_id: str, **fields: Any) -> RunRecord:
        unknown = set(fields) - set(_COLUMNS) | ({"id", "created_at"} & set(fields))
        if unknown:
            raise ValueError(f"cannot set {', '.join(sorted(unknown))} on a run record")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown run status {fields['status']!r}; one of {', '.join(STATUSES)}")
        fields["updated_at"] = clock.now()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        cursor = self._db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*fields.values(), run_id])
        if cursor.rowcount == 0:
            raise RunNotFound(run_id)
        return self.get(run_id)

    def get(self, run_id: str) -> RunRecord:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", [run_id]).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return _record(row)

    def resolve(self, text: str) -> str:
        """The run id `text` names, as git names commits: the id itself, else the one id that
        starts with it. Several: a UsageError naming a few; none: RunNotFound."""
        if self._db.execute("SELECT 1 FROM runs WHERE id = ?", [text]).fetchone():
            return text
        # substr, not LIKE: LIKE ignores case and reads _ and % as wildcards.
        ids = [row["id"] for row in self._db.execute(
            "SELECT id FROM runs WHERE ? != '' AND substr(id, 1, length(?)) = ? ORDER BY created_at DESC",
            [text, text, text])]
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise RunNotFound(text)
        from launcher.errors import UsageError  # the command line's error class; imported only when needed

        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise UsageError(f"{text!r} starts {len(ids)} run ids ({shown}); type more characters of the one you mean")

    def touched_since(self, when: float) -> list[RunRecord]:
        """Every run updated since `when` (a run that may have spent money since then)."""
        rows = self._db.execute("SELECT * FROM runs WHERE updated_at >= ? ORDER BY created_at", [when]).fetchall()
        return [_record(row) for row in rows]

    def list(self, limit: int = 50) -> list[RunRecord]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", [limit]).fetchall()
        return [_record(row) for row in rows]

    def measured_speeds(self, model: str) -> list[MeasuredSpeed]:
        """The training speeds of finished runs of `model`, oldest first (one GPU per run: the
        runner's speed does not scale with more)."""
        rows = self._db.execute(
            "SELECT * FROM runs WHERE model = ? AND status = 'done' AND gpu IS NOT NULL AND tokens_per_s IS NOT NULL "
            "ORDER BY ended_at", [model]).fetchall()
        return [MeasuredSpeed(r.gpu, r.tokens_per_s, r.micro_batch, r.seq_tokens, r.gradient_checkpointing)
                for r in map(_record, rows)]

    def add_machine(self, machine: MachineRecord) -> MachineRecord:
        values = {k: v for k, v in dataclasses.asdict(machine).items() if k != "id"}
        cursor = self._db.execute(f"INSERT INTO machines ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                                  list(values.values()))
        return dataclasses.replace(machine, id=cursor.lastrowid)

    def end_machine(self, run_id: str, target: str, reason: str, ended_at: Optional[float] = None) -> None:
        """Close the open segment of `target` (idempotent: an ended one keeps its first end)."""
        self._db.execute("UPDATE machines SET ended_at = ?, end_reason = ? WHERE run_id = ? AND target = ? "
                         "AND ended_at IS NULL", [ended_at or clock.now(), reason, run_id, target])

    def machines(self, run_id: str) -> list[MachineRecord]:
        rows = self._db.execute("SELECT * FROM machines WHERE run_id = ? ORDER BY id", [run_id]).fetchall()
        return [MachineRecord(**dict(row)) for row in rows]

    def close(self) -> None:
        self._db.close()
