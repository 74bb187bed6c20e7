"""A fake of the Hugging Face Hub's HTTP API, as much of it as huggingface_hub 2.4's
create_repo, upload_folder (the LFS path: HF_HUB_DISABLE_XET=1) and model_info use, on
127.0.0.1. Every request is recorded; repos keep their files, so a test reads what was uploaded.

The shapes are the client's (huggingface_hub/hf_api.py, _commit_api.py, lfs.py):
  POST /api/repos/create                      {name, organization, visibility?} -> {url} | 409
  POST /api/validate-yaml                     {content, repoType} -> {errors, warnings} (always JSON)
  POST /api/models/<repo>/preupload/<rev>     {files: [{path, sample, size}]} -> {files: [{path, uploadMode,
                                              shouldIgnore, oid}]}
  POST /<repo>.git/info/lfs/objects/batch     git-lfs batch: objects [{oid, size}] -> actions upload (+ verify)
  PUT  <upload href>                          the bytes (Content-Length or chunked), checked against the oid
  POST <verify href>                          {oid, size}
  POST /api/models/<repo>/commit/<rev>        ndjson: header, file (base64), lfsFile (oid) -> {commitUrl, commitOid}
  GET  /api/models/<repo>[/revision/<rev>]    model info, cardData from `models` (else 404 RepoNotFound)
  GET  /api/agent-harnesses                   the registry the client's user agent detection fetches (once
                                              a day, cached in HF_HOME): an empty one
Writes need `Authorization: Bearer <token>` (401 otherwise), as the Hub's do.

    python -m tests.fakes.hub_api --port P --token T     # for manual trials: HF_ENDPOINT=http://127.0.0.1:P
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.fakes.http_json import JSONHandler, Recorded
from typing import Any, Optional

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model")  # the Hub's default .gitattributes
LFS_MIN_BYTES = 10 * 1024 * 1024  # larger files go to LFS whatever their name
# A few of the Hub's license ids (https://huggingface.co/docs/hub/repositories-licenses): enough to
# refuse one that is not an id, as the Hub's validate-yaml does.
LICENSES = {"apache-2.0", "mit", "llama3.1", "llama3", "llama2", "gemma", "cc-by-4.0", "cc-by-nc-4.0",
            "bsd-3-clause", "openrail", "other", "unknown"}




@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 the Hub reports as a regular file's oid (what the client compares)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self, token: str, models: Optional[dict[str, dict[str, Any]]] = None, port: int = 0) -> None:
        self.token = token
        self.models = models or {}  # base models model_info answers for: id -> cardData
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def routes(self, telemetry: bool = False) -> list[str]:
        """`METHOD path` of every request, in order (the upload hrefs with their oid); without the
        client's agent-registry fetch unless `telemetry`."""
        return [f"{r.method} {r.path.split('?')[0]}" for r in self.requests
                if telemetry or r.path != "/api/agent-harnesses"]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(JSONHandler):
        fake = hub

        def _error(self, status: int, message: str, code: Optional[str] = None) -> None:
            self._send(status, {"error": message},
                       headers={"X-Error-Message": message, **({"X-Error-Code": code} if code else {})})

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        # ---- routes -----------------------------------------------------------------------

        def do_GET(self) -> None:
            self._record(b"")
            path = self.path.split("?")[0]
            if path == "/api/agent-harnesses":
                return self._send(200, {"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}})
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if match and match.group(1) in hub.models:
                repo_id = match.group(1)
                return self._send(200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": "0" * 40,
                                        "private": False, "cardData": hub.models[repo_id]})
            if match and match.group(1) in hub.repos:
                return self._send(200, {"_id": match.group(1), "id": match.group(1), "sha": "0" * 40,
                                        "private": hub.repos[match.group(1)].private})
            self._error(404, "Repository not found", "RepoNotFound")

        def do_PUT(self) -> None:
            body = self._body()
            self._record(body)
            match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            if not match:
                return self._error(404, "not found")
            if hashlib.sha256(body).hexdigest() != match.group(1):
                return self._error(400, "the content does not match its oid")
            with hub.lock:
                hub.lfs[match.group(1)] = body
            self._send(200, None)

        def do_POST(self) -> None:
            body = self._body()
            self._record(body)
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                return self._create(body)
            if path == "/api/validate-yaml":
                return self._validate_yaml(body)
            if path == "/lfs-verify":
                return self._verify(body)
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
            if match:
                repo = hub.repos.get(match.group(1))
                if not self._authorized():
                    return None
                if repo is None:
                    return self._error(404, "Repository not found", "RepoNotFound")
                return self._preupload(repo, body) if match.group(2) == "preupload" else self._commit(repo, body)
            match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if match:
                return self._lfs_batch(match.group(1), body)
            self._error(404, "not found")

        def _create(self, body: bytes) -> None:
            if not self._authorized():
                return
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            url = f"{hub.url}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": url},
                                      headers={"X-Error-Message": "You already created this model repo"})
                hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            self._send(200, {"url": url, "name": repo_id, "id": "fake-" + hashlib.md5(repo_id.encode()).hexdigest()})

        def _validate_yaml(self, body: bytes) -> None:
            content = json.loads(body).get("content", "")
            match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
            errors = []
            if match:
                try:
                    meta = yaml.safe_load(match.group(1)) or {}
                except yaml.YAMLError as e:
                    meta, errors = {}, [{"message": f"invalid YAML: {e}"}]
                license_id = meta.get("license") if isinstance(meta, dict) else None
                if license_id is not None and license_id not in LICENSES:
                    errors.append({"message": f'"license" must be one of the Hub\'s license ids, got {license_id!r}'})
                base = meta.get("base_model") if isinstance(meta, dict) else None
                if base is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
                    errors.append({"message": f'"base_model" must be a model id on the Hub, got {base!r}'})
            warnings = [] if match else [{"message": "empty or missing yaml metadata in repo card"}]
            self._send(400 if errors else 200, {"errors": errors, "warnings": warnings})

        def _preupload(self, repo: Repo, body: bytes) -> None:
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_BYTES
                existing = repo.files.get(f["path"])
                oid = None if existing is None else (hashlib.sha256(existing).hexdigest() if lfs
                                                     else git_blob_oid(existing))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self._send(200, {"files": files, "commitOid": "0" * 40})

        def _lfs_batch(self, repo_id: str, body: bytes) -> None:
            if not self._authorized():
                return
            if repo_id not in hub.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            payload = json.loads(body)
            assert payload["operation"] == "upload" and payload["hash_algo"] == "sha256", payload
            objects = []
            for obj in payload["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                                        "verify": {"href": f"{hub.url}/lfs-verify", "header": {}}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def _verify(self, body: bytes) -> None:
            payload = json.loads(body)
            stored = hub.lfs.get(payload.get("oid"))
            if stored is None or len(stored) != payload.get("size"):
                return self._error(404, "object not uploaded")
            self._send(200, {"message": "ok"})

        def _commit(self, repo: Repo, body: bytes) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self._error(400, "the commit must start with a header line")
            changes: dict[str, bytes] = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    assert value["encoding"] == "base64", value
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    content = hub.lfs.get(value["oid"])
                    if content is None or len(content) != value["size"]:
                        return self._error(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    changes[value["path"]] = content
                else:
                    return self._error(400, f"this fake does not take {line['key']!r} lines")
            oid = hashlib.sha1(body).hexdigest()
            with hub.lock:
                repo.files.update(changes)
                repo.commits.append({"oid": oid, "summary": lines[0]["value"]["summary"], "paths": sorted(changes)})
            self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{oid}"})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake of the Hugging Face Hub's upload API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    hub = FakeHub(args.token, port=args.port)
    print(f"fake hub on {hub.url}", flush=True)
    hub.server.serve_forever()


if __name__ == "__main__":
    main()
