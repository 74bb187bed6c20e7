"""Checkpoint stores, as the laptop sees them.

`storage.kind: local`: checkpoints are pulled into runs/<run-id>/ (launcher/checkpoints.py) and
nowhere else. `storage.kind: s3`: the runner also uploads each complete checkpoint to an
S3-compatible bucket (AWS S3, Cloudflare R2, Backblaze B2, MinIO) under
s3://bucket/prefix/<run-id>/, so a run resumes on any machine without this laptop in the middle.
The store's layout, manifests and transfers are the runner's own code (CheckpointStore in
runner/qlora_runner.py): one implementation, so the two sides never disagree.

Here: which keys the runner gets (resolved on this machine: the variables named by
storage.access_key_env/secret_key_env, else the AWS chain with storage.profile), handed to it in
its environment only; the pre-flight probe (the bucket answers, takes a write and a delete with
those keys); and reading a run's folder there (`launch pull` when the machine is gone, `status`).
boto3 is the [s3] extra, imported only here and only for an s3 store."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.errors import EXIT_CONFIG, EXIT_TARGET
from launcher.paths import runner_module

INSTALL_HINT = "storage.kind is s3: install qlora-launch[s3] (boto3) here: pip install 'qlora-launch[s3]'"
PROBE_TIMEOUT_S = 10
RESULT_FILES = ("eval.json", "samples.jsonl", "metrics.jsonl", "base_eval.json", "status.json")


class StorageProblem(Exception):
    """The store cannot be used as configured; the message names the key and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class StoreKeys:
    """The keys the runner gets. `source` says where they came from, never what they are."""

    source: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    token: Optional[str] = field(default=None, repr=False)

    @property
    def temporary(self) -> bool:
        return bool(self.token)

    def environment(self) -> dict[str, str]:
        """What the runner's environment gets (and nothing else of ours carries them)."""
        qr = runner_module()
        env = {qr.S3_KEY_ENV: self.access_key, qr.S3_SECRET_ENV: self.secret_key}
        if self.token:
            env[qr.S3_TOKEN_ENV] = self.token
        return env


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise StorageProblem(INSTALL_HINT) from None
    return boto3


def resolve_keys(storage: Any, environ: Optional[Mapping[str, str]] = None) -> StoreKeys:
    """The store's keys as this machine has them: the variables storage.access_key_env and
    secret_key_env name, else what the AWS chain resolves (AWS_* variables, ~/.aws, with
    storage.profile or AWS_PROFILE). Raises StorageProblem naming what is missing."""
    environ = os.environ if environ is None else environ
    if storage.access_key_env:
        missing = [name for name in (storage.access_key_env, storage.secret_key_env) if not environ.get(name)]
        if missing:
            raise StorageProblem(f"storage.access_key_env/secret_key_env: {' and '.join(missing)} not set here; "
                                 "export the store's keys in those variables (the keys never go in the config)")
        return StoreKeys(f"${storage.access_key_env} and ${storage.secret_key_env}", environ[storage.access_key_env],
                         environ[storage.secret_key_env])
    boto3 = _boto3()
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    try:
        credentials = boto3.Session(profile_name=storage.profile).get_credentials()
    except ProfileNotFound:
        raise StorageProblem(f"storage.profile: no AWS profile {storage.profile!r} in ~/.aws/config or "
                             "~/.aws/credentials; fix the name (`aws configure list-profiles`)") from None
    except BotoCoreError as e:
        raise StorageProblem(f"storage: the AWS credentials cannot be read ({e}); fix ~/.aws or name the store's "
                             "keys with storage.access_key_env/secret_key_env") from None
    if credentials is None:
        raise StorageProblem("storage: no credentials for the bucket here (no AWS_ACCESS_KEY_ID, no ~/.aws "
                             "credentials); set them (`aws configure`), or name the variables holding the store's "
                             "keys with storage.access_key_env and storage.secret_key_env")
    frozen = credentials.get_frozen_credentials()
    source = f"AWS profile {storage.profile!r}" if storage.profile else f"the AWS chain ({credentials.method})"
    return StoreKeys(source, frozen.access_key, frozen.secret_key, frozen.token)


def where(storage: Any) -> str:
    return storage.endpoint_url or f"AWS S3{' ' + storage.region if storage.region else ''}"


def client(storage: Any, keys: StoreKeys, quick: bool = False) -> Any:
    """A boto3 client with these keys (quick: the probe's short timeouts, one retry)."""
    _boto3()
    return runner_module().s3_client(storage, keys.environment(), quick=quick)


def probe(storage: Any, keys: StoreKeys) -> None:
    """Before anything is rented: the bucket exists and these keys may list it, write to it and
    delete from it (rotation deletes). One StorageProblem line per failure kind."""
    from botocore.exceptions import ClientError, EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError

    s3 = client(storage, keys, quick=True)
    probe_key = f"{storage.prefix.strip('/')}/.qlora-launch-probe-{secrets.token_hex(4)}"
    step = "list"
    try:
        s3.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix.strip("/") + "/", MaxKeys=1)
        step = "write"
        s3.put_object(Bucket=storage.bucket, Key=probe_key, Body=b"qlora-launch write probe; safe to delete")
        step = "delete"
        s3.delete_object(Bucket=storage.bucket, Key=probe_key)
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as e:
        raise StorageProblem(f"storage.endpoint_url: cannot reach {where(storage)} ({type(e).__name__}); check the "
                             "address and that the service is up", EXIT_TARGET) from None
    except ClientError as e:
        raise StorageProblem(_refusal(storage, keys, step, e)) from None


