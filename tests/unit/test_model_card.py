from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kappatune.errors import KappaTuneError
from kappatune.training.model_card import CardFacts, SelectedTensor, render_card, write_card
from kappatune.training.models import checkpoint_dtype, portable_name
from kappatune.training.publish import push_folder

SELECTED = tuple(
    SelectedTensor(f"model.layers.{i}.mlp.down_proj.weight", None, 10.0 + i, 4096) for i in range(3)
)


def facts(**kw: Any) -> CardFacts:
    base = {
        "base_model": "owner/base",
        "method": "selective",
        "data": ("train.jsonl",),
        "steps": 100,
        "final_loss": 1.23456,
        "trainable_params": 12288,
        "version": "9.9.9",
        "adapter": False,
        "policy": "lowest-kappa",
        "selected": SELECTED[:2],
        "selected_count": 3,
    }
    return CardFacts(**(base | kw))


def test_card_metadata_and_body(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    path = write_card(tmp_path, facts())
    card = ModelCard.load(path)
    assert card.data.to_dict() == {
        "base_model": "owner/base",
        "library_name": "transformers",
        "tags": ["kappatune", "selective"],
    }
    text = path.read_text()
    assert "- method: `selective`\n" in text
    assert "- data: `train.jsonl`\n- steps: 100\n- final training loss: 1.2346\n" in text
    assert "kappatune](https://pypi.org/project/kappatune/) 9.9.9." in text
    assert "3 matrices chosen by the `lowest-kappa` policy; the first 2 in selection order:" in text
    assert (
        "| `model.layers.0.mlp.down_proj.weight` | 10 | 4,096 |\n"
        "| `model.layers.1.mlp.down_proj.weight` | 11 | 4,096 |\n\n... and 1 more"
    ) in text
    assert "evaluation loss" not in text


def test_adapter_card() -> None:
    text = render_card(
        facts(adapter=True, method="kappa-lora", lora_r=8, eval_loss=2.5, tags=("lora",))
    )
    assert text.startswith("---\nbase_model: owner/base\nlibrary_name: peft\ntags:\n- kappatune\n")
    assert "- kappa-lora\n- lora\n---\n" in text
    assert "- method: `kappa-lora` (LoRA rank 8)\n" in text
    assert "- final evaluation loss: 2.5000\n" in text
    assert 'PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_ADAPTER")' in text
    assert 'AutoModelForCausalLM.from_pretrained("owner/base")' in text


def test_portable_name_and_checkpoint_dtype(tmp_path: Path) -> None:
    assert portable_name("owner/name") == "owner/name"
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert portable_name(str(d)) == str(d) and checkpoint_dtype(str(d)) == torch.bfloat16
    (d / "config.json").write_text('{"dtype": "float16"}')
    assert checkpoint_dtype(str(d)) == torch.float16
    (d / "config.json").write_text("{}")
    assert checkpoint_dtype(str(d)) == torch.float32


class FakeApi:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def create_repo(self, **kw: Any) -> str:
        self.calls.append(("create_repo", kw))
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw: Any) -> None:
        self.calls.append(("upload_folder", kw))


def test_push_folder_creates_and_uploads(tmp_path: Path) -> None:
    api = FakeApi()
    url = push_folder(tmp_path / "adapter", "me/thing", private=True, api=api)
    assert url == "https://huggingface.co/me/thing"
    assert api.calls == [
        (
            "create_repo",
            {"repo_id": "me/thing", "repo_type": "model", "private": True, "exist_ok": True},
        ),
        (
            "upload_folder",
            {
                "repo_id": "me/thing",
                "repo_type": "model",
                "folder_path": str(tmp_path / "adapter"),
                "commit_message": "Upload adapter trained with kappatune",
            },
        ),
    ]
    with pytest.raises(KappaTuneError, match=r"^--push-to-hub me/thing: 401 Unauthorized$"):
        push_folder(tmp_path, "me/thing", api=FakeApi(OSError("401 Unauthorized\nmore")))
    with pytest.raises(KappaTuneError, match="is not a hub repository id"):
        push_folder(tmp_path, "a/b/c", api=FakeApi())
