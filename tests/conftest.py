"""What every test runs under. SkyPilot (the [sky] extra) is pointed at a runtime folder of the
test session, before anything imports it: its price catalogs are the shipped snapshots (seeded
without .meta/ files, so it never downloads or refreshes them, catalogs/README.md), its state
database and any API server live there, it sends no usage telemetry, and no cloud credentials of
the machine running the tests are seen (boto would also ask the EC2 metadata address)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _isolate_skypilot() -> None:
    runtime = Path(tempfile.mkdtemp(prefix="qlora-tests-sky-"))
    shutil.copytree(ROOT / "catalogs" / "v8", runtime / ".sky" / "catalogs" / "v8")
    os.environ["SKY_RUNTIME_DIR"] = str(runtime)
    os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    # Empty files, not missing ones: SkyPilot's launch path opens AWS_CONFIG_FILE (a missing one is a
    # FileNotFoundError); empty ones hold no credentials, for boto and for our own check.
    for variable, name in (("AWS_SHARED_CREDENTIALS_FILE", "no-aws-credentials"), ("AWS_CONFIG_FILE", "no-aws-config")):
        (runtime / name).touch()
        os.environ[variable] = str(runtime / name)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "RUNPOD_API_KEY", "SKYPILOT_API_SERVER_ENDPOINT"):
        os.environ.pop(name, None)


_isolate_skypilot()
