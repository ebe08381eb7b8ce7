"""A recomputed layer whose inputs are parked keeps attention's results for its recompute
(kept_attention.py): the same numbers, without attention's forward or o_proj's GEMM a second time."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import finetune.models.native.model as native_model_module
from test_native import bf16_config, checkpoints, cuda, native_model, random_ids, run_config  # noqa: F401

# SDPA's kernels, as the public function dispatches to them and as kept_attention calls them.
KERNELS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")
ATTENTION_FORWARDS = {getattr(torch.ops.aten, name).default for name in KERNELS}
ATTENTION_BACKWARDS = {getattr(torch.ops.aten, name + "_backward").default for name in KERNELS}


class Ops(TorchDispatchMode):
    """Counts attention kernels and the GEMMs by their right operand's shape."""

    def __init__(self):
        super().__init__()
        self.attention_forwards = self.attention_backwards = 0
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_FORWARDS:
            self.attention_forwards += 1
        elif func in ATTENTION_BACKWARDS:
            self.attention_backwards += 1
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.products.append(tuple(args[-1].shape))
        return func(*args, **(kwargs or {}))


def step(model_dir, batch, keep_from: int | None, lora_dropout=0.1, mlp_chunk=None, device=None):
    """One step with every layer recomputed and its input parked; attention kept from rows of
    `keep_from` tokens (None: the product's threshold). Loss, LoRA gradients and the counted ops.
    `device`: CUDA, in bf16 with the Triton kernels, and parking for real."""
    if device is None:
        cfg = run_config(model_dir, lora_dropout=lora_dropout)
        model_args = ()
    else:
        cfg = bf16_config(model_dir)
        cfg.lora.lora_dropout = lora_dropout
        model_args = (device, torch.bfloat16)
        batch = {key: value.to(device) if key != "cu_seqlens" else value for key, value in batch.items()}
    cfg.model.gradient_checkpointing, cfg.model.mlp_chunk_tokens = True, mlp_chunk
    torch.manual_seed(0)
    model = native_model(model_dir, cfg, *model_args).train()
    model.model.set_checkpointing(len(model.model.layers), offload=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    torch.manual_seed(1)
    ops = Ops()
    threshold = native_model_module.MIN_ROW_TOKENS if keep_from is None else keep_from
    with pytest.MonkeyPatch.context() as patch, ops:
        patch.setattr(native_model_module, "MIN_ROW_TOKENS", threshold)
        loss = model(**batch).loss
        loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    return loss, grads, ops, model


def whole_rows():
    ids = random_ids(2, 24, seed=5)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kept_attention_gives_the_same_numbers_without_attention_forward_in_the_recompute(checkpoints, family):
    """Loss and gradients bit for bit those of the full recompute (the CPU's flash kernel is the one
    SDPA picks there), LoRA dropout replayed; attention's forward runs once a layer, not twice, and
    so do the q/k/v and o_proj forward GEMMs (in the first pass only)."""
    model_dir = checkpoints(family)
    loss, grads, ops, model = step(model_dir, whole_rows(), keep_from=24)
    full_loss, full_grads, full_ops, _ = step(model_dir, whole_rows(), keep_from=25)
    assert torch.equal(loss, full_loss)
    for name, grad in full_grads.items():
        assert torch.equal(grads[name], grad), name
    layers = len(model.model.layers)
    assert full_ops.attention_forwards == 2 * layers and ops.attention_forwards == layers
    assert ops.attention_backwards == full_ops.attention_backwards == layers
    if family == "llama":  # o_proj's GEMM has a shape of its own there (in qwen3, down_proj's too)
        attention = model.model.layers[0].self_attn
        # [x | xa] Wc^T: ranks 3 x 8 and 8 need no padding.
        qkv_forward = (attention.q_proj.in_features + 24, 2 * attention.q_proj.out_features)
        o_forward = (attention.o_proj.in_features + 8, attention.o_proj.out_features)
        for shape in (qkv_forward, o_forward):
            assert full_ops.products.count(shape) == 2 * layers and ops.products.count(shape) == layers


def test_kept_attention_with_mlp_chunks(checkpoints):
    """The MLP's own checkpointed chunks inside a layer that keeps attention: the same gradients."""
    model_dir = checkpoints("llama")
    batch = whole_rows()
    _, grads, ops, _ = step(model_dir, batch, keep_from=24, lora_dropout=0.0, mlp_chunk=7)
    _, full_grads, _, _ = step(model_dir, batch, keep_from=25, lora_dropout=0.0, mlp_chunk=7)
    for name, grad in full_grads.items():
        assert torch.equal(grads[name], grad), name
    assert ops.attention_forwards == 2


def test_packed_rows_of_equal_samples_keep_attention_per_sample(checkpoints):
    """A row of equal samples is attended sample by sample: the threshold reads the sample's length."""
    model_dir = checkpoints("llama")
    ids = random_ids(1, 24, seed=6)
    batch = {"input_ids": ids, "labels": ids, "cu_seqlens": torch.tensor([0, 12, 24])}
    loss, grads, ops, _ = step(model_dir, batch, keep_from=12)
    full_loss, full_grads, full_ops, _ = step(model_dir, batch, keep_from=13)
    assert ops.attention_forwards == 2 and full_ops.attention_forwards == 4
    assert torch.equal(loss, full_loss)
    for name, grad in full_grads.items():
        assert torch.equal(grads[name], grad), name


def test_masked_attention_and_short_rows_recompute_whole(checkpoints):
    """Padding (a mask) and rows shorter than the threshold: nothing kept, attention runs twice."""
    model_dir = checkpoints("llama")
    padded = whole_rows()
    padded["attention_mask"] = torch.ones_like(padded["input_ids"])
    padded["attention_mask"][0, :5] = 0
    _, _, masked_ops, _ = step(model_dir, padded, keep_from=1)
    _, _, short_ops, _ = step(model_dir, whole_rows(), keep_from=None)
    assert masked_ops.attention_forwards == short_ops.attention_forwards == 4  # two layers, two passes


def test_kept_attention_only_where_inputs_are_parked(checkpoints):
    """Kept on the GPU, the two extra tensors a layer would cost memory: without parking nothing is kept."""
    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True
    model = native_model(model_dir, cfg).train()
    ops = Ops()
    with pytest.MonkeyPatch.context() as patch, ops:
        patch.setattr(native_model_module, "MIN_ROW_TOKENS", 1)
        model(**whole_rows()).loss.backward()
    assert ops.attention_forwards == 4


@pytest.mark.parametrize("planned", [True, False])
def test_the_memory_plan_can_leave_attention_to_the_recompute(checkpoints, planned):
    """Where keeping attention's results would not fit, the plan says so (MemoryLayout.keep_attention,
    tests/plan) and the built model recomputes attention, though model.keep_attention is on."""
    from finetune.models import native
    from finetune.models.native.load import MemoryLayout
    from finetune.models.source import ModelSource

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True
    model = native.build(cfg, ModelSource.from_directory(model_dir), torch.float32, torch.device("cpu"),
                         MemoryLayout(park_checkpoints=True, keep_attention=planned)).train()
    assert cfg.model.keep_attention and model.model.keep_attention is planned
    # Parked for real only on CUDA (pinned memory): on the CPU the inputs stay where they are.
    model.model.set_checkpointing(len(model.model.layers), offload=True)
    ops = Ops()
    with pytest.MonkeyPatch.context() as patch, ops:
        patch.setattr(native_model_module, "MIN_ROW_TOKENS", 1)
        model(**whole_rows()).loss.backward()
    assert ops.attention_forwards == (2 if planned else 4)  # two layers; twice each when recomputed whole


@pytest.mark.parametrize("refusing", ["forward", "backward"])
def test_a_refusing_kernel_falls_back_to_recomputing(checkpoints, monkeypatch, refusing):
    """Private kernels change between torch versions: one that refuses a call (an error raised before
    it runs) is not tried again, and attention is recomputed as without keeping: the same numbers."""
    from finetune.models.native import kept_attention

    model_dir = checkpoints("llama")
    _, full_grads, _, _ = step(model_dir, whole_rows(), keep_from=25)

    def refuse(*args):
        raise RuntimeError("no such overload")

    monkeypatch.setattr(kept_attention, "_refused", set())
    monkeypatch.setattr(kept_attention, f"_cpu_{refusing}", refuse)
    with pytest.warns(UserWarning, match="attention is recomputed"):
        _, grads, ops, _ = step(model_dir, whole_rows(), keep_from=24)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    # Refused in forward: nothing kept, attention's forward twice a layer; refused in backward (the
    # first layer's): forward once, then once more in each backward (by autograd's SDPA).
    assert ops.attention_forwards == 4
    assert kept_attention._refused == {refuse}


@pytest.mark.gpu
@pytest.mark.parametrize("rows", ["whole", "equal_samples"])
def test_gpu_kept_attention_gives_the_same_numbers(checkpoints, cuda, rows):
    """cuDNN's kernels through their private ops, the kept tensors parked in pinned host memory and
    back: loss and gradients bit for bit the full recompute's."""
    model_dir = checkpoints("llama")
    batch = whole_rows() if rows == "whole" else {**whole_rows(), "cu_seqlens": torch.tensor([0, 12, 24])}
    if rows == "equal_samples":
        batch = {key: value[:1] if key != "cu_seqlens" else value for key, value in batch.items()}
    loss, grads, ops, _ = step(model_dir, batch, keep_from=12, device=cuda)
    full_loss, full_grads, full_ops, _ = step(model_dir, batch, keep_from=25, device=cuda)
    assert (ops.attention_forwards, full_ops.attention_forwards) == (2, 4)
    assert torch.equal(loss, full_loss)
    for name, grad in full_grads.items():
        assert torch.equal(grads[name], grad), name
