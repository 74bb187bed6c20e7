"""An S3-compatible server on loopback: moto's own S3 implementation, served the way moto's
ThreadedMotoServer serves it, with two things added for the tests.

- Credentials are enforced (moto's IAM authentication): one user with an s3:* policy is made at
  start (`access_key`, `secret_key`); any other key is refused as S3 refuses it
  (InvalidAccessKeyId, SignatureDoesNotMatch).
- Every request is recorded (method, path, query), and a request whose path contains a chosen
  text can be held until the test releases it: a machine dying in the middle of an upload.

moto keeps its state per process: buckets outlive a server, so each test makes its own bucket.
Run on its own: python -m tests.fakes.s3_server --port P (prints the keys)."""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REGION = "us-east-1"
S3_FULL_ACCESS = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass
class Hold:
    """Requests whose path contains `text` wait here until `release()` (or the timeout)."""

    text: str
    methods: tuple[str, ...] = ("PUT", "POST")
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class S3Server:
    def __init__(self, port: int = 0, hold_timeout_s: float = 300.0) -> None:
        self.port = port
        self.requests: list[tuple[str, str, str]] = []
        self.holds: list[Hold] = []
        self.hold_timeout_s = hold_timeout_s
        self.access_key = ""
        self.secret_key = ""
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    # ---- serving ------------------------------------------------------------------------

    def start(self) -> "S3Server":
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, self._middleware(app), threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-server", daemon=True)
        self._thread.start()
        self._make_user()
        return self

    def stop(self) -> None:
        for hold in self.holds:
            hold.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _middleware(self, app: Callable) -> Callable:
        def serve(environ: dict, start_response: Callable) -> Any:
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            self.requests.append((method, path, environ.get("QUERY_STRING", "")))
            for hold in list(self.holds):
                if method in hold.methods and hold.text in path and not hold.released.is_set():
                    hold.arrived.set()
                    hold.released.wait(self.hold_timeout_s)
            return app(environ, start_response)

        return serve

    def hold(self, text: str) -> Hold:
        hold = Hold(text)
        self.holds.append(hold)
        return hold

    # ---- credentials and buckets --------------------------------------------------------

    def _auth_after(self, free_requests: str) -> None:
        """moto's switch: authenticate every request after this many (inf: none checked)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=free_requests.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST"),
                               timeout=10).read()

    def _make_user(self) -> None:
        import boto3

        self._auth_after("inf")
        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        name = f"tests-{id(self)}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(S3_FULL_ACCESS))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self._auth_after("0")

    def client(self, access_key: Optional[str] = None, secret_key: Optional[str] = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        found = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
        return sorted(found)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def requests_for(self, text: str, method: Optional[str] = None) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if text in r[1] and (method is None or r[0] == method)]


if __name__ == "__main__":
    import argparse

    from tests.fakes import serve_until_interrupted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = S3Server(args.port).start()
    print(f"endpoint {server.url}\naccess key {server.access_key}\nsecret key {server.secret_key}", flush=True)
    serve_until_interrupted(server.stop)