def _refusal(storage: Any, keys: StoreKeys, step: str, e: Any) -> str:
    error = e.response.get("Error", {})
    code, status = error.get("Code", ""), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    bucket = storage.bucket
    if code in ("NoSuchBucket", "404") or status == 404:
        return (f"storage.bucket: no bucket {bucket!r} at {where(storage)}; create it (`aws s3 mb s3://{bucket}`, "
                "or the provider's console) or fix the name")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"):
        return (f"storage: {where(storage)} refused the keys from {keys.source} ({code}); check the access key and "
                "the secret (and storage.region)")
    what = {"list": "list", "write": "write to", "delete": "delete from (rotation deletes old checkpoints)"}[step]
    return (f"storage: the keys from {keys.source} may not {what} bucket {bucket!r} ({code or status}); "
            "grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on it")


def check(storage: Any) -> tuple[StoreKeys, list[str]]:
    """The pre-flight check: keys resolved and the bucket probed; the keys and any warnings."""
    keys = resolve_keys(storage)
    probe(storage, keys)
    warnings = []
    if keys.temporary:
        warnings.append(f"storage: the keys from {keys.source} are temporary (a session token: SSO or an assumed "
                        "role); the runner's uploads stop when they expire. For long runs name long-lived keys "
                        "with storage.access_key_env/secret_key_env")
    return keys, warnings


def runner_environment(config: Any) -> dict[str, str]:
    """The runner's secrets for this job: the store's keys, or nothing for a local store."""
    if not config.storage.enabled:
        return {}
    return resolve_keys(config.storage).environment()


# ---------------------------------------------------------------------------------------------
# a run's folder in the store
# ---------------------------------------------------------------------------------------------


def stored_checkpoints(config: Any, run_id: str, quick: bool = False) -> Optional[tuple[str, list[int]]]:
    """The run's store and its complete checkpoints' steps, asked now; None when the job (a
    LaunchConfig, or None when its file no longer loads) has no store. Raises StorageProblem."""
    if config is None or not config.storage.enabled:
        return None
    found = RunInStore(config.storage, run_id, quick=quick)
    return found.url, found.complete_steps()


class RunInStore:
    """s3://bucket/prefix/<run-id>/ read from this machine."""

    def __init__(self, storage: Any, run_id: str, keys: Optional[StoreKeys] = None, quick: bool = False) -> None:
        keys = keys or resolve_keys(storage)
        self.store = runner_module().CheckpointStore(storage, run_id, client=client(storage, keys, quick=quick))

    @property
    def url(self) -> str:
        return self.store.url

    def complete_steps(self) -> list[int]:
        return self._guard(self.store.complete_steps)

    def pull_checkpoint(self, step: int, into: Path) -> Path:
        """checkpoint-<step>, checked against its manifest, into the folder `into` (its checkpoints/)."""
        return self._guard(lambda: self.store.download_checkpoint(step, into / f"checkpoint-{step}"))

    def pull_results(self, run_dir: Path) -> list[str]:
        """The adapter and the run's files, where the store has them; the names pulled. A file
        here that is longer (metrics mirrored here after the store's copy was made) is kept."""
        def pull_file(name: str) -> bool:
            local = run_dir / name
            fresh = run_dir / f".{name}.from-store"
            if not self.store.download_file(name, fresh):
                return False
            if local.is_file() and local.stat().st_size > fresh.stat().st_size:
                fresh.unlink()
                return False
            fresh.replace(local)
            return True

        def pull() -> list[str]:
            run_dir.mkdir(parents=True, exist_ok=True)
            pulled = [name for name in RESULT_FILES if pull_file(name)]
            adapter_keys = self.store.keys_under("adapter/")
            if adapter_keys:
                for key in adapter_keys:
                    local = run_dir / key[len(self.store.root):]
                    local.parent.mkdir(parents=True, exist_ok=True)
                    self.store.download_file(key[len(self.store.root):], local)
                pulled.append("adapter/")
            return pulled

        return self._guard(pull)

    def read_text(self, name: str) -> Optional[str]:
        """The run's file `name` as text (status.json, runner.log...); None when the store has none."""
        def read() -> Optional[str]:
            with tempfile.TemporaryDirectory() as scratch:
                local = Path(scratch) / "file"
                return local.read_text() if self.store.download_file(name, local) else None

        return self._guard(read)

    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        """A checkpoint of this machine into the store, manifest last, with the run's history
        files (which must sit beside each other in the run's folder here)."""
        folder = history[0].parent if history else checkpoint.parent.parent
        run = runner_module().RunDir(folder, writes=False)
        self._guard(lambda: self.store.upload_checkpoint(step, checkpoint, run))

    def _guard(self, action: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        started = time.monotonic()
        try:
            return action()
        except (BotoCoreError, ClientError) as e:
            raise StorageProblem(f"cannot read {self.url} ({runner_module().store_error_text(e)} after "
                                 f"{time.monotonic() - started:.0f} s); check storage.* and the keys",
                                 EXIT_TARGET) from None
