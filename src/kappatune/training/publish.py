"""A trained output folder (``model/`` or ``adapter/``) made to travel: the dtype it is saved
in, the adapter's portable base-model name, and the upload to the Hugging Face Hub."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    import torch
    from huggingface_hub import HfApi
    from torch import nn

_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise KappaTuneError(f"--push-to-hub: {repo_id!r} is not a hub repository id (owner/name)")


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    message: str = "",
    api: HfApi | None = None,
) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``folder``.

    Returns the repository URL. Network and permission failures become one-line errors.
    """
    check_repo_id(repo_id)
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise KappaTuneError(
                "--push-to-hub needs the 'huggingface_hub' package: pip install huggingface_hub"
            ) from None
        api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=message or f"Upload {Path(folder).name} trained with kappatune",
        )
    except Exception as exc:  # HTTP, auth and connection errors: all for the user to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KappaTuneError(f"--push-to-hub {repo_id}: {first}") from None
    return str(url)


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def output_dtype(adapter: bool, model_spec: str, save_dtype: str) -> torch.dtype | None:
    """The dtype a trained model is saved in: ``save_dtype``, or with ``auto`` the dtype its
    checkpoint was stored in; None for an adapter (saved as trained)."""
    from kappatune.training.models import checkpoint_dtype, parse_dtype

    if adapter:
        return None
    if save_dtype == "auto":
        return checkpoint_dtype(model_spec)
    return parse_dtype(save_dtype)


def name_base_model(model: nn.Module, model_spec: str) -> None:
    """Name the base model of a PEFT model's adapters portably (never a cache path)."""
    from peft import PeftModel

    from kappatune.training.models import portable_name

    assert isinstance(model, PeftModel), "an adapter method trains a PEFT model"
    for config in model.peft_config.values():
        config.base_model_name_or_path = portable_name(model_spec)
