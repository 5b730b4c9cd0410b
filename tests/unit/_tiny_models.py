"""Tiny causal LMs and a character tokenizer built in code, shared by the select/train tests."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

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
