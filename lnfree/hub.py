"""Opt-in upload of a run's exports to the Hugging Face Hub (push_to_hub=<user>/<repo>).

The check runs before training (`check_push`): offline mode, an unreachable hub or a missing token fail at once
with what to do, instead of after hours of training (or after huggingface_hub's retries). The upload puts
export/hf at the repo's root (stock transformers loads it from the hub) and export/folded under folded/.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


class HubPushError(UserError):
    pass


def check_push(repo_id: str, timeout: float = 5.0) -> None:
    """Refuse an impossible push before any compute: a repo id huggingface_hub's validator refuses, offline
    mode, unreachable hub, no token."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .references import hub_unreachable

    if repo_id.count("/") != 1:
        raise HubPushError(f"push_to_hub={repo_id!r}: expected <user or org>/<repo name>")
    try:  # the hub's own rule (allowed characters, length, no '--'), so that the upload cannot fail on the name
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubPushError(f"push_to_hub={repo_id!r} is not a valid repo id: {e}") from None
    why = hub_unreachable(timeout)
    if why:
        raise HubPushError(f"push_to_hub={repo_id!r}: {why}; nothing was trained. Train without push_to_hub and "
                           "upload later with `huggingface-cli upload <repo> <run>/export/hf`")
    from huggingface_hub import get_token

    if get_token() is None:
        raise HubPushError(f"push_to_hub={repo_id!r}: no Hugging Face token (run `huggingface-cli login` or set "
                           "HF_TOKEN); nothing was trained")


def push_exports(output_dir: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload export/hf (repo root) and export/folded (folded/); returns the repo URL."""
    from huggingface_hub import HfApi

    export = Path(output_dir) / "export"
    if not (export / "hf").is_dir():
        raise HubPushError(f"nothing to push: {export / 'hf'} does not exist")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(export / "hf"), commit_message="lnfree export (hf form)")
    if (export / "folded").is_dir():
        api.upload_folder(repo_id=repo_id, folder_path=str(export / "folded"), path_in_repo="folded",
                          commit_message="lnfree export (folded form)")
    return str(url)
