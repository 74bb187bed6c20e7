"""What every test runs under. SkyPilot (the [sky] extra) is pointed at a runtime folder of the
test session, before anything imports it: its price catalogs are the shipped snapshots (seeded
without .meta/ files, so it never downloads or refreshes them, catalogs/README.md), its state
database and any API server live there, it sends no usage telemetry, and no cloud credentials of
the machine running the tests are seen (boto would also ask the EC2 metadata address)."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

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


@pytest.fixture
def kaggle_home(tmp_path, monkeypatch) -> Path:
    """The Kaggle client's config folder (KAGGLE_CONFIG_DIR), empty: no credentials anywhere the
    client looks (env, ~/.kaggle), no proxy between it and 127.0.0.1, its resumable-upload state
    under tmp_path."""
    home, config, tmp = tmp_path / "home", tmp_path / "kaggle-config", tmp_path / "tmp"
    for folder in (home, config, tmp):
        folder.mkdir()
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # The package's import builds a KaggleApi and authenticates (and creates its config folder):
    # here, with nothing to find, it prints the auth help and swallows its own exit.
    importlib.import_module("kaggle.api.kaggle_api_extended")
    return config


@pytest.fixture
def kaggle_fake(kaggle_home, monkeypatch):
    """The fake Kaggle API (tests/fakes/kaggle_api.py) for the tests' account, the real client's
    LOCAL endpoint and our QLORA_LAUNCH_KAGGLE_URL pointed at it; a kernel left running fails the test."""
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    from launcher.providers import kaggle_client
    from tests.fakes.kaggle_api import KEY, TOKEN, USER, FakeKaggle

    server = FakeKaggle(username=USER, key=KEY, token=TOKEN).start()
    monkeypatch.setitem(_env_to_endpoint, KaggleEnv.LOCAL, server.url)  # restored after the test
    monkeypatch.setenv(kaggle_client.URL_ENV, server.url)
    yield server
    left = server.running()
    server.stop()
    assert not left, f"kernels left running: {left}"
