"""The seam to Kaggle's official client (kaggle 2.x on kagglesdk; the [kaggle] extra): imported
lazily, authenticated without ever exiting the process or printing a secret, pointed at
QLORA_LAUNCH_KAGGLE_URL when that is set, and every client error turned into a one-line
ProviderError. The rest of the Kaggle provider talks to Kaggle only through `connect()` and
`guarded()`.

What the client does that we must work around (read in kaggle/api/kaggle_api_extended.py and
kagglesdk, and run against tests/fakes/kaggle_api.py):
- `import kaggle` (the package; any of its modules) builds a KaggleApi and authenticates at
  import; with no credentials it prints its help on stdout. So the import's output is swallowed,
  and the instance we use is configured afresh (config_dir/config/args are class attributes,
  fixed at import from the environment of that moment).
- `authenticate()` with no usable credentials prints help and calls exit(1): SystemExit, caught
  here and said in one line (kaggle.json, KAGGLE_USERNAME + KAGGLE_KEY, or an access token).
- A key is not checked by authenticate(): the first call fails with requests.HTTPError 401; the
  kernel calls turn 401/403 into ValueError("Cannot access kernel ..."). Both read as
  KaggleCredentialsError.
- The client has no URL setting. Its LOCAL environment's endpoint is looked up in
  kagglesdk.kaggle_env._env_to_endpoint each time a client is built: QLORA_LAUNCH_KAGGLE_URL maps
  it (process-wide) and the instance gets `args = ["--local"]` (LOCAL adds the /api prefix).
- It imports `six` without declaring it: the [kaggle] extra depends on six; a missing module is
  an install line, never an ImportError."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from launcher.providers.base import CredentialsError, ProviderError

URL_ENV = "QLORA_LAUNCH_KAGGLE_URL"  # e.g. http://127.0.0.1:PORT: a fake of Kaggle's API (the tests)
INSTALL = "pip install 'qlora-launch[kaggle]'"
SETUP = ("create an API token at https://www.kaggle.com/settings (API: Create New Token) and save it as "
         "~/.kaggle/access_token (or export KAGGLE_API_TOKEN=...), or put the legacy kaggle.json there "
         "(chmod 600), or export KAGGLE_USERNAME=... KAGGLE_KEY=...")

T = TypeVar("T")


class KaggleError(ProviderError):
    """Kaggle (or its client) could not do what was asked; the message is one line."""


class KaggleCredentialsError(CredentialsError, KaggleError):
    """No usable Kaggle credentials here, or Kaggle refused them."""


# ---------------------------------------------------------------------------------------------
# where the client looks for credentials (files and environment only: no import, no network)
# ---------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The folder the client reads kaggle.json from: KAGGLE_CONFIG_DIR, else ~/.kaggle, else (on
    Linux, when ~/.kaggle does not exist) $XDG_CONFIG_HOME/kaggle, as KaggleApi computes it."""
    named = os.environ.get("KAGGLE_CONFIG_DIR")
    if named:
        return Path(named)
    home = Path(os.path.expanduser("~")) / ".kaggle"
    if sys.platform.startswith("linux") and not home.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path(os.path.expanduser("~")) / ".config") / "kaggle"
    return home


def token_files() -> list[Path]:
    home = Path(os.path.expanduser("~")) / ".kaggle"
    return [home / "access_token", home / "access_token.txt"]


def places() -> list[str]:
    """Where credentials are looked for, in the client's order, for a message."""
    return ["KAGGLE_API_TOKEN", *(str(p) for p in token_files()), "KAGGLE_USERNAME/KAGGLE_KEY",
            str(config_dir() / "kaggle.json"), str(Path(os.path.expanduser("~")) / ".kaggle" / "credentials.json")]


