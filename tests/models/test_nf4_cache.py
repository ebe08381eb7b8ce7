"""The pre-quantized NF4 cache: it loads to exactly the model quantize-on-load gives, and refuses what doesn't fit."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from runner import REPO

from finetune.config import ConfigError
from finetune.lora import linear_layers
from finetune.models import native
from finetune.models.native import nf4_cache
from finetune.models.source import ModelSource
from test_native import COMMON, FAMILIES, checkpoints, random_ids  # noqa: F401 (fixture)

sys.path.insert(0, str(REPO / "scripts"))
from make_random_checkpoint import write_random_checkpoint, write_random_nf4_cache  # noqa: E402

CPU = torch.device("cpu")


def hf_config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def empty_model(config) -> native.NativeCausalLM:
    """An empty (meta) model as load_pretrained builds it before streaming, on the CPU."""
    return native.NativeCausalLM(native.ModelArgs.from_hf(config), native.torch_ops(), CPU)


def cached_model(cache_dir, compute_dtype=torch.float32) -> native.NativeCausalLM:
    config, _, _ = nf4_cache.read_cache(cache_dir)
    model = empty_model(config)
    native.load_from_cache(model, cache_dir, CPU, compute_dtype)
    return model


def assert_same_model(actual: native.NativeCausalLM, expected: native.NativeCausalLM) -> None:
    """Every parameter and buffer bit for bit (dtype included), every quantized weight's attributes, the logits."""
    state, reference = actual.state_dict(keep_vars=True), expected.state_dict(keep_vars=True)
    assert list(state) == list(reference)
    for name, tensor in reference.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    for name, layer in linear_layers(expected).items():
        mine = linear_layers(actual)[name].weight
        for attribute in ("shape", "dtype", "blocksize", "quant_type", "nested", "nested_blocksize"):
            assert getattr(mine, attribute, None) == getattr(layer.weight, attribute, None), (name, attribute)
    assert (actual.lm_head.weight is actual.model.embed_tokens.weight) == expected.args.tie_word_embeddings
    ids = random_ids(2, 12)
    with torch.no_grad():
        logits = actual.eval()(input_ids=ids).logits
        assert torch.equal(logits, expected.eval()(input_ids=ids).logits)
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def llama_cache(checkpoints, tmp_path_factory):
    """(checkpoint, its cache) for the tiny Llama, written once from load_pretrained's model."""
    model_dir = checkpoints("llama")
    model = native.load_pretrained(model_dir, CPU)
    cache_dir = tmp_path_factory.mktemp("caches") / "llama"
    native.write_nf4_cache(model, hf_config(model_dir), cache_dir, nf4_cache.source_fingerprint(model_dir))
    return model_dir, cache_dir


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "qwen3"])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_gives_the_model_load_pretrained_gives(family, storage_dtype, checkpoints, tmp_path):
    model_dir = checkpoints(family)
    model = native.load_pretrained(model_dir, CPU, storage_dtype=storage_dtype, double_quant=family != "qwen2")
    cache_dir = native.write_nf4_cache(model, hf_config(model_dir), tmp_path / "cache", "fingerprint")
    assert_same_model(cached_model(cache_dir), model)

    meta = json.loads((cache_dir / nf4_cache.META_FILE).read_text())
    assert len(meta["shards"]) == 1 + COMMON["num_hidden_layers"]  # the rest, then one per decoder layer
    assert meta["tensor_dtype"] == meta["storage_dtype"] == str(storage_dtype).removeprefix("torch.")
    from safetensors import safe_open

    names = set()
    for shard in meta["shards"]:
        with safe_open(str(cache_dir / shard["file"]), framework="pt") as handle:
            names |= set(handle.keys())
    assert ("lm_head.weight" in names) != (family == "llama_tied")  # a tied head is not stored twice
    assert "model.layers.1.mlp.up_proj.weight.packed" in names and "model.layers.1.mlp.up_proj.weight" not in names


