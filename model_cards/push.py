"""Publish a converted or fine-tuned folder to the Hub in one call: checks that it is complete (weights, custom code,
card), prepares one commit (optionally as a pull request) and sends it with `huggingface_hub`.

- The folder is never written to: a missing card is rendered in memory (with the repo id in its loading example)
  and uploaded from bytes, so `dry_run=True` leaves the folder byte-identical.
- Trainer state (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `training_args.bin`, `trainer_state.json`,
  `checkpoint-*` folders, ...) is left out unless `include_training_state=True`: a Trainer `output_dir` is a common
  thing to publish, and its optimizer state alone is twice the size of the weights.
- Network failures become one clear error naming the repo and the endpoint, not an HTTP client traceback.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import OfflineModeIsEnabled
from transformers.dynamic_module_utils import get_relative_imports

from .render import render_model_card

logger = logging.getLogger(__name__)

_SKIP = {".gitattributes"}
# What `transformers.Trainer` saves next to a model (trainer.py's *_NAME constants; DeepSpeed's `global_step*`).
TRAINING_STATE_FILES = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
)
TRAINING_STATE_FOLDERS = ("checkpoint-*", "global_step*")
_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP client `huggingface_hub` uses (httpx2 in 2.x, httpx in 1.x): the
    Hub could not be reached. HTTP status errors (`HfHubHTTPError`: bad token, no rights) are not among them."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        if importlib.util.find_spec(module) is not None:
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def is_training_state(path_in_repo: str) -> bool:
    """True for a Trainer state file or anything inside a `checkpoint-*` (or DeepSpeed `global_step*`) folder."""
    *folders, name = Path(path_in_repo).parts
    return any(fnmatch.fnmatch(name, p) for p in TRAINING_STATE_FILES) or any(
        fnmatch.fnmatch(folder, p) for folder in folders for p in TRAINING_STATE_FOLDERS
    )


def _missing_custom_code(folder: Path, config: dict) -> list[str]:
    """What a `trust_remote_code` load of `folder` would miss: `auto_map` entries, the files they name and the files
    those import relatively (the Hub checks every one of them, hf-integration.md §5)."""
    auto_map = config.get("auto_map") or {}
    missing = [f"auto_map[{name!r}]" for name in _AUTO_CLASSES if name not in auto_map]
    # "module.Class", or "org/repo--module.Class" for code kept in another repo (not in this folder).
    pending = [f"{ref.split('.')[0]}.py" for ref in auto_map.values() if isinstance(ref, str) and "--" not in ref]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if not (folder / name).is_file():
            missing.append(name)
            continue
        pending += [f"{module}.py" for module in get_relative_imports(folder / name)]
    return missing


def prepare_upload(
    folder: str | os.PathLike,
    add_card: bool = True,
    *,
    repo_id: str | None = None,
    include_training_state: bool = False,
    **card_kwargs,
) -> list[CommitOperationAdd]:
    """The commit operations for `folder`, without writing to it; raises `ValueError` naming what is missing.

    A folder without `README.md` gets a card rendered in memory (`add_card`; `repo_id` goes into its loading
    example). Trainer state files and `checkpoint-*` folders are left out unless `include_training_state`."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.exists():
        missing = _missing_custom_code(folder, json.loads(config_path.read_text()))
        if missing:
            raise ValueError(
                f"{folder}: no custom code ({', '.join(missing)} missing), so it would not load where "
                "modeling_deepseek_v4 is not installed; re-save it with `model.save_pretrained(folder)` after "
                "`import modeling_deepseek_v4`, or convert it again with `dsv4-convert to-hf`."
            )
    elif not (folder / "adapter_config.json").exists():
        raise ValueError(f"{folder}: neither config.json nor adapter_config.json; nothing to publish.")
    operations, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path_in_repo = path.relative_to(folder).as_posix()
        # Relative parts: a folder that itself lives under ~/.cache (a Hub snapshot) is still published.
        if path.name in _SKIP or ".cache" in Path(path_in_repo).parts:
            continue
        if not include_training_state and is_training_state(path_in_repo):
            skipped.append(path_in_repo)
            continue
        operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path)))
    if skipped:
        logger.info(
            "Not uploading %d training-state file(s) (include_training_state=True to upload them).", len(skipped)
        )
    if add_card and not (folder / "README.md").exists():
        card = str(render_model_card(folder, repo_id=repo_id, **card_kwargs)).encode()
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    return sorted(operations, key=lambda op: op.path_in_repo)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str = "Upload DeepSeek-V4 (modeling_deepseek_v4)",
    dry_run: bool = False,
    include_training_state: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
    **card_kwargs,
):
    """Upload `folder` to `repo_id` as one commit (or a PR). `dry_run` returns the prepared operations unsent.
    The folder itself is never modified; Trainer state is uploaded only with `include_training_state=True`."""
    operations = prepare_upload(folder, repo_id=repo_id, include_training_state=include_training_state, **card_kwargs)
    if dry_run:
        return operations
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=commit_message, create_pr=create_pr)
    except OfflineModeIsEnabled:
        raise RuntimeError(
            f"Cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set. Unset it (and log in with "
            "`hf auth login`) to publish; nothing was uploaded."
        ) from None
    except _network_errors() as exc:
        # `from None`: the HTTP client's traceback says nothing the message does not.
        raise ConnectionError(
            f"Cannot push {folder} to {repo_id}: the Hugging Face Hub at {api.endpoint} could not be reached "
            f"({type(exc).__name__}: {exc}). Check the network connection (or proxy / HF_ENDPOINT), or set "
            "HF_HUB_OFFLINE=1 to work offline; nothing was committed."
        ) from None