def credential_source() -> Optional[str]:
    """Where the credentials the client would use come from (never the secret); None: none found."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "an access token from KAGGLE_API_TOKEN"
    for path in token_files():
        if path.is_file() and path.read_text().strip():
            return f"an access token from {path}"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "a key from KAGGLE_USERNAME/KAGGLE_KEY"
    file = config_dir() / "kaggle.json"
    if file.is_file():
        return f"a key from {file}"
    oauth = Path(os.path.expanduser("~")) / ".kaggle" / "credentials.json"
    if oauth.is_file():
        return f"`kaggle auth login` credentials in {oauth}"
    return None


def installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("kaggle", "kagglesdk"))


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------


def _api_class() -> Any:
    """KaggleApi, imported with the package's import-time authentication kept quiet (and, under
    QLORA_LAUNCH_KAGGLE_URL, pointed at that URL, so even that first try never leaves for kaggle.com)."""
    url = os.environ.get(URL_ENV)
    try:
        if url:
            _map_local(url)
        already = "kaggle.api.kaggle_api_extended" in sys.modules
        saved = os.environ.get("KAGGLE_API_ENVIRONMENT")
        if url and not already:
            os.environ["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"  # the import's own KaggleApi: --local
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                from kaggle.api.kaggle_api_extended import KaggleApi
        finally:
            if url and not already:
                if saved is None:
                    os.environ.pop("KAGGLE_API_ENVIRONMENT", None)
                else:
                    os.environ["KAGGLE_API_ENVIRONMENT"] = saved
    except ImportError as e:
        missing = f" ({e.name} is missing)" if getattr(e, "name", None) else ""
        raise KaggleError(f"the Kaggle client is not installed here{missing}: {INSTALL}") from None
    return KaggleApi


def _map_local(url: str) -> None:
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    _env_to_endpoint[KaggleEnv.LOCAL] = url.rstrip("/")


def connect() -> Any:
    """An authenticated KaggleApi for the credentials of this environment (KaggleCredentialsError
    when there are none; the key itself is checked by the first call)."""
    api_class = _api_class()
    api = api_class()
    folder = config_dir()
    api.config_dir, api.config = str(folder), str(folder / "kaggle.json")  # class attributes, fixed at import
    url = os.environ.get(URL_ENV)
    api.args = ["--local"] if url else []
    if url:
        _map_local(url)
    help_text = io.StringIO()
    try:
        with contextlib.redirect_stdout(help_text):
            api.authenticate()
    except SystemExit:
        raise KaggleCredentialsError(f"no Kaggle credentials here (looked in {', '.join(places())}): {SETUP}") \
            from None
    except Exception as e:  # noqa: BLE001  (an access token is introspected over the network)
        raise KaggleError(f"Kaggle authentication failed: {describe(e)}") from None
    return api


def username(api: Any) -> str:
    name = (api.config_values or {}).get("username")
    if not name:
        raise KaggleCredentialsError(f"the Kaggle credentials name no user: {SETUP}")
    return str(name)


def guarded(what: str, call: Callable[[], T]) -> T:
    """`call()` with every client error as a one-line KaggleError (credentials: KaggleCredentialsError)."""
    try:
        return call()
    except ProviderError:
        raise
    except SystemExit:
        raise KaggleCredentialsError(f"{what}: the Kaggle client found no credentials: {SETUP}") from None
    except Exception as e:  # noqa: BLE001  (requests, kagglesdk and the client's ValueErrors)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise KaggleCredentialsError(f"{what}: Kaggle refused the credentials ({credential_source() or 'none'}): "
                                         f"{SETUP}") from None
        if isinstance(e, ValueError) and str(e).startswith("Cannot access"):
            raise KaggleCredentialsError(f"{what}: {describe(e)} (wrong account, or the credentials were "
                                         "refused)") from None
        raise KaggleError(f"{what}: {describe(e)}") from None


def describe(error: BaseException) -> str:
    """An error's first line, with its HTTP status when it has one; never a header or a secret."""
    import requests

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, requests.ConnectionError):
        return f"Kaggle cannot be reached ({os.environ.get(URL_ENV) or 'https://www.kaggle.com'})"
    text = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return f"HTTP {status}: {text}" if status and str(status) not in text else text


# ---------------------------------------------------------------------------------------------
# the weekly GPU quota
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    """The account's weekly GPU time (Kaggle's GetAcceleratorQuotaStatistics, `kaggle quota`)."""

    used_h: float
    reserved_h: float  # held by sessions running now
    total_h: float
    refresh_at: Optional[datetime]  # UTC

    @property
    def left_h(self) -> float:
        return max(0.0, self.total_h - self.used_h - self.reserved_h)

    def refresh_text(self) -> str:
        return self.refresh_at.strftime("%a %d %b %H:%M UTC") if self.refresh_at else "at the weekly reset"


def quota(api: Any) -> Quota:
    """The weekly GPU quota left, from Kaggle's own call."""
    reply = guarded("reading the weekly GPU quota", api.quota_view)
    gpu = getattr(reply, "gpu_quota", None)
    if gpu is None:
        raise KaggleError("reading the weekly GPU quota: the reply has no gpuQuota")

    def hours(value: Any) -> float:
        return value.total_seconds() / 3600 if value is not None else 0.0

    refresh = getattr(reply, "quota_refresh_time", None)
    if isinstance(refresh, datetime) and refresh.tzinfo is None:
        refresh = refresh.replace(tzinfo=timezone.utc)
    return Quota(used_h=hours(gpu.time_used), reserved_h=hours(getattr(gpu, "time_reserved", None)),
                 total_h=hours(gpu.total_time_allowed), refresh_at=refresh if isinstance(refresh, datetime) else None)
