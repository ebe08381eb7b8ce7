"""Write a merged Llama-family HF model as one GGUF file (llama.cpp, Ollama) plus a Modelfile.

Tensors stream from the safetensors shards into the file one at a time: the header (metadata and
every tensor's name, shape and type) is written first, then each tensor's data as it is converted.

Names, metadata keys and layouts follow llama.cpp's conventions for its `llama` and `qwen2`
architectures. The one non-obvious step is the q/k row order: HF Llama applies rotary embeddings
to the two halves of each head ("rotate_half"), llama.cpp's `llama` architecture to adjacent
pairs; see `_rope_pairs_adjacent`. `qwen2` uses the halves layout in llama.cpp too (NEOX rope).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from finetune.errors import MergeError

# HF model_type -> llama.cpp architecture (llama.cpp runs Mistral checkpoints as `llama`).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_FILE = "model.gguf"

_TOP_LEVEL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


# gguf_type -> (tensor type of the 2-D weights, llama.cpp's file type). gguf-py quantizes these
# types itself (bit-exact with ggml for Q8_0); the k-quants it can only read.
TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


def check_exportable(config: dict) -> str:
    """The llama.cpp architecture name for this HF config, or a MergeError saying why not."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MergeError(
            f"GGUF export supports model types {', '.join(ARCHITECTURES)}; this model is {model_type!r}. "
            "Merge with format=hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = _rope_parameters(config)
    allowed = {"default", "linear"} | ({"llama3"} if ARCHITECTURES[model_type] == "llama" else set())
    if rope["rope_type"] not in allowed:
        raise MergeError(f"GGUF export does not handle rope_type {rope['rope_type']!r} for {model_type}")
    return ARCHITECTURES[model_type]


