"""Weight streaming and the NF4 cache as runs use them: same numbers as a resident model loaded from the checkpoint."""

import os
import sys

import pytest
import torch
from runner import REPO

from finetune.config import ModelImpl
from finetune.lora import linear_layers
from finetune.models import native
from finetune.models.native import MemoryLayout
from finetune.models.native import nf4_cache
from finetune.models.native.streaming import LayerWeights
from finetune.models.source import ModelSource
from finetune.plan.memory import decide_memory_layout
from test_native import COMMON, FAMILIES, bf16_config, checkpoints, cuda, random_ids, run_config  # noqa: F401
from test_native_training import make_batches, train

sys.path.insert(0, str(REPO / "scripts"))
from make_random_checkpoint import write_random_nf4_cache  # noqa: E402

CPU = torch.device("cpu")


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_packed_layer_buffers_are_views_of_one_host_buffer_and_compute_the_same(checkpoints):
    model_dir = checkpoints("qwen2")
    model = native.build(run_config(model_dir), ModelSource.from_directory(model_dir), torch.float32, CPU)
    ids = random_ids(2, 12)
    before = logits(model, ids)
    packed = [LayerWeights(layer, pin=False) for layer in model.model.layers]
    for layer, weights in zip(model.model.layers, packed):
        start, end = weights.host.data_ptr(), weights.host.data_ptr() + weights.nbytes
        for linear in linear_layers(layer).values():
            for buffer in linear.weight.buffers():
                assert start <= buffer.data_ptr() < end
    assert torch.equal(logits(model, ids), before)
    # Pointing a layer at another copy of its bytes (what a GPU slot is) changes nothing either.
    for weights in packed:
        weights.point_to(weights.host.clone())
    assert torch.equal(logits(model, ids), before)


def test_nf4_cache_setting_writes_then_reads_the_same_model(checkpoints, tmp_path, monkeypatch):
    from finetune.config import ConfigError

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.nf4_cache = str(tmp_path / "cache")
    written = native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, CPU)
    assert nf4_cache.is_cache(tmp_path / "cache")

    def no_checkpoint_reads(model_dir):
        raise AssertionError("a run with a ready NF4 cache read the checkpoint")

    monkeypatch.setattr("finetune.models.native.load.checkpoint_tensors", no_checkpoint_reads)
    read = native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, CPU)
    ids = random_ids(2, 12)
    assert torch.equal(logits(read, ids), logits(written, ids))
    cfg.quant.bnb_4bit_use_double_quant = False  # the cache was made with double quantization
    with pytest.raises(ConfigError, match="double_quant"):
        native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, CPU)


def test_a_random_nf4_cache_is_a_model_directory(tmp_path, capsys):
    """What the 70B benchmark does: model.name_or_path names a cache, with no checkpoint anywhere."""
    import transformers

    from finetune.api import compose_config
    from finetune.models import build_model

    config_class, extra = FAMILIES["llama"]
    write_random_nf4_cache(getattr(transformers, config_class)(**{**COMMON, **extra}), tmp_path / "cache", "cpu")
    cfg = compose_config("demo", [f"model.name_or_path={tmp_path / 'cache'}", "model.impl=auto"])
    loaded = build_model(cfg, CPU)
    assert isinstance(loaded.model, native.NativeCausalLM)
    assert torch.isfinite(logits(loaded.model, random_ids(1, 8))).all()


# ---- on the GPU machine: streamed weights and parked checkpoints train exactly like resident ones ----

@pytest.mark.gpu
@pytest.mark.parametrize("offload, checkpoint_layers", [("weights", None), ("weights", 1), ("weights", 0),
                                                        ("activations", None), ("all", 1)])
