"""Publish an exported checkpoint to the Hugging Face Hub.

Only a complete export (see `adapt.export.check_export`) is pushed: weights, config with the diffusion
section, tokenizer, remote code and model card. The token comes from `token=`, else `HF_TOKEN`, else the
saved login (`hf auth login`), all resolved by huggingface_hub; it is never printed or logged. The
endpoint comes from `endpoint=`, else `HF_ENDPOINT`, else the public Hub.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from .errors import UserError
from .export import check_export


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """The files a push uploads, relative to `folder`, sorted; hidden files and folders are left out."""
    folder = Path(folder)
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload diffusion checkpoint exported with adapt",
) -> list[str]:
    """Create the model repo `repo_id` if needed and upload the export in one commit.

    `revision` names a branch (created if missing). Returns the uploaded files (with `dry_run`, the files
    that would be uploaded; nothing is sent).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_export(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"repo id {repo_id!r} is not of the form 'owner/name'; pass e.g. 'my-user/my-diffusion-lm'")
    _check_repo_name(repo_id)  # also with dry_run: a dry run promises that the real one would go through
    files = files_to_upload(folder)
    if dry_run:
        return files
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
            allow_patterns=files, commit_message=commit_message,
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "no response"
        raise UserError(f"the Hub refused the push to {repo_id} (HTTP {status}); check that the token "
                        "(HF_TOKEN or `hf auth login`) has write access and the repo id is yours") from None
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to push") from None
    except _network_errors() as err:  # connection refused, DNS, timeouts
        raise UserError(f"cannot reach the Hub to push {repo_id} ({type(err).__name__}); check the network "
                        "or HF_ENDPOINT") from None
    return files


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx2 / httpx, or requests before 1.0)."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _check_repo_name(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"repo id {repo_id!r} is not valid on the Hub ({str(err).split('. ')[0]}); "
                        "use letters, digits, '-', '_' and '.', e.g. 'my-user/my-diffusion-lm'") from None
