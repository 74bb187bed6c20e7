"""`launch push RUN --repo user/name`: the run's adapter (or, with --merged, the model `launch
merge` wrote) to the Hugging Face Hub with a generated model card, through huggingface_hub
(create_repo(exist_ok=True), then one upload_folder commit).

The token is huggingface_hub's own (HF_TOKEN, else `hf auth login`'s file), checked before
anything is uploaded, and handed to HfApi only: never printed, logged or written here. The
endpoint is huggingface_hub's too (HF_ENDPOINT). The card replaces peft's README.md template in a
staging folder of hard links, so the run's adapter folder is uploaded as it is and left as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.deploy import HUB_PACKAGES, RunModel, require_packages
from launcher.errors import EXIT_TARGET, EXIT_USAGE
from launcher.job import JobError
from launcher.model_card import RunFacts, base_license, render

STAGING = ".push-staging"  # in the run folder: the same filesystem, so hard links work
CARD = "README.md"


def push(model: RunModel, facts: RunFacts, repo: str, merged: bool, private: bool,
         log: Callable[[str], None]) -> dict[str, Any]:
    folder = model.merged if merged else model.adapter
    if merged and not (folder / "config.json").is_file():
        raise JobError(f"run {model.run_id} has no merged model in {folder}; `launch merge {model.run_id}` "
                       "writes it (then push --merged again)", EXIT_USAGE)
    if "/" not in repo or repo.count("/") > 1 or not all(repo.split("/")):
        raise JobError(f"--repo {repo}: name it as user/name or org/name", EXIT_USAGE)
    require_packages(HUB_PACKAGES)
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise JobError("HF_HUB_OFFLINE is set: unset it to push to the Hub", EXIT_USAGE)
    token = get_token()
    if not token:
        raise JobError("no Hugging Face token: run `hf auth login` (a token with write access), or set HF_TOKEN; "
                       "then push again", EXIT_USAGE)
    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, else the Hub
    license_id = base_license(model, api)
    card = render(model, facts, license_id, merged, repo, dtype=_saved_dtype(folder) if merged else None)
    staging = model.run_dir / STAGING
    try:
        files = _stage(folder, staging, card)
        log(f"creating {repo} on {api.endpoint} (kept if it exists)")
        api.create_repo(repo, private=True if private else None, exist_ok=True, repo_type="model")
        log(f"uploading {len(files)} files from {folder}")
        info = api.upload_folder(repo_id=repo, folder_path=staging, repo_type="model",
                                 commit_message=f"qlora-launch run {model.run_id}: "
                                                f"{'merged model' if merged else 'LoRA adapter'}")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = ("the token was refused or cannot write there (`hf auth login` with a write token)"
                if status in (401, 403) else "the Hub said so")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise JobError(f"push to {repo} failed: {first} ({hint})", EXIT_TARGET) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"repo": repo, "url": f"{api.endpoint}/{repo}", "commit": getattr(info, "oid", None),
            "files": files, "license": license_id, "merged": merged}


def _stage(folder: Path, staging: Path, card: str) -> list[str]:
    """`folder` as hard links (a copy where links cannot be made) with our card as README.md."""
    shutil.rmtree(staging, ignore_errors=True)
    files: list[str] = []
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = source.relative_to(folder)
        if relative.as_posix() == CARD or relative.name.startswith("."):
            continue  # peft's template card; dot files are ours or the OS's
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        files.append(relative.as_posix())
    (staging / CARD).write_text(card)
    return [*files, CARD]


def _saved_dtype(folder: Path) -> Optional[str]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")  # transformers 5 writes dtype, 4 torch_dtype


def card_text(model: RunModel, facts: RunFacts, merged: bool, repo: str, hub: Optional[Any] = None) -> str:
    """The card as push would write it (for a look before pushing, and the tests)."""
    return render(model, facts, base_license(model, hub), merged, repo)
