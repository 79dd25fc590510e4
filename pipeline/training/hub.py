"""Uploading a trained student to the Hugging Face Hub (`kdcache train --push-to-hub OWNER/NAME`).

    kdcache train --cache runs/demo/cache --student-config configs/models/demo_student.json \
        --out runs/kd --push-to-hub my-org/demo-student-kd

Only OUT/final is uploaded (weights, config, tokenizer, model card), after it is written; nothing
touches the network without the option. What can be checked without the network is checked before
training starts (the repo id's form, a token being configured), so a run of hours does not end in a
refusal. A failed upload keeps final/ and says how to retry: re-running the same command skips the
finished training and pushes again.

Not exercised by the tests (they have no hub); the checks before training are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import KdError

log = logging.getLogger(__name__)


def check_repo_id(repo: str) -> None:
    """Refuse a repo id that is not OWNER/NAME in the Hub's alphabet (a one-line `KdError`).

    The owner is required, although the Hub would default it to the token's user: a model meant for
    an organisation must not land in a personal namespace by omission.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise KdError(f"--push-to-hub {repo!r}: expected OWNER/NAME, e.g. my-org/student-kd")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise KdError(f"--push-to-hub {repo!r}: not a valid repo id ({str(e).splitlines()[0]})") from None


def check_can_push(repo: str) -> None:
    """Everything `push` needs that can be known offline: a valid repo id and a configured token."""
    from huggingface_hub import get_token

    check_repo_id(repo)
    if not get_token():
        raise KdError(f"--push-to-hub {repo}: no Hugging Face token (run `hf auth login` or set HF_TOKEN) "
                      "(nothing was trained)")


def push(folder: Path, repo: str, message: str) -> str:
    """Create `repo` if needed and upload `folder` as one commit; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message)
    except Exception as e:  # network, permissions, quota: all end the same way, with final/ kept
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise KdError(f"pushing {folder} to {repo} failed ({first}); the model is saved there: re-run the same "
                      f"command to push again (training is not redone)") from None
    url = f"https://huggingface.co/{repo}"
    log.info("pushed %s to %s", folder, url)
    return url
