"""Quantize-on-load: sharded checkpoints load, and host memory stays near one shard plus one layer."""

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune.config import ConfigError
from finetune.models.native import load_pretrained
from test_native import checkpoints, make_checkpoint, random_ids  # noqa: F401 (fixture)

CPU = torch.device("cpu")
# Peak RSS of one load, in a fresh process. The fixed mmap threshold makes glibc give freed
# temporaries back to the OS, so RSS shows what the loader holds rather than what malloc keeps.
MEASURE = """
import gc, re, sys, torch
from pathlib import Path
from finetune.models.native import load_pretrained
def status(key):
    return int(re.search(rf"{key}:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
load_pretrained(sys.argv[2], torch.device("cpu"))  # warm up: imports, first-use allocations
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
model = load_pretrained(sys.argv[1], torch.device("cpu"), storage_dtype=torch.bfloat16)
print(status("VmHWM") - before, model.memory_footprint())
"""


def test_sharded_checkpoint_loads_to_the_same_model(checkpoints, tmp_path):
    sharded = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="100KB")
    assert len(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())) > 3
    ids = random_ids(1, 12)
    with torch.no_grad():
        expected = load_pretrained(checkpoints("llama"), CPU).eval()(input_ids=ids).logits
        assert torch.equal(load_pretrained(sharded, CPU).eval()(input_ids=ids).logits, expected)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak RSS")
def test_peak_host_memory_is_about_one_shard_plus_one_layer(checkpoints, tmp_path):
    hidden, intermediate, layers = 256, 1024, 16
    model_dir = make_checkpoint("llama", tmp_path / "model", max_shard_size="8MB", hidden_size=hidden,
                                intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=8,
                                num_key_value_heads=8)
    files = [p.stat().st_size for p in model_dir.glob("*.safetensors")]
    layer_bytes = 4 * (4 * hidden * hidden + 3 * hidden * intermediate)  # fp32 checkpoint
    result = subprocess.run([sys.executable, "-c", MEASURE, str(model_dir), str(checkpoints("llama"))],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak, footprint = (int(v) for v in result.stdout.split())
    # What the loaded model keeps, plus the shard being read and the layer being quantized
    # (with its temporaries); reading everything first would need the whole checkpoint.
    assert peak <= footprint + max(files) + 2 * layer_bytes, (peak, footprint, max(files), layer_bytes)
    assert peak < sum(files) / 2


def test_a_checkpoint_missing_tensors_is_refused_by_name(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    source = checkpoints("llama")
    target = tmp_path / "incomplete"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(target, CPU)


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "qwen3"])
@pytest.mark.parametrize("from_cache", [False, True])
def test_an_empty_model_has_every_tensor_of_the_loaded_one(family, from_cache, checkpoints, tmp_path):
    # FSDP broadcasts the first process's loaded model into the others' empty ones, tensor for
    # tensor: names, shapes, dtypes and the 4-bit weights' attributes must all agree.
    from finetune.lora import linear_layers
    from finetune.models.native import empty_pretrained

    settings = dict(compute_dtype=torch.bfloat16, storage_dtype=torch.bfloat16, double_quant=family != "qwen2")
    model_dir = checkpoints(family)
    if from_cache:
        settings["cache_dir"] = tmp_path / "cache"
        load_pretrained(model_dir, CPU, **settings)  # writes the cache
    loaded, empty = load_pretrained(model_dir, CPU, **settings), empty_pretrained(model_dir, CPU, **settings)
    layout = {name: (tuple(t.shape), t.dtype) for name, t in loaded.state_dict().items()}
    assert {name: (tuple(t.shape), t.dtype) for name, t in empty.state_dict().items()} == layout
    assert all(t.is_meta for name, t in empty.state_dict().items() if not name.endswith("inv_freq"))
    for name, layer in linear_layers(loaded).items():
        mine = linear_layers(empty)[name].weight
        for attribute in ("shape", "dtype", "blocksize", "quant_type", "nested", "nested_blocksize"):
            assert getattr(mine, attribute, None) == getattr(layer.weight, attribute, None), (name, attribute)
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == loaded.args.tie_word_embeddings


def test_materializing_keeps_the_parameter_objects_and_ties(checkpoints):
    # The optimizer is built over the parameters before FSDP materializes them, and a tied LM head
    # is the embedding's very parameter: both must still point at the materialized tensors.
    from finetune.config import LoraConfig
    from finetune.lora import attach_lora
    from finetune.models.native import empty_pretrained, materialize_empty

    model = empty_pretrained(checkpoints("llama_tied"), CPU)
    attach_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    params = dict(model.named_parameters())
    held = [p for p in model.parameters() if p.requires_grad]
    assert held and all(p.is_meta for p in held)
    for module in model.modules():
        materialize_empty(module, CPU)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert all(p is params[name] for name, p in model.named_parameters())
    assert all(p.requires_grad for p in held) and model.lm_head.weight is model.model.embed_tokens.weight
