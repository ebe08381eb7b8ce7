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

ARCHITECTURES: dict[str, dict] = {
    "llama3-8b": dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
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
}


def hf_config(name: str):
    """A transformers config object for a named architecture."""
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    settings = dict(ARCHITECTURES[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)
