"""Training on the native path follows the generic path step for step."""

import pytest
import torch

from finetune.config import ConfigError
from test_native import (COMMON, bf16_config, checkpoints, copy_lora_from_peft, cuda,  # noqa: F401
                         generic_model, native_model, random_ids, run_config)


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


def test_a_recomputed_layers_first_pass_records_no_graph(checkpoints):
    """Forward records one node per recomputed layer and nothing of what runs inside it (its
    projections, norms, attention): those are recorded by the recompute, in backward."""
    model_dir = checkpoints("llama")
    cfg = run_config(model_dir, lora_dropout=0.1)
    cfg.model.gradient_checkpointing, cfg.model.checkpoint_layers = True, 1
    model = native_model(model_dir, cfg).train()
    loss = model(**make_batches()[0]).loss
    nodes, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    # Layer 0 recomputes; layer 1 keeps its graph (its four projection groups).
    assert nodes.count("RecomputedLayerBackward") == 1
    assert nodes.count("QLoRAGroupFunctionBackward") == 4
    loss.backward()  # and the recompute's nested backward still reaches layer 0's adapters (B: A's is 0 at B = 0)
    adapters = [module for name, module in model.named_modules()
                if name.startswith("model.layers.0.") and getattr(module, "lora_B", None) is not None]
    assert len(adapters) == 7 and all(module.lora_B.grad.abs().sum() > 0 for module in adapters)


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


@pytest.mark.parametrize("mlp_chunk", [None, 7])
def test_recompute_skips_the_down_projection(checkpoints, mlp_chunk):
    """A recomputed layer's output is thrown away: its down_proj GEMM runs in forward only, not again
    in the recompute, while the gradients match a run without recompute (the first test above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir, lora_dropout=0.1)
    cfg.model.gradient_checkpointing, cfg.model.mlp_chunk_tokens = True, mlp_chunk
    model = native_model(model_dir, cfg).train()
    down = model.model.layers[0].mlp.down_proj
    products = []

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default):
                products.append(tuple(args[-1].shape))
            return func(*args, **(kwargs or {}))

    with Matmuls():
        model(**make_batches()[0]).loss.backward()
    layers = len(model.model.layers)
    chunks = 1 if mlp_chunk is None else -(-4 * 24 // mlp_chunk)
    weight_t = (down.in_features, down.out_features)  # x W^T and, for the adapter's term, xa S^T
    assert products.count(weight_t) == layers * chunks
    assert products.count((down.out_features, down.in_features)) == layers * chunks  # backward's dy W


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
    keep = [{name.rsplit(".", 1)[-1]: lin.keep_dequantized for name, lin in layer.named_modules()
             if hasattr(lin, "keep_dequantized")} for layer in model.model.layers]
    # gate/up, the largest, are dequantized again for their backward (the next test counts).
    assert keep[0] == {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": True, "gate_proj": False,
                       "up_proj": False, "down_proj": True}
    assert all(set(k.values()) == {False} for k in keep[1:])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(**make_batches()[0]).loss
    loss.backward()
    weight_shapes = {(lin.out_features, lin.in_features) for lin in model.model.layers[0].modules()
                     if hasattr(lin, "keep_dequantized")}
    # What forward saves reaches this hook unless an inner one takes it: the recomputed layer's
    # input, the unchecked layer's attention and o_proj (under the lean layer's own hooks the rest
    # do not) and the loss. None of them may be a dequantized weight.
    assert saved and not weight_shapes & set(saved)


def test_recomputed_layers_dequantize_gate_up_again_for_backward(checkpoints):
    """Per step, a recomputed layer dequantizes each weight in forward and in the recompute, which
    hands it to backward; gate/up alone once more in backward, so that they are not held through
    down_proj's and SwiGLU's backward, where the step's memory peaks."""
    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing = True
    model = native_model(model_dir, cfg).train()
    calls = {}
    for name, linear in model.model.layers[0].named_modules():
        if hasattr(linear, "keep_dequantized"):
            def counted(weight, out=None, _dequantize=linear.dequantize, _name=name.rsplit(".", 1)[-1]):
                calls[_name] = calls.get(_name, 0) + 1
                return _dequantize(weight, out=out)
            linear.dequantize = counted
    model(**make_batches()[0]).loss.backward()
    assert calls == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2, "gate_proj": 3, "up_proj": 3,
                     "down_proj": 2}


