"""The Kaggle provider's client seam, offer and plan, against the kaggle_fake Kaggle API through the REAL
kaggle client (tests/fakes/kaggle_api.py), reached with QLORA_LAUNCH_KAGGLE_URL as a user would.
HOME, KAGGLE_CONFIG_DIR and the client's upload folder are the test's own; no secret is printed."""

from __future__ import annotations

import json
import sys

import pytest

from launcher import config as launch_config
from launcher import offers
from launcher.providers import kaggle_client
from launcher.providers.base import MachineSpec, Need, Offer, ProviderError
from launcher.providers.kaggle import KaggleProvider, KaggleSettings, session_count
from tests.fakes.kaggle_api import TOKEN, USER, with_key
from tests.helpers import ROOT








# ---- credentials and the client ---------------------------------------------------------------


def test_no_credentials_is_one_line_saying_where_it_looked_and_how_to_set_them(kaggle_fake, kaggle_home, capsys):
    found = KaggleProvider.availability()
    assert not found.usable and "KAGGLE_API_TOKEN" in found.detail and str(kaggle_home / "kaggle.json") in found.detail
    assert "access_token" in found.fix and "KAGGLE_USERNAME" in found.fix
    assert KaggleProvider().offers(Need()) == []  # no offer, no call
    with pytest.raises(kaggle_client.KaggleCredentialsError) as error:
        kaggle_client.connect()  # the client's exit(1), caught
    assert "\n" not in str(error.value) and "no Kaggle credentials here" in str(error.value)
    assert "Authentication required" not in capsys.readouterr().out  # the client's help stays quiet
    assert kaggle_fake.requests == []


def test_a_missing_kaggle_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(kaggle_client, "installed", lambda: False)
    found = KaggleProvider.availability()
    assert not found.usable and found.fix == kaggle_client.INSTALL and not found.matters
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)  # import fails as without the extra
    with pytest.raises(kaggle_client.KaggleError, match=r"not installed here.*qlora-launch\[kaggle\]"):
        kaggle_client.connect()


def test_a_refused_key_is_one_clear_line(kaggle_fake, kaggle_home):
    with_key(kaggle_home, "not-the-key")
    assert KaggleProvider.availability().usable  # a key is only checked by a call
    with pytest.raises(kaggle_client.KaggleCredentialsError) as error:
        KaggleProvider().offers(Need())
    text = str(error.value)
    assert "refused the credentials" in text and "not-the-key" not in text and "\n" not in text


