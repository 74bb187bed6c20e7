"""Where the store's keys come from on the laptop (launcher/storage.py): the variables the config
names, else the AWS chain (a profile, the default credentials file); each missing piece is one
line naming what to set, and the keys themselves never show in what the launcher prints or keeps."""

from __future__ import annotations

import pytest

from launcher import storage
from tests.helpers import load_runner_module

runner = load_runner_module()


def section(**keys) -> object:
    return runner.from_dict(runner.StorageSection, {"kind": "s3", "bucket": "my-ckpts", **keys}, "storage")


@pytest.fixture
def aws_files(tmp_path, monkeypatch):
    """An AWS credentials file of our own (the tests' conftest points boto at empty ones)."""
    credentials = tmp_path / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    (tmp_path / "config").write_text("")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return credentials


def test_named_variables_give_the_keys_and_say_where_they_came_from():
    keys = storage.resolve_keys(section(access_key_env="R2_KEY", secret_key_env="R2_SECRET"),
                                {"R2_KEY": "AKIAEXAMPLEKEY", "R2_SECRET": "s3cr3t-value"})
    assert keys.source == "$R2_KEY and $R2_SECRET" and not keys.temporary
    assert keys.environment() == {runner.S3_KEY_ENV: "AKIAEXAMPLEKEY", runner.S3_SECRET_ENV: "s3cr3t-value"}
    assert "s3cr3t-value" not in repr(keys) and "AKIAEXAMPLEKEY" not in repr(keys)


def test_a_named_variable_that_is_not_set_is_one_line():
    with pytest.raises(storage.StorageProblem, match=r"R2_SECRET not set here; export the store's keys"):
        storage.resolve_keys(section(access_key_env="R2_KEY", secret_key_env="R2_SECRET"), {"R2_KEY": "x"})


def test_the_aws_chain_reads_a_profile(aws_files):
    aws_files.write_text("[work]\naws_access_key_id = AKIAWORK\naws_secret_access_key = work-secret\n")
    keys = storage.resolve_keys(section(profile="work"))
    assert keys.source == "AWS profile 'work'" and keys.access_key == "AKIAWORK"
    with pytest.raises(storage.StorageProblem, match=r"storage.profile: no AWS profile 'play'"):
        storage.resolve_keys(section(profile="play"))


def test_no_credentials_anywhere_says_how_to_give_them(aws_files):
    aws_files.write_text("")
    with pytest.raises(storage.StorageProblem, match=r"no credentials for the bucket here .*access_key_env"):
        storage.resolve_keys(section())


def test_temporary_keys_are_passed_with_their_token_and_warned_about(aws_files, monkeypatch):
    aws_files.write_text("")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temp-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "temp-token")
    keys = storage.resolve_keys(section())
    assert keys.temporary and keys.environment()[runner.S3_TOKEN_ENV] == "temp-token"
    assert keys.source == "the AWS chain (env)"