def test_recomputed_layers_make_their_lora_operands_once(checkpoints, monkeypatch):
    """A recomputed layer's recompute reuses the LoRA operands (stacked A, block S) its first pass
    made, held until each group's backward; a layer outside recompute makes its own and shares none.
    The next forward starts afresh, so an adapter update between forwards that bumps no version
    counter (bitsandbytes' optimizers write through raw pointers; `.data` here) is seen."""
    import finetune.lora

    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing, cfg.model.checkpoint_layers = True, 1
    model = native_model(model_dir, cfg).train()
    made = []
    make_block = finetune.lora._lora_block
    monkeypatch.setattr(finetune.lora, "_lora_block", lambda layers, *rest: made.append(layers) or make_block(layers, *rest))
    batch = make_batches()[0]
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    groups = {(attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,),
              (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)}

    loss = model(**batch).loss  # a forward whose backward never runs: its operands stay behind
    shared = model.model.shared_operands
    assert set(shared.entries) == groups
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.data.normal_(std=0.1)
    fresh = native_model(model_dir, cfg).train()
    fresh.load_state_dict(model.state_dict())

    made.clear()
    loss = model(**batch).loss
    loss.backward()
    # Layer 0: 4 groups in the first pass, none in the recompute; layer 1: 4.
    assert len(made) == 8 and not shared.entries
    fresh_loss = fresh(**batch).loss
    fresh_loss.backward()
    assert torch.equal(loss, fresh_loss)
    grads = dict(fresh.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name].grad), name


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


def warm_cublas_workspaces(device: torch.device) -> None:
    """A GEMM in forward and one in backward. cuBLAS's workspace (32 MiB on an H100) is allocated per
    handle, and handles are per thread: the first GEMM on the main thread allocates one, the first
    backward (autograd's device thread) another, and both stay. Without this, a run measured after
    another's backward counts 32 MiB that the first run's measurement, before any backward, did not."""
    a = torch.ones(16, 16, device=device, requires_grad=True)
    (a @ a).sum().backward()


def parked_run(model_dir, device, dtype, ids, mlp_chunk=None, **model_settings) -> tuple[dict, int, list, list]:
    """One forward and backward: (gradients, bytes allocated after forward less the recorded layer
    inputs, the layer inputs, per layer the host tensors its parking holds after forward)."""
    cfg = bf16_config(model_dir) if dtype == torch.bfloat16 else run_config(model_dir)
    for key, value in model_settings.items():
        setattr(cfg.model, key, value)
    cfg.model.mlp_chunk_tokens = mlp_chunk
    cfg.lora.lora_dropout = 0.0
    if device.type == "cuda":
        warm_cublas_workspaces(device)
    torch.manual_seed(0)
    model = native_model(model_dir, cfg, device, dtype).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
             for layer in model.model.layers]
    loss = model(input_ids=ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    allocated = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.empty(1, device=device)  # an allocation settles frees that waited on the copy stream
        allocated = torch.cuda.memory_allocated() - sum(t.numel() * t.element_size() for t in inputs)
    parking = model.model.parking
    # Weak references: the autograd graph holds the parked tensors until backward frees them.
    parked = [[ref().host for ref in parking.latest.get(index, ())] for index in range(len(inputs))] if parking else []
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, allocated, inputs, parked


def test_parked_layers_train_like_kept_ones(checkpoints):
    """model.parked_layers on the CPU: the hooks run (rebuilt outputs keep their inputs through the
    parking hooks, deduplicated), nothing moves, and the gradients are the same."""
    model_dir = checkpoints("qwen3")
    ids = random_ids(4, 24, seed=3)
    kept, *_ = parked_run(model_dir, torch.device("cpu"), torch.float32, ids, gradient_checkpointing=False)
    for settings in (dict(gradient_checkpointing=False, parked_layers=2),
                     dict(gradient_checkpointing=True, checkpoint_layers="1", parked_layers=1)):
        for chunk in (None, 7):
            grads, *_ = parked_run(model_dir, torch.device("cpu"), torch.float32, ids, chunk, **settings)
            for name, grad in kept.items():
                # MLP chunks sum the adapter gradients chunk by chunk: fp32 reordering only.
                torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=(settings, chunk, name))


def test_parked_layers_park_each_storage_once_and_rebuild_its_views(checkpoints, monkeypatch):
    """Views of one tensor that different ops save (attention's output as the attention op keeps it
    and as o_proj's input) are parked as one storage. Parking here copies for real (a CPU stand-in
    for the pinned copy), so every view is rebuilt over the copy, and the gradients are the same."""
    from finetune.models.native import parking

    packed_storages = []

    class Copied:
        def __init__(self, tensor):
            self.copy = tensor.clone()

    def park(self, index, own, tensor):
        if tensor.untyped_storage().data_ptr() in own:
            return tensor
        # Per layer: a layer's tensors are freed after its forward, and the next may reuse their memory.
        packed_storages.append((index, tensor.untyped_storage().data_ptr()))
        return Copied(tensor)

    monkeypatch.setattr(parking.ActivationParking, "_park", park)
    monkeypatch.setattr(parking.ActivationParking, "_unpark", lambda self, index, packed:
                        packed.copy if isinstance(packed, Copied) else packed)
    model_dir = checkpoints("llama")
    ids = random_ids(4, 24, seed=3)
    kept, *_ = parked_run(model_dir, torch.device("cpu"), torch.float32, ids, gradient_checkpointing=False)
    grads, *_ = parked_run(model_dir, torch.device("cpu"), torch.float32, ids, gradient_checkpointing=False,
                           parked_layers=COMMON["num_hidden_layers"])
    assert packed_storages and len(set(packed_storages)) == len(packed_storages)
    for name, grad in kept.items():
        assert torch.equal(grads[name], grad), name