def test_an_access_token_reaches_the_fake_through_the_documented_url(kaggle_fake, kaggle_home, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    assert KaggleProvider.availability().detail == "an access token from KAGGLE_API_TOKEN"
    kaggle_fake.gpu_time_used_s, kaggle_fake.gpu_total_s = 11.5 * 3600, 30 * 3600
    provider = KaggleProvider()
    quota = provider.quota()
    assert (quota.used_h, quota.total_h, quota.left_h) == (11.5, 30.0, 18.5) and quota.refresh_at is not None
    assert kaggle_fake.rpcs() == ["IntrospectToken", "GetAcceleratorQuotaStatistics"]
    assert provider.username == USER
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


# ---- the offer ----------------------------------------------------------------------------------


def test_the_one_offer_is_t4_x2_free_interruptible_with_the_quota_left(kaggle_fake, kaggle_home):
    with_key(kaggle_home)
    kaggle_fake.gpu_time_used_s = 11.5 * 3600
    [offer] = KaggleProvider().offers(Need())
    assert (offer.provider, offer.gpu, offer.gpu_count, offer.vram_gb) == ("kaggle", "T4", 2, 16.0)
    assert (offer.usd_per_hour, offer.interruptible, offer.instance_type) == (0.0, True, "NvidiaTeslaT4")
    assert offer.hours_left == 18.5


@pytest.mark.parametrize("need", [Need(gpu="A100"), Need(gpu_count=4), Need(interruptible=False),
                                  Need(min_vram_gb=40)])
def test_a_need_kaggle_cannot_meet_gets_no_offer(kaggle_fake, kaggle_home, need):
    with_key(kaggle_home)
    assert KaggleProvider().offers(need) == []
    assert KaggleProvider().offers(Need(gpu="Tesla T4", gpu_count=2, min_vram_gb=20))  # what it can


def test_p100_is_retired_and_never_offered():
    with pytest.raises(ValueError, match="NvidiaTeslaP100 is retired.*NvidiaTeslaT4"):
        KaggleSettings(accelerator="NvidiaTeslaP100")
    with pytest.raises(ValueError, match="not a Kaggle accelerator"):
        KaggleSettings(accelerator="TpuV38")
    assert KaggleSettings().slug("20261202-1650-Ab_c") == "qlora-launch-20261202-1650-ab-c"


def test_an_empty_quota_fails_before_anything_is_pushed(kaggle_fake, kaggle_home, tmp_path):
    with_key(kaggle_home)
    kaggle_fake.gpu_time_used_s = kaggle_fake.gpu_total_s
    spec = MachineSpec(run_id="r1", known_hosts=tmp_path / "kh", control_dir=tmp_path)
    with pytest.raises(ProviderError, match="no weekly GPU quota left; it refreshes .*--providers vast"):
        KaggleProvider().provision(KaggleProvider().offers(Need())[0], spec)
    assert not {"SaveKernel", "CreateDataset", "StartBlobUpload"} & set(kaggle_fake.rpcs())


def test_provision_names_the_kernel_and_state_reads_its_status(kaggle_fake, kaggle_home, tmp_path):
    with_key(kaggle_home)
    provider = KaggleProvider()
    spec = MachineSpec(run_id="r1", known_hosts=tmp_path / "kh", control_dir=tmp_path)
    got = provider.provision(provider.offers(Need())[0], spec)
    assert got.machine_id == f"kaggle:{USER}/qlora-launch-r1" and got.usd_per_hour == 0
    kernel = provider.reconnect(got.machine_id, spec)
    assert provider.state(kernel) == "unknown"  # not pushed yet: Kaggle answers 403 as for a stranger's
    folder = tmp_path / "k"
    folder.mkdir()
    (folder / "run.py").write_text("print('hi')\n")
    (folder / "kernel-metadata.json").write_text(json.dumps({
        "id": kernel.ref, "title": "qlora run r1", "code_file": "run.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": True}))
    provider.api.kernels_push(str(folder))
    kaggle_fake.wait_finished()
    assert provider.state(kernel) == "idle"  # ended, not lost: look() reads how the runner ended


# ---- the plan -----------------------------------------------------------------------------------


def kaggle_offer(hours_left: float) -> Offer:
    return Offer(provider="kaggle", gpu="T4", gpu_count=2, vram_gb=16.0, usd_per_hour=0.0, interruptible=True,
                 instance_type="NvidiaTeslaT4", hours_left=hours_left)


PAID = Offer(provider="vast", gpu="A10G", gpu_count=1, vram_gb=24.0, usd_per_hour=0.5, interruptible=True)


def test_the_plan_takes_the_free_offer_while_the_quota_holds_the_job_and_says_why_not_after():
    need = offers.job_need(launch_config.load(ROOT / "configs" / "mistral-7b-qlora.yaml"))
    hours = offers.evaluate(kaggle_offer(100), need).est_hours
    assert hours and hours > 0.5
    rows, choice = offers.plan([PAID, kaggle_offer(hours + 5)], need, offers.Constraints())
    assert rows[choice].offer.provider == "kaggle" and rows[choice].est_total_usd == 0
    note = KaggleProvider.plan_note(None, rows[choice].offer, hours)
    assert note.startswith(f"kaggle: free: {offers._hours_text(hours + 5)} left this week")

    rows, choice = offers.plan([PAID, kaggle_offer(0.5)], need, offers.Constraints())
    assert rows[choice].offer.provider == "vast"
    free = next(p for p in rows if p.offer.provider == "kaggle")
    assert not free.fits and free.why_not == f"needs {offers._hours_text(hours)}, 0.5 h left"


def test_a_job_longer_than_a_session_counts_its_sessions():
    settings = KaggleSettings()
    assert session_count(3, settings) == 1 and session_count(11.6, settings) == 1
    assert session_count(26, settings) == 3
    note = KaggleProvider.plan_note(None, kaggle_offer(29.5), 26.0)
    assert note == ("kaggle: free: 29.5 h left this week; the job needs ~26 h, 3 sessions of 12 h (each continues "
                    "from the newest checkpoint)")
    assert KaggleProvider.plan_note(None, PAID, 2.0) is None
