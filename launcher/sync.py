"""What travels to the target, and how little of it travels twice.

Local files the job names (data.path, data.validation_path, data.test_path, and model.base when it
is a local folder) are stored on the target under <workdir>/assets/<content hash>/, sent once per
content: a second launch with unchanged data sends nothing but the config and the runner. The
config that travels is the user's YAML with those paths rewritten to their place on the target,
so the runner there reads exactly the same job."""

from __future__ import annotations

import copy
import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher.config import LaunchConfig, runner_module
from launcher.remote import Machine

ASSET_KEYS = (("model", "base"), ("data", "path"), ("data", "validation_path"), ("data", "test_path"))
READY_MARK = ".qlora-synced"


@dataclass(frozen=True)
class Asset:
    key: str  # e.g. data.path
    local: Path
    digest: str

    @property
    def remote_name(self) -> str:
        return self.local.name


def local_assets(config: LaunchConfig) -> list[Asset]:
    """The local files and folders the job names (hub ids are left to the target to download)."""
    qr = runner_module()
    assets = []
    for section, name in ASSET_KEYS:
        value = (config.raw.get(section) or {}).get(name)
        resolved, is_local = qr.resolve_local(value, config.base_dir)
        if value is None or not is_local:
            continue
        path = Path(resolved)
        assets.append(Asset(key=f"{section}.{name}", local=path, digest=content_hash(path)))
    return assets


_HASHES: dict[tuple, str] = {}  # (path, names/sizes/mtimes) -> digest: a launch hashes each asset once


def content_hash(path: Path) -> str:
    """sha256 over relative names and bytes (a folder: every file, in sorted order). Remembered
    for this process while no file's size or mtime changes: a 15 GB model folder is read once."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    signature = (str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if signature not in _HASHES:
        _HASHES[signature] = _sha256(path, files)
    return _HASHES[signature]


def _sha256(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def sync_assets(machine: Machine, workdir: str, assets: list[Asset]) -> dict[str, str]:
    """Put each asset on the machine unless its content is there already; returns key -> remote path."""
    placed = {}
    for asset in assets:
        folder = f"{workdir}/assets/{asset.digest}"
        target = f"{folder}/{asset.remote_name}"
        present = machine.run(f"test -f {shlex.quote(folder)}/{READY_MARK}", check=False).returncode == 0
        if not present:
            # Into a scratch name first, marked only when whole: a cut transfer is resumed by
            # rsync --partial next time, never taken for complete.
            scratch = f"{folder}.partial"
            machine.run(f"mkdir -p {shlex.quote(scratch)}")
            machine.put(asset.local, f"{scratch}/{asset.remote_name}")
            machine.run(f"touch {shlex.quote(scratch)}/{READY_MARK} && rm -rf {shlex.quote(folder)} && "
                        f"mv {shlex.quote(scratch)} {shlex.quote(folder)}")
        placed[asset.key] = target
    return placed


def remote_config(config: LaunchConfig, placed: dict[str, str], without: tuple[str, ...] = ()) -> str:
    """The job YAML for the target: the user's file with local paths replaced by remote ones
    (and the top-level sections `without` names left out)."""
    raw: dict[str, Any] = {k: v for k, v in copy.deepcopy(config.raw).items() if k not in without}
    for key, remote_path in placed.items():
        section, name = key.split(".")
        raw[section][name] = remote_path
    header = f"# Sent by qlora-launch from {config.path}; local paths rewritten to their copies here.\n"
    return header + yaml.safe_dump(raw, sort_keys=False)


def assets_bytes(assets: list[Asset]) -> int:
    return sum(_size(a.local) for a in assets)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def find_asset(assets: list[Asset], key: str) -> Optional[Asset]:
    return next((a for a in assets if a.key == key), None)
