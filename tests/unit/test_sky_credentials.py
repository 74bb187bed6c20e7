"""A cloud whose credentials fail is a clear line in the plan and in `launch check` ("aws: not
enabled: <why>; run `sky check aws`"), never a silently dropped offer, and `launch` then makes
no launch call and starts no SkyPilot API server. With credentials there, the verdict is
SkyPilot's own check (each cloud's check_credentials, no API server), pointed here at a closed
port on 127.0.0.1 so nothing leaves the machine. In-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from launcher import cli
from launcher.providers import sky as sky_provider
from launcher.providers import sky_client
from launcher.providers.base import Availability
from tests.helpers import ROOT
from tests.sshd import free_port

MISTRAL = ROOT / "configs" / "mistral-7b-qlora.yaml"
CHECKED = sky_provider.cloud_availability  # its cache is per process: cleared around each test
A10G_ON_AWS = ("plan", "--config", str(MISTRAL), "--gpu", "A10G", "--providers", "aws", "--on-demand")


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials of the machine's user
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    CHECKED.cache_clear()
    yield tmp_path
    CHECKED.cache_clear()


@pytest.fixture
def no_launch(monkeypatch) -> list[str]:
    """Fails the test if anything would reach SkyPilot's API server or launch a cluster."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("SkyPilot API server")
        raise AssertionError("the launcher reached for SkyPilot's API server")

    monkeypatch.setattr(sky_client.SkyServer, "ensure", refuse)
    monkeypatch.setattr(sky_provider.SkyProvider, "provision", refuse)
    return calls


def launch(*argv: str) -> tuple[int, str, str]:
    out, err = Console(width=200, record=True), Console(width=400, record=True)
    code = cli.main(list(argv), console=out, errors=err)
    return code, out.export_text(), err.export_text()


def test_a_cloud_without_credentials_is_a_line_in_the_plan_and_in_check(no_launch):
    code, out, _ = launch(*A10G_ON_AWS)
    assert code == 0
    assert "aws†" in out  # priced, marked as not rentable from here
    line = next(ln for ln in out.splitlines() if ln.startswith("† aws: not enabled"))
    assert "no AWS credentials here" in line and "run `sky check aws`" in line
    code, out, _ = launch(*A10G_ON_AWS, "--json")
    plan = json.loads(out)
    assert any(note.startswith("aws: not enabled") and "sky check aws" in note for note in plan["notes"])
    assert all(not row["rentable"] for row in plan["offers"] if row["provider"] == "aws")
    code, out, _ = launch("check", "--json")
    aws = {m["what"]: m for m in json.loads(out)["markets"]}["aws"]
    assert not aws["usable"] and "not enabled" in aws["detail"] and "sky check aws" in aws["fix"]
    assert no_launch == []


def test_launch_on_a_cloud_without_credentials_stops_before_any_launch_call(no_launch, tmp_path):
    code, _, err = launch(*A10G_ON_AWS[1:], "--yes", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    assert "aws: not enabled: no AWS credentials here" in err and "sky check aws" in err
    assert no_launch == []


def test_credentials_there_are_judged_by_skypilots_own_check(no_launch, monkeypatch, tmp_path):
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[default]\naws_access_key_id = AKIAEXAMPLEEXAMPLE00\n"
                           "aws_secret_access_key = example-secret-not-real\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: STS refuses
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    found = sky_provider.cloud_availability("aws")
    assert not found.usable
    assert found.detail.startswith("not enabled: ") and "no AWS credentials here" not in found.detail
    assert "\n" not in found.detail and found.fix == "run `sky check aws`"  # SkyPilot's first line, and the fix
    assert "example-secret-not-real" not in found.detail + str(found.fix)
    code, out, _ = launch("check", "--json")
    assert "example-secret-not-real" not in out and "AKIAEXAMPLE" not in out


def test_an_enabled_cloud_makes_its_offers_rentable(monkeypatch, no_launch):
    monkeypatch.setattr(sky_provider, "cloud_availability",
                        lambda cloud: Availability(cloud == "aws", f"{cloud}: as the test account says"))
    code, out, _ = launch(*A10G_ON_AWS, "--json")
    plan = json.loads(out)
    assert code == 0 and plan["notes"] == []
    chosen = plan["offers"][plan["choice"]]
    assert chosen["provider"] == "aws" and chosen["rentable"] and chosen["instance_type"] == "g5.xlarge"


def test_without_the_extra_the_clouds_are_priced_and_renting_says_how_to_install_it(monkeypatch, no_launch,
                                                                                   tmp_path):
    monkeypatch.setattr(sky_client, "installed", lambda: False)  # a laptop without qlora-launch[sky]
    code, out, _ = launch(*A10G_ON_AWS)
    assert code == 0 and "aws†" in out
    assert "aws: not enabled: SkyPilot is not installed here; install qlora-launch[sky] to rent on AWS" in out
    code, _, err = launch(*A10G_ON_AWS[1:], "--yes", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and "install qlora-launch[sky]" in err and "Error" not in err
    code, out, _ = launch("check", "--json")
    sky = {p["what"]: p for p in json.loads(out)["providers"]}["sky"]
    assert not sky["usable"] and "qlora-launch[sky]" in sky["fix"]
    code, out, err = launch("down", "--all", "--yes")  # (exit 8 here: Vast.ai has no key in this test)
    assert "SkyPilot is not installed here, so no cluster was launched from here" in out
    assert "SkyPilot" not in err  # a note, not an error: nothing can have been launched through it from here