def test_gpu_offloaded_runs_train_exactly_like_resident_ones(checkpoints, cuda, offload, checkpoint_layers):
    model_dir = checkpoints("qwen2")
    stream, park = offload in ("weights", "all"), offload in ("activations", "all")
    runs = []
    for moved in (False, True):
        cfg = bf16_config(model_dir, gradient_checkpointing=checkpoint_layers != 0,
                          checkpoint_layers=checkpoint_layers or None)
        torch.manual_seed(0)
        model = native.build(cfg, ModelSource.from_directory(model_dir), torch.bfloat16, cuda,
                             MemoryLayout(stream_weights=moved and stream, park_checkpoints=moved and park))
        if moved and stream:
            weights = [lin.weight.packed for lin in linear_layers(model).values()]
            assert sum(w.device.type == "cuda" for w in weights) <= 2 * 7  # two layers' worth at most
        batches = [{k: v.to(cuda) for k, v in batch.items()} for batch in make_batches()]
        losses = train(model, batches, 6)
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((losses, adapter, logits(model, batches[0]["input_ids"])))
    (resident_losses, resident_adapter, resident_logits), (losses, adapter, moved_logits) = runs
    assert losses == resident_losses
    for name, tensor in resident_adapter.items():
        assert torch.equal(adapter[name], tensor), name
    assert torch.equal(moved_logits, resident_logits)


def decide(cfg, model_dir, device, notices):
    """(stream weights, park checkpoints) as the recipe settles them for the native path."""
    layout = decide_memory_layout(cfg, ModelSource.from_directory(model_dir), ModelImpl.native, "native", device, notices)
    return layout.stream_weights, layout.park_checkpoints


def test_offload_decision_follows_the_setting_and_the_plan(checkpoints):
    from finetune.config import ConfigError, OffloadMode

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True
    cuda = torch.device("cuda")  # only named: with hardware.gpu_memory_gb set nothing asks a GPU
    cfg.hardware.gpu_memory_gb = 1000.0
    notices = []
    assert decide(cfg, model_dir, cuda, notices) == (False, False)
    assert notices and notices[0].startswith("hardware.offload=auto: none")
    cfg.hardware.gpu_memory_gb = 0.0005  # half a MiB: even the tiny model must stream and park
    notices = []
    assert decide(cfg, model_dir, cuda, notices) == (True, True)
    assert "does not fit" in notices[0] or notices[0].startswith("hardware.offload=auto: all")
    cfg.hardware.offload = OffloadMode.weights
    assert decide(cfg, model_dir, cuda, []) == (True, False)
    assert decide(cfg, model_dir, CPU, []) == (False, False)  # host memory already
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, CPU, MemoryLayout(stream_weights=True))


def test_parked_layers_that_would_pin_more_than_the_ram_are_refused_before_loading(checkpoints, monkeypatch):
    from finetune.config import ConfigError
    from finetune.plan import memory

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.hardware.gpu_memory_gb = 1000.0
    cuda = torch.device("cuda")  # only named: with hardware.gpu_memory_gb set nothing asks a GPU
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(memory.os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else 16)  # 16 pages of RAM
    assert decide(cfg, model_dir, cuda, []) == (False, False)  # pins nothing
    cfg.model.parked_layers = 2
    with pytest.raises(ConfigError, match=r"pins .*parked activations, 2 layers: .*model.parked_layers"):
        decide(cfg, model_dir, cuda, [])


