"""Tiny random-initialised models saved as safetensors directories, for architectures we do not ship."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(path: Path, *, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A 4-block Llama with hidden size 64 (vocabulary of SmolLM2's tokenizer if given)."""
    return make_tiny("llama", path, seed=seed, tokenizer_from=tokenizer_from)


# Tiny configs of every family beed serves (4 blocks, hidden size 64): what differs from Llama is
# kept (sliding windows, MoE routing with dense layers between, fused projections, soft caps).
def _family_configs(vocab: int) -> dict[str, object]:
    import transformers as tf

    common = dict(
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
    moe = dict(num_experts_per_tok=2)
    return {
        "llama": tf.LlamaConfig(**common),
        "mistral": tf.MistralConfig(**common, sliding_window=8),
        "qwen2": tf.Qwen2Config(**common),
        "qwen3": tf.Qwen3Config(**common, head_dim=16),
        # Blocks 1 and 3 sparse, 0 and 2 dense: a span's local indices must not move them.
        "qwen3_moe": tf.Qwen3MoeConfig(
            **common,
            **moe,
            head_dim=16,
            num_experts=4,
            moe_intermediate_size=32,
            decoder_sparse_step=2,
            mlp_only_layers=[],
        ),
        "mixtral": tf.MixtralConfig(**common, **moe, num_local_experts=4),
        "phi3": tf.Phi3Config(**common),
        "gemma2": tf.Gemma2Config(
            **common,
            head_dim=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
        "gemma3": tf.Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
    }


def _all_configs(vocab: int) -> dict[str, object]:
    return _family_configs(vocab) | _alibi_configs(vocab)


FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "gemma2",
    "gemma3",
    "bloom",
    "falcon",
    "falcon_alibi",
]


def make_tiny(
    family: str, path: Path, *, seed: int = 0, tokenizer_from: Path | None = None
) -> Path:
    """A tiny random model of `family` saved as safetensors (with SmolLM2's tokenizer and its
    vocabulary if `tokenizer_from` is given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = 49152 if tokenizer_from is not None else 1000
    config = _all_configs(vocab)[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


def _alibi_configs(vocab: int) -> dict[str, object]:
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return {
        "bloom": tf.BloomConfig(**ids, hidden_size=64, n_layer=4, n_head=4),
        # Falcon-40B style (rotary, grouped keys, two norms) and Falcon-RW style (ALiBi,
        # multi-query, parallel attention).
        "falcon": tf.FalconConfig(
            **ids,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
        "falcon_alibi": tf.FalconConfig(
            **ids,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            alibi=True,
            multi_query=True,
            parallel_attn=True,
        ),
    }
