"""GGUF export (finetune.export.gguf): read back with gguf's own reader and checked against the
merged HF weights; the q/k reordering and Llama 3 rope factors checked against the math they
must preserve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_merge import CHAT_TEMPLATE, adapter, base, build_base, build_tokenizer, one_thread, run_merge  # noqa: F401

from finetune.export.gguf import (
    _encode,
    _llama3_rope_factors,
    _rope_pairs_adjacent,
    check_exportable,
    export_gguf,
    gguf_name,
    modelfile,
)
from finetune.export.merge import MergeError

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory) -> Path:
    return run_merge(adapter, tmp_path_factory.mktemp("gguf") / "merged", dtype="float32")


def hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in model_dir.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def halves_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of _rope_pairs_adjacent: rows 2i, 2i+1 of each head back to i, i + d/2."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_weights(reader: gguf.GGUFReader, config: dict, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32, q/k rows back in HF order."""
    out = {}
    for t in reader.tensors:
        data = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).copy())
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            data = halves_layout(data, config["num_attention_heads"])
        if arch == "llama" and t.name.endswith("attn_k.weight"):
            data = halves_layout(data, config["num_key_value_heads"])
        out[t.name] = data
    return out


def test_f16_round_trip(merged, tmp_path):
    export_gguf(merged, tmp_path, "f16", name="tiny")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    config = json.loads((merged / "config.json").read_text())
    hf = hf_weights(merged)

    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    expected_names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    expected_names += [f"blk.{i}.{name}.weight" for i in range(2) for name in per_block]
    assert sorted(t.name for t in reader.tensors) == sorted(expected_names)
    got = gguf_weights(reader, config)
    for hf_name, weight in hf.items():
        tensor = next(t for t in reader.tensors if t.name == gguf_name(hf_name))
        assert list(tensor.shape) == list(reversed(weight.shape))  # GGUF lists the innermost dim first
        assert tensor.tensor_type == (Q.F32 if weight.ndim == 1 else Q.F16)
        expected = weight if weight.ndim == 1 else weight.to(torch.float16).float()
        assert torch.equal(got[gguf_name(hf_name)], expected), hf_name

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    hparams = {
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.context_length": config["max_position_embeddings"],
        "llama.vocab_size": 300,
    }
    assert {key: field(reader, key) for key in hparams} == hparams
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])

    tokenizer = build_tokenizer()
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(300)))
    assert field(reader, "tokenizer.ggml.token_type")[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    ollama = (tmp_path / "Modelfile").read_text()
    assert ollama.startswith("FROM ./model.gguf\n")
    assert "<|im_start|>{{ .Role }}" in ollama and 'PARAMETER stop "<|im_end|>"' in ollama


def test_q8_0_through_merge_command(adapter, merged, tmp_path):
    out = run_merge(adapter, tmp_path / "gguf", format="gguf", gguf_type="q8_0", dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "finetune_merge.json", "model.gguf"]
    reader = gguf.GGUFReader(out / "model.gguf")
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    got = gguf_weights(reader, json.loads((merged / "config.json").read_text()))
    for hf_name, weight in hf_weights(merged).items():
        name = gguf_name(hf_name)
        if weight.ndim == 1:
            assert torch.equal(got[name], weight)
            continue
        assert next(t for t in reader.tensors if t.name == name).tensor_type == Q.Q8_0
        # Q8_0: blocks of 32 share a scale amax/127 stored in fp16. Rounding to the nearest step
        # costs half a step; the fp16 scale adds at most 127 * 2^-11 steps.
        blocks = weight.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        assert ((got[name].reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 * 2**-11) + 1e-12).all(), name


@pytest.mark.parametrize(
    "gguf_type, levels, symmetric", [("q4_0", 16, True), ("q4_1", 16, False), ("q5_0", 32, True), ("q5_1", 32, False)]
)
def test_low_bit_types_round_trip(gguf_type, levels, symmetric):
    blocks = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64).unsqueeze(1)
    qtype = getattr(Q, gguf_type.upper())
    decoded = torch.from_numpy(gguf.quants.dequantize(_encode(blocks, qtype, "w"), qtype))
    # One quantization step: the block's range over the number of levels. Symmetric types span
    # [-amax, amax] (and may clip the far end by one step); asymmetric ones [min, max], with the
    # fp16-stored offset adding up to 2^-11 of |min|.
    amax = blocks.abs().amax(dim=1, keepdim=True)
    span = 2 * amax if symmetric else blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)
    step = span / (levels - 1)
    assert ((decoded - blocks).abs() <= step * 1.01 + amax * 2**-10).all()


