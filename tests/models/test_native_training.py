"""Training on the native path follows the generic path step for step."""

import pytest
import torch

from test_native import (bf16_config, checkpoints, copy_lora_from_peft, cuda, generic_model,  # noqa: F401
                         native_model, random_ids, run_config)


def train(model, batches, steps: int, lr: float = 5e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        targets = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch, num_items_in_batch=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def make_batches():
    batches = []
    for seed in range(3):
        ids = random_ids(4, 24, seed=100 + seed)
        labels = ids.clone()
        labels[:, :8] = -100  # a prompt that is not trained on
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def test_twenty_steps_match_the_generic_path(checkpoints):
    model_dir = checkpoints("qwen2")
    torch.manual_seed(0)
    generic = generic_model(model_dir)
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True  # recomputation must not change the numbers
    model = native_model(model_dir, cfg)
    copy_lora_from_peft(generic, model)
    batches = make_batches()
    expected = train(generic, batches, 20)
    actual = train(model, batches, 20)
    assert expected[-1] < 0.8 * expected[0]  # it learns, so the comparison means something
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= 0.01 * e, (step, actual, expected)


def gradients_by_setting(model_dir, settings, lora_dropout: float) -> list[dict]:
    grads = []
    for recompute, layers, chunk in settings:
        cfg = run_config(model_dir, lora_dropout=lora_dropout)
        cfg.model.gradient_checkpointing, cfg.model.checkpoint_layers = recompute, layers
        cfg.model.mlp_chunk_tokens = chunk
        torch.manual_seed(0)
        model = native_model(model_dir, cfg).train()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.1)
        batch = make_batches()[0]
        torch.manual_seed(1)  # the same dropout masks; recomputation must replay them
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    """None, some (model.checkpoint_layers) or all layers recomputed: the same gradients, dropout included."""
    grads = gradients_by_setting(checkpoints("qwen3"), [(False, None, None), (True, None, None), (True, 1, None)],
                                 lora_dropout=0.1)
    for name, grad in grads[0].items():
        for other in grads[1:]:
            torch.testing.assert_close(other[name], grad, msg=name)


