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
print(status("VmHWM") - before, model.get_memory_footprint())
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
