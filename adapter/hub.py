"""Publish a model folder (an exported adapter model, a fine-tune) to the Hugging Face Hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from adapter.errors import AdapterError, one_line

logger = logging.getLogger(__name__)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: str | None = None,
                private: bool | None = None) -> str:
    """Upload every file of ``folder`` to the model repository ``repo_id`` (created when missing) and return its URL.

    The token is ``token``, else the one huggingface_hub finds ($HF_TOKEN or a saved login). Offline mode, a missing
    token and any Hub error stop with one line.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise AdapterError(f"{folder}: not a sentence-transformers model folder (no modules.json)")
    if constants.HF_HUB_OFFLINE:
        raise AdapterError(f"{repo_id}: cannot push while HF_HUB_OFFLINE is set")
    token = token or get_token()
    if not token:
        raise AdapterError(f"{repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {folder.name} with adapter")
    except Exception as e:  # network, permission and validation errors come in many types
        raise AdapterError(f"{repo_id}: push to the Hugging Face Hub failed ({one_line(e)})") from None
    logger.info("pushed %s to %s", folder, url)
    return str(url)
