"""Tiny causal LMs and a character tokenizer built in code, shared by the select/train tests."""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kappatune.bench.scenarios import Scenario

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
CHARS = string.printable  # 100 characters
VOCAB_SIZE = 128


def char_tokenizer(add_bos: bool = True) -> Any:
    """A character-level fast tokenizer: ids 0-3 special, one id per printable character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_llama(seed: int = 0, layers: int = 2, tied: bool = False) -> Any:
    """A Llama with hidden size 32, 4 heads (2 key/value heads) and the 128-token vocabulary;
    ``tied``: the head shares the embedding's weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny Llama and its tokenizer saved with save_pretrained (safetensors)."""
    model = tiny_llama(seed)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_toy_bench(root: Path) -> dict[str, Path]:
    """The toy bench inputs under ``root``: a tiny saved model (``model``), word text to train on
    (``train``; ``held``, the same reversed), arithmetic lines as the ``control``, 12 knowledge
    questions (``mc``), labelled rows (``lab_train``: 20, ``lab_test``: its first 6), an
    ``empty`` file and a ``short`` one-line control."""
    import json

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "to", "the", "big", "red", "dog"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(600))
    files = {"model": save_tiny_model(root / "tiny", seed=0)}
    texts = {
        "train.txt": text,
        "held.txt": text[::-1],
        "control.txt": "".join(f"x = {i} + {3 * i}\n" for i in range(120)),
        "empty.txt": "\n",
        "short.txt": "x = 1\n",
    }
    questions = [
        {"question": f"{i} then", "options": [f" {i + 1}", f" {i + 2}"], "answer": f" {i + 1}"}
        for i in range(12)
    ]
    labelled = [
        {"text": ("good " if i % 2 else "bad ") + str(i), "label": "yes" if i % 2 else "no"}
        for i in range(20)
    ]
    rows: dict[str, list[dict[str, Any]]] = {
        "mc.jsonl": questions,
        "lab_train.jsonl": labelled,
        "lab_test.jsonl": labelled[:6],
    }
    for name, content in texts.items():
        (root / name).write_text(content)
    for name, items in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    return files | {name.split(".")[0]: root / name for name in [*texts, *rows]}


def toy_scenario(files: dict[str, Path]) -> Scenario:
    """The text scenario ``toy`` on the files of :func:`write_toy_bench`."""
    from kappatune.bench.scenarios import DataSpec, Scenario

    return Scenario(
        "toy", DataSpec(str(files["train"])), DataSpec(str(files["held"])),
        DataSpec(str(files["control"])),
    )  # fmt: skip


class TinyTiedLM(torch.nn.Module):
    """An embedding (``vocab`` x ``dim``), one square linear layer without bias and a head tied
    to the embedding: small enough that every tensor a training step makes can be counted by
    hand. Called like a transformers causal LM (``input_ids``, ``labels``; ``.loss``, ``.logits``)."""

    def __init__(self, vocab: int = 8, dim: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        from types import SimpleNamespace

        logits = self.proj(self.embed(input_ids)) @ self.embed.weight.T
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(loss=loss, logits=logits)
