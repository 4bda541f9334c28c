"""Tiny random-initialised models saved as safetensors directories, for architectures we do not ship."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(path: Path, *, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A 4-block Llama with hidden size 64 (vocabulary of SmolLM2's tokenizer if given)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = 49152 if tokenizer_from is not None else 1000
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path