def test_auto_checkpoint_layers_follow_the_plan_onto_the_model(checkpoints, monkeypatch):
    model_dir = checkpoints("llama")
    source = ModelSource.from_directory(model_dir)
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True
    layers = source.config["num_hidden_layers"]
    cuda = torch.device("cuda")  # only named: with hardware.gpu_memory_gb set nothing asks a GPU

    def planned(gpu_memory_gb, device=cuda):
        cfg.hardware.gpu_memory_gb = gpu_memory_gb
        notices = []
        layout = decide_memory_layout(cfg, source, ModelImpl.native, "native", device, notices)
        return layout.planned_checkpoint_layers, notices

    chosen, notices = planned(1000.0)
    assert chosen == 0 and notices[-1].startswith(f"model.checkpoint_layers=auto: recomputing 0 of {layers} layers")
    assert planned(0.0005)[0] == layers  # nothing fits: every layer recomputes
    assert planned(1000.0, CPU) == (None, [])  # off the GPU nothing is planned: all layers, as before auto
    cfg.model.checkpoint_layers = "1"
    chosen, notices = planned(1000.0)
    assert chosen is None and not any("checkpoint_layers" in notice for notice in notices)  # a number is as given
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg.model.checkpoint_layers = "auto"
    layers_under_ddp, notices = planned(1000.0)
    assert layers_under_ddp is None and "all layers under 2 processes" in notices[-1]

    for layout, expected in ((MemoryLayout(planned_checkpoint_layers=1), 1), (MemoryLayout(), layers)):
        model = native.build(cfg, source, torch.float32, CPU, layout)
        assert model.model.checkpointed_layers == expected
    # The plan's MLP chunks reach the layers where model.mlp_chunk_tokens is unset, and only there.
    for setting, layout, expected in ((None, MemoryLayout(planned_mlp_chunk_tokens=5), 5), (None, MemoryLayout(), None),
                                      (7, MemoryLayout(planned_mlp_chunk_tokens=5), 7)):
        cfg.model.mlp_chunk_tokens = setting
        model = native.build(cfg, source, torch.float32, CPU, layout)
        assert {layer.mlp_chunk_tokens for layer in model.model.layers} == {expected}


def test_several_processes_never_stream(checkpoints, monkeypatch):
    from finetune.config import ConfigError, OffloadMode

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.hardware.offload = OffloadMode.weights
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one process only"):
        decide(cfg, model_dir, torch.device("cuda"), [])
    # Left to auto, a budget that would stream one process's 70B must not stop a DDP/FSDP run.
    cfg.hardware.offload, cfg.hardware.gpu_memory_gb = OffloadMode.auto, 0.0005
    notices = []
    assert decide(cfg, model_dir, torch.device("cuda"), notices) == (False, False)
    assert notices[0].startswith("hardware.offload=auto: none under 2 processes")


class _HostStreams:
    """CUDA's stream and event calls as no-ops, so the streaming schedule runs on the CPU."""

    class Event:
        def record(self, stream=None):
            pass

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            pass

    @staticmethod
    def current_stream():
        return _HostStreams.Stream()

    @staticmethod
    def stream(stream):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("checkpoint_layers", [None, 1, 0])
def test_every_matmul_reads_weights_from_a_slot(tmp_path, monkeypatch, checkpoint_layers):
    """The schedule: forward, recompute and backward only ever dequantize a layer held in a GPU slot.

    On the CPU, with the copy-stream calls as no-ops, host buffers and slots hold the same bytes,
    so the numbers alone would not show a layer read from the wrong place: every dequantization
    checks where its codes live.
    """
    from finetune.models.native.streaming import WeightStreamer

    import transformers

    from make_random_checkpoint import write_random_checkpoint

    for name in ("Event", "Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(_HostStreams, name))
    # Five layers for two slots, so that layers really leave the GPU and come back.
    model_dir = write_random_checkpoint(transformers.Qwen2Config(**{**COMMON, "num_hidden_layers": 5}),
                                        tmp_path / "five-layers", "cpu")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = checkpoint_layers != 0
    cfg.model.checkpoint_layers = checkpoint_layers or None
    torch.manual_seed(0)
    resident = native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, CPU)
    torch.manual_seed(0)
    model = native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, CPU)
    streamer = WeightStreamer(model.model.layers, CPU, pin=False)
    model.model.streamer = streamer
    reads = []

    def in_a_slot(weight) -> bool:
        return any(slot.data_ptr() <= weight.packed.data_ptr() < slot.data_ptr() + slot.numel()
                   for slot in streamer.slots)

    for linear in linear_layers(model).values():
        dequantize = linear.dequantize

        def checked(weight, out=None, dequantize=dequantize):
            reads.append(in_a_slot(weight))
            return dequantize(weight, out=out) if out is not None else dequantize(weight)

        linear.dequantize = checked
    batches = make_batches()
    assert train(model, batches, 3) == train(resident, batches, 3)
    assert reads and all(reads), f"{reads.count(False)} of {len(reads)} dequantizations read host memory"
    assert torch.equal(logits(model, batches[0]["input_ids"]), logits(resident, batches[0]["input_ids"]))
    assert all(reads)
