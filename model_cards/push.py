"""Publish a converted or fine-tuned folder to the Hub in one call: checks that it is complete (weights, custom code,
card), prepares one commit (optionally as a pull request) and sends it with `huggingface_hub`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import OfflineModeIsEnabled

from .render import write_model_card

_SKIP = {".gitattributes"}


def prepare_upload(folder: str | os.PathLike, write_card: bool = True, **card_kwargs) -> list[CommitOperationAdd]:
    """The commit operations for `folder`; raises `ValueError` naming what is missing (custom code, card)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        missing = [f for f in ("configuration_deepseek_v4.py", "modeling_deepseek_v4.py") if not (folder / f).exists()]
        if not config.get("auto_map") or missing:
            raise ValueError(
                f"{folder}: no custom code ({'auto_map' if not config.get('auto_map') else ', '.join(missing)} "
                "missing), so it would not load where modeling_deepseek_v4 is not installed; re-save it with "
                "`model.save_pretrained(folder)` after `import modeling_deepseek_v4`."
            )
    elif not (folder / "adapter_config.json").exists():
        raise ValueError(f"{folder}: neither config.json nor adapter_config.json; nothing to publish.")
    if write_card and not (folder / "README.md").exists():
        write_model_card(folder, **card_kwargs)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP and ".cache" not in p.parts)
    return [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str = "Upload DeepSeek-V4 (modeling_deepseek_v4)",
    dry_run: bool = False,
    api: HfApi | None = None,
    **card_kwargs,
):
    """Upload `folder` to `repo_id` as one commit (or a PR). `dry_run` returns the prepared operations unsent."""
    operations = prepare_upload(folder, **card_kwargs)
    if dry_run:
        return operations
    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=commit_message, create_pr=create_pr)
    except OfflineModeIsEnabled:
        raise RuntimeError(
            f"Cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set. Unset it (and log in with "
            "`hf auth login`) to publish; nothing was uploaded."
        ) from None