def test_mlp_chunks_give_the_same_gradients(checkpoints):
    """model.mlp_chunk_tokens=7 (uneven chunks of 4 x 24 tokens), with and without checkpointing.

    No dropout here: chunks draw their masks chunk by chunk, other numbers from the same distribution.
    """
    grads = gradients_by_setting(checkpoints("qwen3"), [(False, None, None), (True, None, 7), (False, None, 7)],
                                 lora_dropout=0.0)
    for name, grad in grads[0].items():
        for other in grads[1:]:
            # Chunked matmuls sum the adapter gradients chunk by chunk: fp32 reordering only.
            torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_layers_outside_checkpointing_rebuild_norm_and_swiglu_outputs_in_backward(checkpoints):
    """Training frees the norms' and SwiGLU's outputs after forward and backward rebuilds them, with
    the same gradients; a grad-enabled forward in eval mode (which keeps everything) is the control."""
    import dataclasses

    from torch.multiprocessing.reductions import StorageWeakRef

    model_dir = checkpoints("llama")
    model = native_model(model_dir, run_config(model_dir, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    outputs = []

    def recorded(op):
        def run(*args, **kwargs):
            out = op(*args, **kwargs)
            if torch.is_grad_enabled():  # forward, not backward's rebuild
                outputs.append(StorageWeakRef(out.untyped_storage()))
            return out
        return run

    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.ops = dataclasses.replace(norm.ops, rmsnorm=recorded(norm.ops.rmsnorm))
        layer.mlp.ops = dataclasses.replace(layer.mlp.ops, swiglu=recorded(layer.mlp.ops.swiglu))
    batch = make_batches()[0]
    grads, alive = [], []
    for training in (True, False):
        outputs.clear()
        model.train(training)
        loss = model(**batch).loss
        alive.append(sum(not ref.expired() for ref in outputs))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    layers = len(model.model.layers)
    assert len(outputs) == 3 * layers
    assert alive == [0, 3 * layers]
    for name, grad in grads[1].items():
        # The same ops on the same inputs give the same values: rebuilt is bit for bit what was kept.
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=0, msg=name)


def test_only_checkpointed_layers_keep_their_dequantized_weights(checkpoints):
    """Kept weights live from the recompute to the backward only; unchecked layers never keep theirs."""
    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing, cfg.model.checkpoint_layers = True, 1
    model = native_model(model_dir, cfg).train()
    keep = [{lin.keep_dequantized for lin in layer.modules() if hasattr(lin, "keep_dequantized")}
            for layer in model.model.layers]
    assert keep[0] == {True} and all(k == {False} for k in keep[1:])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(**make_batches()[0]).loss.backward()
    weight_shapes = {(lin.out_features, lin.in_features) for lin in model.model.layers[0].modules()
                     if hasattr(lin, "keep_dequantized")}
    # Only tensors saved outside the checkpoint's own hooks reach this one: the unchecked layer's
    # attention and o_proj (under the lean layer's own hooks the rest do not) and the loss. None of
    # them may be a dequantized weight.
    assert saved and not weight_shapes & set(saved)


def test_checkpoint_layers_is_checked(checkpoints):
    from finetune.config import ConfigError

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing, cfg.model.checkpoint_layers = True, 99
    with pytest.raises(ConfigError, match="checkpoint_layers=99.*layers"):
        native_model(model_dir, cfg)
    cfg.model.checkpoint_layers, cfg.model.gradient_checkpointing = 1, False
    with pytest.raises(ConfigError, match="needs model.gradient_checkpointing=true"):
        cfg.validate()


# ---- on the GPU machine: kernels and offloading keep training on the same track ----

@pytest.mark.gpu
def test_gpu_kernels_with_offloaded_checkpoints_train_like_the_generic_path(checkpoints, cuda):
    model_dir = checkpoints("qwen2")
    torch.manual_seed(0)
    generic = generic_model(model_dir, bf16_config(model_dir, impl="hf"), cuda, torch.bfloat16)
    cfg = bf16_config(model_dir, gradient_checkpointing=True, offload_checkpoints=True)
    model = native_model(model_dir, cfg, cuda, torch.bfloat16)
    copy_lora_from_peft(generic, model)
    batches = [{k: v.to(cuda) for k, v in batch.items()} for batch in make_batches()]
    expected = train(generic, batches, 20)
    actual = train(model, batches, 20)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= 0.03 * e, (step, actual, expected)


def compiled_and_eager(model_dir, cfg, device, dtype, batches) -> tuple[list[float], list[float]]:
    """Losses of the same training steps with model.compile on and off."""
    losses = []
    for compile in (True, False):
        torch._dynamo.reset()
        cfg.model.compile = compile
        torch.manual_seed(0)
        losses.append(train(native_model(model_dir, cfg, device, dtype), batches, 8, lr=2e-2))
    return losses[0], losses[1]


@pytest.mark.slow
def test_compiled_layers_train_like_eager(checkpoints):
    # With recompute (the compiled layer runs again inside backward) and padded rows.
    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True
    batches = make_batches()
    batches[1]["attention_mask"] = torch.ones_like(batches[1]["input_ids"])
    batches[1]["attention_mask"][2, 15:] = 0
    compiled, eager = compiled_and_eager(model_dir, cfg, torch.device("cpu"), torch.float32, batches)
    assert eager[-1] < 0.8 * eager[0]  # it learns, so a compiled copy that stalled would show
    # fp32: the compiled kernels sum in other orders, ~1e-7 per op.
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.gpu
def test_gpu_compiled_layers_train_like_eager(checkpoints, cuda):
    # The Triton kernels inside compiled layers, bf16, recompute. An earlier version trained wrongly
    # here (the loss stalled) and compile was refused on CUDA until this held.
    model_dir = checkpoints("llama")
    cfg = bf16_config(model_dir, gradient_checkpointing=True)
    batches = [{k: v.to(cuda) for k, v in batch.items()} for batch in make_batches()]
    compiled, eager = compiled_and_eager(model_dir, cfg, cuda, torch.bfloat16, batches)
    assert eager[-1] < 0.8 * eager[0]
    # bf16: fused and unfused kernels round differently, ~1e-3 relative per step, compounding.
    assert compiled == pytest.approx(eager, rel=1e-2)
