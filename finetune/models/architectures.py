"""Named sizes of the architectures the recipes target, as HF `config.json` dictionaries.

Used where no checkpoint is at hand: random-weight benchmark models, and planning offline.
"""

from __future__ import annotations

_LLAMA3_COMMON = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_act="silu",
    rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False,
)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)

# Llama 3.2's small models stretch the same 8k-trained rope further, and share embeddings and head.
_LLAMA32_SMALL = dict(_LLAMA3_COMMON, intermediate_size=8192, num_key_value_heads=8, max_position_embeddings=131072,
                      tie_word_embeddings=True, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0))

ARCHITECTURES: dict[str, dict] = {
    "llama3.2-1b": dict(_LLAMA32_SMALL, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "llama3.2-3b": dict(_LLAMA32_SMALL, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "llama3-8b": dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "llama3-70b": dict(_LLAMA3_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192),
    "llama3.1-8b": dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_scaling=_LLAMA31_ROPE),
    "llama3.1-70b": dict(_LLAMA3_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_scaling=_LLAMA31_ROPE),
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32768,
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                       rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False, sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064,
                       hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     hidden_act="silu", tie_word_embeddings=False, attention_bias=False),
}
# Llama 3.3 70B is a new fine-tune of the Llama 3.1 70B architecture: same sizes, same rope.
ARCHITECTURES["llama3.3-70b"] = ARCHITECTURES["llama3.1-70b"]

# Hub ids of the checkpoints the recipes name, and their siblings, by architecture: planning a run
# (train.dry_run) needs only the sizes, so it works offline for these ids. Instruct fine-tunes
# share their base's sizes.
HUB_IDS: dict[str, str] = {
    **{f"meta-llama/{name}{suffix}": arch for name, arch in [
        ("Llama-3.2-1B", "llama3.2-1b"), ("Llama-3.2-3B", "llama3.2-3b"),
        ("Meta-Llama-3-8B", "llama3-8b"), ("Meta-Llama-3-70B", "llama3-70b"),
        ("Llama-3.1-8B", "llama3.1-8b"), ("Meta-Llama-3.1-8B", "llama3.1-8b"),
        ("Llama-3.1-70B", "llama3.1-70b"), ("Meta-Llama-3.1-70B", "llama3.1-70b"),
        ("Llama-3.3-70B", "llama3.3-70b")] for suffix in ("", "-Instruct")},
    "mistralai/Mistral-7B-v0.3": "mistral-7b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "Qwen/Qwen3-8B-Base": "qwen3-8b",
}


def hf_config(name: str):
    """A transformers config object for a named architecture."""
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    settings = dict(ARCHITECTURES[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)