def test_low_bit_export_keeps_output_at_q8_0(merged, tmp_path):
    export_gguf(merged, tmp_path, "q4_0", name="tiny")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert types["output.weight"] == Q.Q8_0 and types["blk.0.ffn_down.weight"] == Q.Q4_0
    assert types["token_embd.weight"] == Q.Q4_0 and types["output_norm.weight"] == Q.F32


def rope_halves(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """HF Llama: dimension i pairs with i + d/2.  x: (T, H, D), angles: (T, D/2)."""
    a, b = x.chunk(2, dim=-1)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def rope_adjacent(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp `llama`: dimension 2i pairs with 2i+1."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_q_k_reordering_preserves_attention_scores():
    n_heads, n_kv_heads, head_dim, hidden, T = 4, 2, 16, 64, 7
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(n_heads * head_dim, hidden, generator=g)
    wk = torch.randn(n_kv_heads * head_dim, hidden, generator=g)
    x = torch.randn(T, hidden, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.arange(T)[:, None] * inv_freq  # (T, D/2)

    def scores(rope, wq, wk):
        q = rope((x @ wq.T).view(T, n_heads, head_dim), angles)
        k = rope((x @ wk.T).view(T, n_kv_heads, head_dim), angles).repeat_interleave(n_heads // n_kv_heads, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    hf = scores(rope_halves, wq, wk)
    llama_cpp = scores(rope_adjacent, _rope_pairs_adjacent(wq, n_heads), _rope_pairs_adjacent(wk, n_kv_heads))
    torch.testing.assert_close(llama_cpp, hf, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(scores(rope_adjacent, wq, wk), hf, atol=1e-2)  # the reordering is needed


LLAMA3_ROPE = {  # Llama 3.1's
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = LLAMA3_ROPE
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = torch.from_numpy(_llama3_rope_factors(rope, 64, 131072)).double()
    torch.testing.assert_close(plain / factors, scaled.double(), rtol=1e-6, atol=0)
    assert factors.min() == 1 and factors.max() == 8  # both ends of the blend are reached


def test_qwen2_and_llama3_rope_variants(tmp_path):
    qwen = build_base(tmp_path / "qwen2", arch="qwen2", max_shard_size="10MB")
    export_gguf(qwen, tmp_path / "qwen2", "f16", name="qwen")
    reader = gguf.GGUFReader(tmp_path / "qwen2" / "model.gguf")
    config = json.loads((qwen / "config.json").read_text())
    assert field(reader, "general.architecture") == "qwen2" and field(reader, "qwen2.block_count") == 2
    got = gguf_weights(reader, config, arch="qwen2")
    hf = hf_weights(qwen)
    # qwen2 keeps HF's halves layout (NEOX rope in llama.cpp) and has q/k/v biases.
    assert torch.equal(got["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"].half().float())
    assert torch.equal(got["blk.1.attn_k.bias"], hf["model.layers.1.self_attn.k_proj.bias"])

    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 64}  # scaled within the tiny model's head_dim
    llama3 = build_base(tmp_path / "llama3", max_shard_size="10MB", rope_parameters=rope)
    export_gguf(llama3, tmp_path / "llama3", "bf16", name="llama3")
    reader = gguf.GGUFReader(tmp_path / "llama3" / "model.gguf")
    rope_freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert rope_freqs.tensor_type == Q.F32 and list(rope_freqs.shape) == [8]  # head_dim / 2
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16


def test_refusals(merged, tmp_path):
    with pytest.raises(MergeError, match="supports model types llama, mistral, qwen2; this model is 'gpt2'"):
        check_exportable({"model_type": "gpt2"})
    with pytest.raises(MergeError, match="rope_type 'yarn'"):
        check_exportable({"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}})

    sentencepiece_style = tmp_path / "spm"
    shutil.copytree(merged, sentencepiece_style)
    tokenizer = json.loads((sentencepiece_style / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (sentencepiece_style / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(MergeError, match="byte-level BPE"):
        export_gguf(sentencepiece_style, tmp_path, "f16", name="spm")


def test_modelfile_templates():
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"
    text = modelfile("model.gguf", llama3, "<|eot_id|>")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1  # the eos token is not listed twice
    generic = modelfile("model.gguf", "{{ messages }}", "</s>")
    assert "not recognised" in generic and 'PARAMETER stop "</s>"' in generic
