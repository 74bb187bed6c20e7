"""The Vast.ai REST API, the calls our provider makes, in the request and reply shapes of the
vastai 1.9.1 SDK (vastai/api/{client,offers,instances,keys}.py; ../shared/PROVIDERS.md).

Why not the SDK itself: it pins exact versions of pillow and cryptography and pulls in aiohttp,
borb and lxml, a heavy and conflicting load for a laptop tool that needs ten endpoints; the
tests check the fake these calls talk to against the real SDK client instead.

Settings as the vastai CLI reads them: the server from VAST_URL (default
https://console.vast.ai), the key from VAST_API_KEY, else the CLI's own key files. The key goes
in the Authorization header only: never in a message, a log line or a command line.

Replies are checked for the shape we expect: an empty body, HTML, or JSON without the list we
asked for is VastBadReply, never "nothing there" (teardown must not conclude that no instance is
running from a mangled reply). 429 and 5xx are retried with backoff (Retry-After honoured up to a
minute), then raised as typed errors."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote_plus

from launcher.providers.base import CredentialsError, ProviderError

DEFAULT_URL = "https://console.vast.ai"
KEY_FILES = ("~/.config/vastai/vast_api_key", "~/.vast_api_key")  # the CLI's, then the SDK's
RETRIES = 5
FIRST_BACKOFF_S = 0.5
MAX_RETRY_AFTER_S = 60.0
TIMEOUT_S = 60.0


class VastError(ProviderError):
    """A Vast.ai API call failed; the message says which call and what to do."""


class VastAuthError(VastError, CredentialsError):
    pass


class VastNotFound(VastError):
    pass


class VastRateLimited(VastError):
    pass


class VastServerError(VastError):
    pass


class VastBadReply(VastError):
    """The reply was not the shape the call returns: nothing may be concluded from it."""


class VastRejected(VastError):
    """A 4xx for this request (offer gone, bid too low, bad argument)."""


def api_key() -> Optional[str]:
    """VAST_API_KEY, else the vastai CLI's key file, else the SDK's; None when there is none."""
    found = _find_key()
    return found[0] if found else None


def api_key_source() -> Optional[str]:
    """Where the key was found (the variable or the file), never the key; None without one."""
    found = _find_key()
    return found[1] if found else None


def _find_key() -> Optional[tuple[str, str]]:
    key = os.environ.get("VAST_API_KEY", "").strip()
    if key:
        return key, "VAST_API_KEY"
    for name in KEY_FILES:
        path = Path(name).expanduser()
        if path.is_file():
            key = path.read_text().strip()
            if key:
                return key, name
    return None


def server_url() -> str:
    return (os.environ.get("VAST_URL") or DEFAULT_URL).rstrip("/")


class VastAPI:
    """One account (or one instance's scoped key) on one server."""

    def __init__(self, key: Optional[str] = None, url: Optional[str] = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        key = key or api_key()
        if not key:
            raise VastAuthError("no Vast.ai API key: set VAST_API_KEY or run `vastai set api-key KEY` "
                                "(keys: https://cloud.vast.ai/manage-keys/)")
        self._key = key
        self.url = (url or server_url()).rstrip("/")
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"VastAPI({self.url})"

    # ---- the calls --------------------------------------------------------------------------

    def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        reply = self._call("POST", "/api/v0/bundles/", query, what="search offers")
        return _list_field(reply, "offers", "search offers")

    def create_instance(self, offer_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """No automatic retry: a create whose reply was lost may have rented a machine. The
        provider checks the run's label before it tries again."""
        reply = self._call("PUT", f"/api/v0/asks/{offer_id}/", body, what=f"create instance from offer {offer_id}",
                           retry=False)
        if not isinstance(reply, dict) or not reply.get("success") or not isinstance(reply.get("new_contract"), int):
            raise VastBadReply(f"create instance from offer {offer_id}: unexpected reply {_short(reply)}")
        return reply

    def instances(self) -> list[dict[str, Any]]:
        """Every instance of the account, all pages."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"select_filters": {}, "order_by": [{"col": "id", "dir": "asc"}], "limit": 25}
        for _ in range(1000):
            reply = self._call("GET", "/api/v1/instances/", None, query=params, what="list instances")
            rows.extend(_list_field(reply, "instances", "list instances"))
            token = reply.get("next_token")
            if not token:
                return rows
            params["after_token"] = token
        raise VastBadReply("list instances: the pages never ended")

    def instance(self, instance_id: int) -> Optional[dict[str, Any]]:
        """One instance, or None when the account has no such instance (any more)."""
        try:
            reply = self._call("GET", f"/api/v0/instances/{instance_id}/", None, query={"owner": "me"},
                               what=f"show instance {instance_id}")
        except VastNotFound:
            return None
        if not isinstance(reply, dict) or "instances" not in reply:
            raise VastBadReply(f"show instance {instance_id}: unexpected reply {_short(reply)}")
        row = reply["instances"]
        if row is not None and not (isinstance(row, dict) and row.get("id") == instance_id):
            raise VastBadReply(f"show instance {instance_id}: unexpected reply {_short(reply)}")
        return row

    def destroy_instance(self, instance_id: int) -> bool:
        """True when destroyed now, False when it was already gone."""
        try:
            self._call("DELETE", f"/api/v0/instances/{instance_id}/", {}, what=f"destroy instance {instance_id}")
        except VastNotFound:
            return False
        return True

    def set_state(self, instance_id: int, state: str) -> None:
        self._call("PUT", f"/api/v0/instances/{instance_id}/", {"state": state}, what=f"{state} instance {instance_id}")

    def ssh_keys(self) -> Any:
        return self._call("GET", "/api/v0/ssh/", None, what="list SSH keys")

    def add_ssh_key(self, public_key: str) -> None:
        self._call("POST", "/api/v0/ssh/", {"ssh_key": public_key}, what="add SSH key")

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        self._call("POST", f"/api/v0/instances/{instance_id}/ssh/", {"ssh_key": public_key},
                   what=f"attach SSH key to instance {instance_id}")

    # ---- transport --------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Optional[dict[str, Any]], *, what: str,
              query: Optional[dict[str, Any]] = None, retry: bool = True) -> Any:
        url = self.url + path
        if query:
            url += "?" + "&".join(f"{k}={quote_plus(v if isinstance(v, str) else json.dumps(v))}"
                                  for k, v in query.items())
        data = json.dumps(body).encode() if body is not None else None
        backoff = FIRST_BACKOFF_S
        attempts = RETRIES if retry else 1
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(url, data=data, method=method, headers={
                "Authorization": f"Bearer {self._key}", "Content-Type": "application/json",
                "User-Agent": "qlora-launch"})
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    return _parse(response.read(), what)
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode(errors="replace")
                wait = _retry_wait(status, text, e.headers.get("Retry-After"), backoff)
                if wait is not None and attempt < attempts:
                    self._sleep(wait)
                    backoff *= 2
                    continue
                raise _typed_error(status, text, what) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < attempts:
                    self._sleep(backoff)
                    backoff *= 2
                    continue
                reason = getattr(e, "reason", e)
                raise VastServerError(f"{what}: no answer from {self.url} ({reason})") from None
        raise AssertionError("unreachable")


def _parse(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise VastBadReply(f"{what}: the reply is not JSON ({_short(raw)})") from None


def _list_field(reply: Any, name: str, what: str) -> list[dict[str, Any]]:
    if not isinstance(reply, dict) or not isinstance(reply.get(name), list):
        raise VastBadReply(f"{what}: expected a list under {name!r}, got {_short(reply)}; "
                           "nothing is concluded from this reply")
    return reply[name]


def _retry_wait(status: int, text: str, retry_after: Optional[str], backoff: float) -> Optional[float]:
    """Seconds to wait before trying again, or None when this answer is final."""
    if status != 429 and status < 500:
        return None
    if status == 429 and "search_quota_exceeded" in text:
        return None  # a daily quota: retrying only burns requests
    try:
        wait = float(retry_after) if retry_after else backoff
    except ValueError:
        wait = backoff
    return wait if wait <= MAX_RETRY_AFTER_S else None


def _typed_error(status: int, text: str, what: str) -> VastError:
    try:
        detail = json.loads(text)
        message = detail.get("msg") or detail.get("error") or text
    except (ValueError, AttributeError):
        message = text.strip()[:200] or f"HTTP {status}"
    if status in (401, 403):
        return VastAuthError(f"{what}: Vast.ai refused the API key ({message}); check VAST_API_KEY or "
                             "`vastai set api-key`")
    if status == 404:
        return VastNotFound(f"{what}: not found ({message})")
    if status == 429:
        return VastRateLimited(f"{what}: Vast.ai is rate limiting us ({message}); try again in a minute")
    if status >= 500:
        return VastServerError(f"{what}: Vast.ai answered HTTP {status} ({message}); try again later")
    return VastRejected(f"{what}: {message}")


def _short(value: Any) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else json.dumps(value) if not isinstance(
        value, str) else value
    return repr(text[:120]) if text else "an empty body"