def test_a_cache_in_the_storage_dtype_loads_for_another_compute_dtype(checkpoints, tmp_path):
    """Unquantized tensors are kept in torch_dtype, so the compute dtype may differ between write and load."""
    model_dir = checkpoints("llama")
    model = native.load_pretrained(model_dir, CPU, torch.float32, storage_dtype=torch.bfloat16)
    cache_dir = native.write_nf4_cache(model, hf_config(model_dir), tmp_path / "cache", "fingerprint")
    expected = native.load_pretrained(model_dir, CPU, torch.bfloat16, storage_dtype=torch.bfloat16)
    loaded = cached_model(cache_dir, torch.bfloat16)
    for name, tensor in expected.state_dict().items():
        assert tensor.dtype == loaded.state_dict()[name].dtype and torch.equal(loaded.state_dict()[name], tensor)


def test_adapters_are_not_part_of_the_cache(checkpoints, tmp_path):
    from test_native import run_config

    model_dir = checkpoints("llama")
    # LoRA attached
    model = native.build(run_config(model_dir), ModelSource.from_directory(model_dir), torch.float32, CPU)
    cache_dir = native.write_nf4_cache(model, hf_config(model_dir), tmp_path / "cache", "fingerprint")
    loaded = cached_model(cache_dir)
    assert not any("lora" in name for name in loaded.state_dict())
    assert_same_model(loaded, native.load_pretrained(model_dir, CPU))


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_random_cache_equals_quantizing_the_random_checkpoint(family, tmp_path, capsys):
    """The random writer draws what write_random_checkpoint draws, then quantizes as load_pretrained does."""
    import transformers

    config_class, extra = FAMILIES[family]
    make_config = lambda: getattr(transformers, config_class)(**{**COMMON, **extra})  # noqa: E731
    write_random_checkpoint(make_config(), tmp_path / "checkpoint", "cpu", seed=3)
    cache_dir = write_random_nf4_cache(make_config(), tmp_path / "cache", "cpu", seed=3)
    out = capsys.readouterr().out
    assert f"layer {COMMON['num_hidden_layers']}/{COMMON['num_hidden_layers']}:" in out
    assert "wrote the NF4 cache" in out

    config, meta, _ = nf4_cache.read_cache(cache_dir)
    assert meta.fingerprint == "random:llama:seed3"
    expected = native.load_pretrained(tmp_path / "checkpoint", CPU, storage_dtype=torch.bfloat16)
    assert_same_model(cached_model(cache_dir), expected)


def test_check_accepts_the_settings_and_checkpoint_it_was_written_for(llama_cache):
    model_dir, cache_dir = llama_cache
    _, meta, _ = nf4_cache.read_cache(cache_dir)
    nf4_cache.check_cache(cache_dir, meta, fingerprint=nf4_cache.source_fingerprint(model_dir), quant_type="nf4",
                          double_quant=True, storage_dtype=torch.float32, compute_dtype=torch.float32)


@pytest.mark.parametrize("setting, value, message", [
    ("quant_type", "fp4", "quant_type=nf4 \\(this run: fp4\\)"),
    ("double_quant", False, "double_quant=True \\(this run: False\\)"),
    ("storage_dtype", torch.bfloat16, "torch_dtype=float32 \\(this run: bfloat16\\)"),
])
def test_other_quant_settings_are_refused(llama_cache, setting, value, message):
    _, cache_dir = llama_cache
    _, meta, _ = nf4_cache.read_cache(cache_dir)
    settings = dict(quant_type="nf4", double_quant=True, storage_dtype=torch.float32, compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match=f"{message}.*Delete {cache_dir}"):
        nf4_cache.check_cache(cache_dir, meta, fingerprint=None, **{**settings, setting: value})


def test_a_changed_checkpoint_is_refused(checkpoints, tmp_path):
    import shutil

    model_dir = shutil.copytree(checkpoints("llama"), tmp_path / "model")
    fingerprint = nf4_cache.source_fingerprint(model_dir)
    assert nf4_cache.source_fingerprint(model_dir) == fingerprint
    cache_dir = native.write_nf4_cache(native.load_pretrained(model_dir, CPU), hf_config(model_dir),
                                      tmp_path / "cache", fingerprint)
    shard = model_dir / "model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten in place
    _, meta, _ = nf4_cache.read_cache(cache_dir)
    with pytest.raises(ConfigError, match=f"another checkpoint.*Delete {cache_dir}"):
        nf4_cache.check_cache(cache_dir, meta, fingerprint=nf4_cache.source_fingerprint(model_dir), quant_type="nf4",
                              double_quant=True, storage_dtype=torch.float32, compute_dtype=torch.float32)