def test_parked_layers_are_checked(checkpoints):
    model_dir = checkpoints("llama")
    cfg = run_config(model_dir)
    cfg.model.gradient_checkpointing, cfg.model.checkpoint_layers, cfg.model.parked_layers = True, "1", 5
    assert native_model(model_dir, cfg).model.parked_layers == 1  # all the layers not recomputed
    cfg.model.parked_layers = -1
    with pytest.raises(ConfigError, match="0 or more"):
        cfg.validate()
    cfg.model.parked_layers, cfg.model.compile = 1, True
    with pytest.raises(ConfigError, match="model.compile=false"):
        cfg.validate()


@pytest.mark.gpu
def test_gpu_parked_checkpoints_leave_the_gpu_and_come_back_bit_for_bit(checkpoints, cuda):
    """Offloaded checkpoints (side-stream copies, parking.py): each layer's input waits in pinned host
    memory between forward and backward, the GPU holds less after forward, and the gradients are
    those of checkpoints kept on the GPU, bit for bit (the same bytes come back)."""
    model_dir = checkpoints("llama")
    ids = random_ids(8, 256, seed=3).to(cuda)
    kept, kept_bytes, _, _ = parked_run(model_dir, cuda, torch.bfloat16, ids, gradient_checkpointing=True)
    grads, parked_bytes, inputs, parked = parked_run(model_dir, cuda, torch.bfloat16, ids, gradient_checkpointing=True,
                                                     offload_checkpoints=True)
    for index, expected in enumerate(inputs):
        (host,) = parked[index]
        assert host.is_pinned() and torch.equal(host, expected.cpu()), index
    layer_input_bytes = ids.numel() * COMMON["hidden_size"] * 2
    # 1.75 of the 2 layers' inputs measured on an H100 (run after other GPU tests, whose backwards had
    # made both cuBLAS workspaces): the allocator's blocks differ between the runs.
    assert kept_bytes - parked_bytes >= (COMMON["num_hidden_layers"] - 1) * layer_input_bytes
    for name, grad in kept.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.gpu
@pytest.mark.parametrize("mlp_chunk", [None, 512])
def test_gpu_parked_layers_leave_the_gpu_and_come_back_bit_for_bit(checkpoints, cuda, mlp_chunk):
    """model.parked_layers: layers that are not recomputed keep what they save in pinned host memory
    (with MLP chunks: the chunks' inputs), the GPU holds less after forward than with the same layers
    kept, and the gradients are the same bits."""
    model_dir = checkpoints("llama")
    ids = random_ids(8, 256, seed=3).to(cuda)
    kept, kept_bytes, _, _ = parked_run(model_dir, cuda, torch.bfloat16, ids, mlp_chunk)
    grads, parked_bytes, _, parked = parked_run(model_dir, cuda, torch.bfloat16, ids, mlp_chunk,
                                                parked_layers=COMMON["num_hidden_layers"])
    host_bytes = 0
    for index, hosts in enumerate(parked):
        assert hosts and all(host.is_pinned() for host in hosts), index
        host_bytes += sum(host.numel() * host.element_size() for host in hosts)
    # Most parked bytes left the GPU: 0.79-0.90 of them measured on an H100 (the host copies count
    # views of one GPU block one by one, and the runs' allocator blocks differ).
    assert kept_bytes - parked_bytes >= 0.5 * host_bytes
    for name, grad in kept.items():
        assert torch.equal(grads[name], grad), name


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


def test_parked_layers_are_spread_among_recomputed_ones():
    """A parked layer's copies run behind recomputed layers' compute, not behind each other's; the
    last layer, whose backward comes first, recomputes; layers kept on the GPU come last."""
    from finetune.models.architectures import hf_config
    from finetune.models.native.model import Decoder, ModelArgs, torch_ops

    decoder = Decoder(ModelArgs.from_hf(hf_config("llama3-8b")), torch_ops(), torch.device("meta"))
    decoder.set_checkpointing(16, offload=True, parked=8)
    roles = decoder.layer_roles
    assert roles[24:] == ["keep"] * 8
    assert [i for i, role in enumerate(roles) if role == "park"] == [0, 3, 6, 9, 12, 15, 18, 21]
    decoder.set_checkpointing(20, parked=12)
    assert roles != decoder.layer_roles and decoder.layer_roles.count("park") == 12
    assert decoder.layer_roles[-1] == "recompute" and "park, park" not in ", ".join(decoder.layer_roles)
    decoder.set_checkpointing(0, parked=32)
    assert decoder.layer_roles == ["park"] * 32
    keeps = {linear.keep_dequantized for role, layer in zip(decoder.layer_roles, decoder.layers)
             for linear in layer.modules() if hasattr(linear, "keep_dequantized")}
    assert keeps == {False}  # only recomputed layers hand their weights to backward
