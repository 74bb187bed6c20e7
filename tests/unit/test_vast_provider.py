"""The Vast.ai client and provider pieces against the fake API, in process: retries and typed
errors, replies of the wrong shape, the state mapping, idempotent terminate, the on-start."""

from __future__ import annotations

import pytest

from launcher.providers.vast import VastSettings
from launcher.providers.base import Need
from launcher.providers.vast import VastMachine, VastProvider, map_state, onstart_command
from launcher.providers.vast_api import (
    VastAPI, VastAuthError, VastBadReply, VastRateLimited, VastServerError, api_key,
)
from launcher.remote import SSHOptions
from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast
from tests.helpers import ROOT


@pytest.fixture
def vast(tmp_path):
    fake = FakeVast(ROOT / "catalogs" / "v8" / "vast" / "vms.csv", tmp_path / "vast", loading_s=0.05).start()
    yield fake
    alive = fake.alive()
    fake.stop()
    assert alive == []


def api(fake: FakeVast, waits: list) -> VastAPI:
    return VastAPI(ACCOUNT_KEY, fake.url, sleep=waits.append)


def test_429_and_5xx_are_retried_with_backoff_then_typed(vast):
    waits: list[float] = []
    vast.fail_next(2, 429, retry_after=0.25)
    assert api(vast, waits).search_offers({"type": "on-demand"})
    assert waits == [0.25, 0.25]  # Retry-After honoured
    waits.clear()
    vast.fail_next(9, 500)
    with pytest.raises(VastServerError, match="HTTP 500"):
        api(vast, waits).search_offers({"type": "on-demand"})
    assert waits == [0.5, 1.0, 2.0, 4.0]  # backoff, then a typed error
    vast.failures.clear()
    vast.fail_next(9, 429)
    with pytest.raises(VastRateLimited):
        api(vast, []).instances()
    vast.failures.clear()


def test_a_bad_key_is_an_auth_error_that_never_shows_the_key(vast):
    with pytest.raises(VastAuthError) as caught:
        VastAPI("not-the-key-123", vast.url, sleep=lambda s: None).instances()
    assert "not-the-key-123" not in str(caught.value) and "VAST_API_KEY" in str(caught.value)
    assert "not-the-key" not in repr(VastAPI("not-the-key-123", vast.url))


def test_a_mangled_instance_list_is_an_error_not_an_empty_account(vast):
    vast.mangle_instance_list = True
    with pytest.raises(VastBadReply, match="nothing is concluded"):
        api(vast, []).instances()
    with pytest.raises(VastBadReply):
        VastProvider(api=api(vast, [])).labelled_machines()


def test_the_key_comes_from_the_environment_or_the_cli_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert api_key() is None
    (tmp_path / ".config" / "vastai").mkdir(parents=True)
    (tmp_path / ".config" / "vastai" / "vast_api_key").write_text("from-file\n")
    assert api_key() == "from-file"
    monkeypatch.setenv("VAST_API_KEY", "from-env")
    assert api_key() == "from-env"
    monkeypatch.delenv("VAST_API_KEY")
    (tmp_path / ".config" / "vastai" / "vast_api_key").unlink()
    with pytest.raises(VastAuthError, match="set VAST_API_KEY"):
        VastAPI()


@pytest.mark.parametrize("row, state", [
    (None, "gone"),
    ({"actual_status": "running"}, "running"),
    ({"actual_status": "loading"}, "starting"),
    ({"actual_status": None}, "starting"),
    ({"actual_status": "stopped", "intended_status": "running"}, "preempted"),
    ({"actual_status": "stopped", "intended_status": "stopped"}, "stopped"),
    ({"actual_status": "offline"}, "preempted"),
    ({"actual_status": "exited"}, "stopped"),
    ({"actual_status": "something new"}, "unknown"),
    ({}, "starting"),
])
def test_every_vast_status_maps_to_ours_and_unknown_ones_never_raise(row, state):
    assert map_state(row) == state


def test_terminate_is_idempotent_and_confirms_the_instance_is_gone(vast, tmp_path):
    provider = VastProvider(api=api(vast, []))
    made = vast.handle("PUT", f"/api/v0/asks/{min(vast.offers)}/", {"image": "img", "label": "x"},
                       f"Bearer {ACCOUNT_KEY}")["new_contract"]
    machine = VastMachine(made, None, SSHOptions(known_hosts=tmp_path / "kh", control_dir=tmp_path / "c"))
    provider.terminate(machine)
    assert vast.alive() == [] and provider.state(machine) == "gone"
    provider.terminate(machine)  # again: already gone is fine
    vast.fail_next(2, 503)
    provider.terminate(machine)  # transient errors are retried


def test_live_offers_respect_the_quality_floors_and_the_caps(vast):
    provider = VastProvider(VastSettings(min_reliability=0.95), api=api(vast, []))
    found = provider.offers(Need(interruptible=False, max_usd_per_hour=0.5, min_vram_gb=20))
    assert found and all(o.usd_per_hour <= 0.5 and not o.interruptible for o in found)
    for o in found:
        offer = vast.offers[o.offer_id]
        assert offer.reliability >= 0.95 and offer.verified and offer.gpu_ram_mb * offer.num_gpus >= 20_000
    spot = provider.offers(Need(interruptible=True))
    assert spot and all(o.interruptible and o.usd_per_hour == vast.offers[o.offer_id].min_bid for o in spot)


def test_the_on_start_fits_vast_and_carries_no_secret(monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", "secret-account-key")
    command = onstart_command(VastSettings(watchdog_idle_minutes=5), "~/qlora-launch")
    assert len(command) <= 4048 and "secret-account-key" not in command
    assert "QLORA_WATCHDOG_IDLE_S=300" in command and "watchdog.py" in command


def test_the_on_start_fits_vasts_limit_with_the_venv_prebuild_and_a_watchdog_that_compiles():
    from launcher.providers.vast import ONSTART_LIMIT, WATCHDOG, compact_python

    command = onstart_command(VastSettings(), "~/qlora-launch")
    assert len(command) <= ONSTART_LIMIT and "bootstrap.sh" in command  # the prebuild was not dropped to fit
    compact = compact_python(WATCHDOG.read_text())
    compile(compact, "idle_watchdog.py", "exec")
    assert '"""' not in compact and "def busy" in compact and len(compact) < len(WATCHDOG.read_text())