def test_a_compute_dtype_the_stored_tensors_cannot_give_is_refused(checkpoints, tmp_path):
    # Computing in bfloat16 from float32 weights: the bfloat16 tensors stored cannot give float32 ones.
    model_dir = checkpoints("llama")
    model = native.load_pretrained(model_dir, CPU, torch.bfloat16, storage_dtype=torch.float32)
    cache_dir = native.write_nf4_cache(model, hf_config(model_dir), tmp_path / "cache", "fingerprint")
    with pytest.raises(ConfigError, match="in bfloat16 .*cannot give the float32 values"):
        cached_model(cache_dir, torch.float32)


def damaged_copy(cache_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the cache and the path of its second shard (decoder layer 0)."""
    import shutil

    copy = shutil.copytree(cache_dir, tmp_path / "damaged")
    return copy, copy / json.loads((copy / nf4_cache.META_FILE).read_text())["shards"][1]["file"]


def test_a_missing_shard_is_refused(llama_cache, tmp_path):
    cache_dir, shard = damaged_copy(llama_cache[1], tmp_path)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard} is missing: the cache is damaged. Delete {cache_dir}"):
        nf4_cache.read_cache(cache_dir)


def test_a_truncated_shard_is_refused_before_loading(llama_cache, tmp_path):
    cache_dir, shard = damaged_copy(llama_cache[1], tmp_path)
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    with pytest.raises(ConfigError, match=f"{shard} has {size - 100} bytes, {size} were written"):
        nf4_cache.read_cache(cache_dir)


def test_a_shard_with_a_corrupt_header_is_refused(llama_cache, tmp_path):
    cache_dir, shard = damaged_copy(llama_cache[1], tmp_path)
    with open(shard, "r+b") as handle:
        handle.write(b"\xff" * 16)  # same size, unreadable header
    with pytest.raises(ConfigError, match=f"{shard} cannot be read.*Delete {cache_dir}"):
        cached_model(cache_dir)


def test_a_cache_without_its_description_or_of_another_version_is_refused(llama_cache, tmp_path):
    cache_dir, _ = damaged_copy(llama_cache[1], tmp_path)
    meta_file = cache_dir / nf4_cache.META_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ConfigError, match="format version 0, this code reads version 1"):
        nf4_cache.read_cache(cache_dir)
    meta_file.unlink()
    with pytest.raises(ConfigError, match=f"no {nf4_cache.META_FILE}"):
        nf4_cache.read_cache(cache_dir)


def test_a_cache_of_another_architecture_is_refused(llama_cache, checkpoints):
    with pytest.raises(ConfigError, match="another architecture"):
        native.load_from_cache(empty_model(hf_config(checkpoints("qwen3"))), llama_cache[1], CPU, torch.float32)


def test_a_crash_while_writing_leaves_nothing_at_the_final_path(checkpoints, tmp_path, monkeypatch):
    model_dir = checkpoints("llama")
    model = native.load_pretrained(model_dir, CPU)
    written = []

    def end_shard_then_crash(self):
        written.append(original(self))
        if len(written) == 2:
            raise RuntimeError("disk full")
        return written[-1]

    original = nf4_cache.CacheWriter.end_shard
    monkeypatch.setattr(nf4_cache.CacheWriter, "end_shard", end_shard_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        native.write_nf4_cache(model, hf_config(model_dir), tmp_path / "cache", "fingerprint")
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its staging directory


def test_an_existing_cache_is_not_overwritten(llama_cache):
    model_dir, cache_dir = llama_cache
    before = {path.name: path.stat().st_mtime_ns for path in cache_dir.iterdir()}
    with pytest.raises(ConfigError, match="already exists; delete it"):
        native.write_nf4_cache(native.load_pretrained(model_dir, CPU), hf_config(model_dir), cache_dir, "fingerprint")
    assert {path.name: path.stat().st_mtime_ns for path in cache_dir.iterdir()} == before
    assert [path.name for path in cache_dir.parent.iterdir()] == [cache_dir.name]  # no staging left behind
