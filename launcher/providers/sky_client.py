"""SkyPilot as the sky provider uses it: the SDK imported only here and only when needed (it
weighs ~0.5 GB and takes ~3 s to import), an API server reused or started on a port of ours,
and every request bounded in time.

SkyPilot 0.14's SDK sends each call to an API server and returns a request id. If none answers it
spawns one that keeps running after we exit and copies our environment once, at spawn. So:
- a server at SKYPILOT_API_SERVER_ENDPOINT (the user's, maybe remote) or on the default local
  port is reused as it is;
- otherwise we start one on OUR_PORT (never the user's default port, so their own `sky` keeps its
  server), with the environment set before the spawn, and stop it when the launcher exits;
- a server that does not answer within `timeout_s` is a ProviderError naming its log, not a hang.

Everything SkyPilot raises comes out as a ProviderError (CredentialsError for a cloud that
refuses us), with SkyPilot's own first line."""

from __future__ import annotations

import atexit
import importlib.util
import io
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from launcher.providers.base import CredentialsError, ProviderError

INSTALL_HINT = "install qlora-launch[sky] to rent on AWS/GCP/Azure/Lambda/RunPod/DigitalOcean (pip install 'qlora-launch[sky]')"
OUR_PORT = 46590  # the API server we start (SkyPilot's default is 46580: the user's own)
PORT_ENV = "SKYPILOT_API_SERVER_LOCAL_PORT"
ENDPOINT_ENV = "SKYPILOT_API_SERVER_ENDPOINT"

T = TypeVar("T")


class SkyError(ProviderError):
    """SkyPilot raised `kind` (its exception's class name, e.g. ClusterDoesNotExist)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class SkyCredentialsError(SkyError, CredentialsError):
    """SkyPilot says the cloud refuses us: trying its other offers is pointless."""


class SkyMissing(ProviderError):
    """SkyPilot is not installed here."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def installed() -> bool:
    return importlib.util.find_spec("sky") is not None


def import_sky() -> Any:
    """The `sky` package, or SkyMissing with the install line (never an ImportError)."""
    if not installed():
        raise SkyMissing()
    os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")  # no telemetry from our calls
    import sky

    return sky


def first_line(text: Any) -> str:
    """SkyPilot's reasons are paragraphs of commands to run; the first line says what is wrong."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else str(text)


def bounded(what: str, call: Callable[[], T], timeout_s: float) -> T:
    """call() in a thread, given up after timeout_s (SkyPilot's own waits can be minutes).
    The thread is a daemon: a hung request does not keep the launcher alive."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = e

    thread = threading.Thread(target=target, name=f"sky {what}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)  # in slices: a Ctrl-C is raised here between them, whatever the wait
    if thread.is_alive():
        raise ProviderError(f"SkyPilot did not answer {what} within {timeout_s:.0f} s; its API server log is "
                            f"{server_log()}; `sky api stop` then try again")
    if "error" in result:
        raise as_provider_error(what, result["error"])
    return result["value"]


def as_provider_error(what: str, error: BaseException) -> BaseException:
    """SkyPilot's exceptions as ours; KeyboardInterrupt and our own errors pass as they are."""
    if isinstance(error, (ProviderError, KeyboardInterrupt, SystemExit)):
        return error
    name = type(error).__name__
    message = f"SkyPilot {what}: {first_line(error) or name}"
    if name in ("NoCloudAccessError", "CloudUserIdentityError", "InvalidCloudCredentials"):
        return SkyCredentialsError(message + "; run `sky check`", name)
    return SkyError(message, name)


def server_log() -> Path:
    return Path(os.environ.get("SKY_RUNTIME_DIR", "~")).expanduser() / ".sky" / "api_server" / "server.log"


class SkyServer:
    """The API server our SDK calls go to: reused when one answers, else ours, stopped at exit."""

    _started_here = False
    _lock = threading.Lock()

    def __init__(self, timeout_s: float = 120.0, log: Callable[[str], None] = lambda text: None) -> None:
        self.timeout_s = timeout_s
        self.log = log

    def ensure(self) -> Any:
        """The sky module, with a server answering; starts ours when none does. The port is decided
        before SkyPilot computes its server URL (it caches it for the process)."""
        sky = import_sky()
        from sky import skypilot_config
        from sky.server import common

        with SkyServer._lock:
            named = os.environ.get(ENDPOINT_ENV) or skypilot_config.get_nested(("api_server", "endpoint"), None)
            if named:  # the user's server (maybe a team's, remote): used as it is, never started by us
                if self._healthy(common, str(named)):
                    return sky
                raise ProviderError(f"SkyPilot's API server at {named} ({ENDPOINT_ENV} or ~/.sky/config.yaml "
                                    "api_server.endpoint) does not answer; start it, or unset it")
            default = f"http://127.0.0.1:{common.DEFAULT_SERVER_PORT}"
            if not os.environ.get(PORT_ENV) and self._healthy(common, default):
                return sky  # the user's own local server
            os.environ[PORT_ENV] = os.environ.get(PORT_ENV) or str(OUR_PORT)  # client and server both read it
            _forget_server_url(common)
            if self._healthy(common, common.get_default_server_url()):  # ours, left by an earlier launcher
                return sky
            self.log(f"starting SkyPilot's API server on 127.0.0.1:{os.environ[PORT_ENV]} (stopped when we exit)")
            from sky.client import sdk

            if not SkyServer._started_here:  # before the start: one we gave up waiting for is still ours to stop
                SkyServer._started_here = True
                atexit.register(stop_our_server)
            bounded("starting its API server", lambda: sdk.api_start(), self.timeout_s)
            return sky

    @staticmethod
    def _healthy(common: Any, url: str) -> bool:
        try:
            status = bounded("a health check", lambda: common.get_api_server_status(url), 15)
        except ProviderError:
            return False
        return getattr(status, "status", None) == common.ApiServerStatus.HEALTHY


def _forget_server_url(common: Any) -> None:
    """SkyPilot caches its server URL and what it learnt of it per process: after the port
    changes, those answers are stale."""
    for name in ("get_server_url", "is_api_server_local", "get_api_server_status_response"):
        cached = getattr(common, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def stop_our_server() -> None:
    """At exit: stop the API server this launcher started (3-7 s), never one it found running."""
    if not SkyServer._started_here:
        return
    try:
        from sky.client import sdk

        bounded("stopping its API server", lambda: sdk.api_stop(), 30)
    except Exception:  # noqa: BLE001  (at exit: nothing left to tell)
        pass
    SkyServer._started_here = False


class LineSink(io.TextIOBase):
    """A text stream for sky.stream_and_get(output_stream=...): whole lines to a file, so
    SkyPilot's provisioning output lands in the run's own log instead of our console."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, text: str) -> int:
        self._file.write(text)
        self._file.flush()
        return len(text)

    def close(self) -> None:
        self._file.close()
        super().close()