def _rope_parameters(config: dict) -> dict:
    # transformers >= 5 writes rope_parameters; earlier versions rope_theta + rope_scaling.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def _rope_pairs_adjacent(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from halves (HF) to interleaved pairs (llama.cpp `llama`).

    HF rotates row i of a head together with row i + d/2; llama.cpp rotates rows 2i and 2i+1.
    Row i moves to 2i and row i + d/2 to 2i+1, so llama.cpp rotates the same pairs by the same
    angles and attention scores are unchanged.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama3_rope_factors(rope: dict, rotary_dim: int, max_position_embeddings: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style rope scaling, stored as `rope_freqs.weight`.

    HF divides each inverse frequency by `factor` when its wavelength exceeds the original
    context / low_freq_factor, keeps it below original context / high_freq_factor, and blends
    linearly in between; llama.cpp divides by the stored factor instead.
    """
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    wavelength = 2 * math.pi / inv_freq
    context = rope.get("original_max_position_embeddings", max_position_embeddings)
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    blend = (context / wavelength - low) / (high - low)
    scale = np.where(wavelength < context / high, 1.0, (1 - blend) / factor + blend)
    scale = np.where(wavelength > context / low, 1 / factor, scale)
    return (1 / scale).astype(np.float32)


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF tensor; None for tensors llama.cpp recomputes itself."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[hf_name]
    match = _BLOCK.fullmatch(hf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise MergeError(f"GGUF export does not know where tensor {hf_name} goes")


def _tensor_type(name: str, shape: tuple[int, ...], requested: Q) -> Q:
    if len(shape) == 1:
        return Q.F32  # norms and biases: llama.cpp keeps them in fp32 whatever the file type
    if requested in (Q.F32, Q.F16, Q.BF16):
        return requested
    if name == "output.weight" and requested != Q.Q8_0:
        # The output projection is the tensor most sensitive to quantization (llama.cpp's own
        # quantizer keeps it at 6 bits); Q8_0 is the nearest type gguf-py can write.
        requested = Q.Q8_0
    block_size = gguf.GGML_QUANT_SIZES[requested][0]
    return requested if shape[-1] % block_size == 0 else Q.F16  # llama.cpp's fallback too


def _encode(tensor: torch.Tensor, qtype: Q, name: str) -> np.ndarray:
    data = tensor.float().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        data = data.astype(np.float16)
        if not np.isfinite(data).all():
            raise MergeError(f"{name} exceeds the float16 range; export with gguf_type=bf16 or f32")
        return data
    return gguf.quants.quantize(data, qtype)


def _tokenizer_metadata(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> dict:
    """Byte-level BPE vocabulary ("gpt2" in llama.cpp) + special tokens + chat template."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise MergeError(f"GGUF export needs the tokenizer as tokenizer.json; {model_dir} has none")
    tokenizer = json.loads(path.read_text())
    model = tokenizer["model"]
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        kind = "sentencepiece-style BPE with byte fallback" if model.get("byte_fallback") else model.get("type")
        raise MergeError(
            f"GGUF export handles byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2); this one is {kind}. "
            "Merge with format=hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    entries = [(token_id, text, None) for text, token_id in model["vocab"].items()]
    entries += [(t["id"], t["content"], t.get("special", False)) for t in tokenizer.get("added_tokens", [])]
    for token_id, text, special in entries:
        if token_id >= vocab_size:
            raise MergeError(f"token {text!r} has id {token_id}, beyond the model's vocab_size {vocab_size}")
        tokens[token_id] = text
        if special is not None:
            types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    for token_id, text in enumerate(tokens):
        if text is None:  # embedding rows the tokenizer never produces (vocab padded for speed)
            tokens[token_id] = f"[PAD{token_id}]"
            types[token_id] = gguf.TokenType.UNUSED

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    eos = special.special_token_ids.get("eos")
    return {"chat_template": special.chat_template, "eos": tokens[eos] if eos is not None else None}


def _pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's name for the regex that splits text before BPE, recognised from tokenizer.json.

    llama.cpp needs it to split text the way the model was trained; it identifies it by name.
    """
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [step.get("pattern", {}).get("Regex", "") for step in steps if step.get("type") == "Split"]
    if any(r"\p{N}{1,3}" in regex for regex in regexes):
        return "llama-bpe"  # Llama 3
    if any(r"\p{L}+|\p{N}|" in regex for regex in regexes):
        return "qwen2"
    if not regexes and any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        return "gpt-2"
    print("GGUF: pre-tokenizer not recognised; llama.cpp will use its default split, which may tokenize differently")
    return "default"


def _add_model_metadata(writer: gguf.GGUFWriter, config: dict, file_type: gguf.LlamaFileType, name: str) -> None:
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rope = _rope_parameters(config)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def export_gguf(model_dir: Path, out_dir: Path, gguf_type: str, name: str) -> Path:
    """Convert the HF model in model_dir to out_dir/model.gguf (+ out_dir/Modelfile)."""
    config = json.loads((model_dir / "config.json").read_text())
    requested, file_type = TYPES[gguf_type]
    index = model_dir / "model.safetensors.index.json"
    shards = ["model.safetensors"]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))

    path = out_dir / GGUF_FILE
    writer = gguf.GGUFWriter(path, check_exportable(config))
    try:
        tokenizer = _write_gguf(writer, model_dir, config, shards, requested, file_type, name)
    finally:
        writer.close()
    (out_dir / "Modelfile").write_text(modelfile(GGUF_FILE, tokenizer["chat_template"], tokenizer["eos"]))
    return path


def _write_gguf(
    writer: gguf.GGUFWriter, model_dir: Path, config: dict, shards: list[str], requested: Q, file_type, name: str
) -> dict:
    """Metadata, then tensor infos, then tensor data; returns the tokenizer facts the Modelfile needs."""
    from safetensors import safe_open

    arch = writer.arch
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    rope = _rope_parameters(config)

    def transform(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            return _rope_pairs_adjacent(tensor, n_heads)
        if arch == "llama" and ".self_attn.k_proj." in hf_name:
            return _rope_pairs_adjacent(tensor, n_kv_heads)
        return tensor

    _add_model_metadata(writer, config, file_type, name)
    tokenizer = _tokenizer_metadata(writer, model_dir, config["vocab_size"])

    # Pass 1, headers only: every tensor's name, shape and type goes before any data.
    extra = {}
    if rope["rope_type"] == "llama3":
        head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
        extra["rope_freqs.weight"] = _llama3_rope_factors(rope, head_dim, config["max_position_embeddings"])
    for tensor_name, data in extra.items():
        writer.add_tensor_info(tensor_name, data.shape, data.dtype, data.nbytes)
    plan = []
    for shard in shards:
        with safe_open(model_dir / shard, framework="pt") as f:
            for hf_name in f.keys():
                tensor_name = gguf_name(hf_name)
                if tensor_name is None:
                    continue
                shape = tuple(f.get_slice(hf_name).get_shape())
                qtype = _tensor_type(tensor_name, shape, requested)
                plan.append((shard, hf_name, tensor_name, qtype))
                if qtype in (Q.F32, Q.F16):
                    dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
                    writer.add_tensor_info(tensor_name, shape, dtype, math.prod(shape) * dtype.itemsize)
                else:  # packed blocks: announced as bytes, with the element type beside them
                    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                    nbytes = math.prod(byte_shape)
                    writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    # Pass 2: data, one tensor in memory at a time, in the order announced above.
    for data in extra.values():
        writer.write_tensor_data(data)
    for shard, items in itertools.groupby(plan, key=lambda item: item[0]):
        with safe_open(model_dir / shard, framework="pt") as f:
            for _, hf_name, tensor_name, qtype in items:
                writer.write_tensor_data(_encode(transform(hf_name, f.get_tensor(hf_name)), qtype, tensor_name))
    return tokenizer


_CHATML = '''TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
'''
_LLAMA3 = '''TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
'''
_GENERIC = '''# The chat template was not recognised as ChatML or Llama 3, so this is a generic stand-in:
# replace it with the format the model was trained on (tokenizer.chat_template in the GGUF).
TEMPLATE """{{- range .Messages }}{{ .Role }}: {{ .Content }}
{{ end }}assistant: """
'''


def modelfile(gguf_file: str, chat_template, eos_token: str | None) -> str:
    """An Ollama Modelfile: the model, its chat format in Ollama's template language, stop tokens."""
    if isinstance(chat_template, list):  # named templates: use the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    chat_template = chat_template or ""
    if "<|im_start|>" in chat_template:
        template, stops = _CHATML, ["<|im_start|>", "<|im_end|>"]
    elif "<|start_header_id|>" in chat_template:
        template, stops = _LLAMA3, ["<|start_header_id|>", "<|eot_id|>"]
    else:
        template, stops = _GENERIC, []
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines = [f"FROM ./{gguf_file}", "", template.rstrip("\n")]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
