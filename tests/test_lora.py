"""LoRA over NF4: exact gradients, nothing large saved for backward, peft's init and scaling."""

import math

import pytest
import torch
from torch import nn

from finetune.config import ConfigError
from finetune.lora import QLoRALinear, project, select_targets
from finetune.quant import QuantizedWeight, dequantize_bnb

IN, OUT, R = 64, 48, 4


def make_layer(bias: bool = True, dropout: float = 0.0, use_rslora: bool = False, lora: bool = True) -> QLoRALinear:
    torch.manual_seed(0)
    layer = QLoRALinear(IN, OUT, bias, dequantize_bnb)
    layer.weight = QuantizedWeight.quantize(torch.randn(OUT, IN) * 0.1)
    if bias:
        layer.bias = nn.Parameter(torch.randn(OUT), requires_grad=False)
    if lora:
        layer.add_lora(R, lora_alpha=8.0, lora_dropout=dropout, use_rslora=use_rslora, device=torch.device("cpu"))
        with torch.no_grad():
            layer.lora_B.normal_()  # B starts at zero; a trained adapter does not
    return layer


def reference_forward(layer: QLoRALinear, x, A, B, mask=None):
    """Plain autograd on the dequantized weight, held as a constant."""
    weight = dequantize_bnb(layer.weight)
    xd = x if mask is None else x * mask / (1 - layer.lora_dropout)
    return x @ weight.T + layer.bias + layer.scaling * (xd @ A.T) @ B.T


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_match_plain_autograd(dropout):
    layer = make_layer(dropout=dropout).train()
    x = torch.randn(2, 5, IN, requires_grad=True)
    grad_y = torch.randn(2, 5, OUT)
    torch.manual_seed(7)
    y = layer(x)
    y.backward(grad_y)

    x_ref = x.detach().clone().requires_grad_()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    torch.manual_seed(7)
    mask = torch.rand_like(x) >= dropout if dropout else None  # the same draw as the layer's
    y_ref = reference_forward(layer, x_ref, A, B, mask)
    y_ref.backward(grad_y)

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)


def make_group(outs, bias: bool, dropout: float, adapted, storage_dtype=torch.float32) -> list[QLoRALinear]:
    """Layers reading one input, like q/k/v; `adapted` says which carry an adapter."""
    torch.manual_seed(1)
    layers = []
    for out, lora in zip(outs, adapted):
        layer = QLoRALinear(IN, out, bias, dequantize_bnb)
        layer.weight = QuantizedWeight.quantize((torch.randn(out, IN) * 0.1).to(storage_dtype))
        if bias:
            layer.bias = nn.Parameter(torch.randn(out), requires_grad=False)
        if lora:
            layer.add_lora(R, lora_alpha=8.0, lora_dropout=dropout, use_rslora=False, device=torch.device("cpu"))
            with torch.no_grad():
                layer.lora_B.normal_()
        layers.append(layer.train())
    return layers


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("adapted", [(True, True, True), (True, False, True)])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_group_equals_the_layers_one_by_one(dropout, adapted, storage_dtype):
    """One GEMM for q/k/v-like layers computes what three calls compute, values and gradients."""
    layers = make_group((48, 16, 16), bias=True, dropout=dropout, adapted=adapted, storage_dtype=storage_dtype)
    for layer in layers:
        layer.bias = nn.Parameter(layer.bias.to(storage_dtype), requires_grad=False)
    # Computing in the storage dtype: bf16 compute is what training on a GPU does.
    x = torch.randn(2, 5, IN, dtype=storage_dtype, requires_grad=True)
    grad_y = torch.randn(2, 5, 80, dtype=storage_dtype)
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B) if p is not None]

    torch.manual_seed(7)  # the same dropout draws, in layer order, on both sides
    y = project(x, layers)
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    torch.manual_seed(7)
    y_one_by_one = torch.cat([layer(x) for layer in layers], -1)
    grads_one_by_one = torch.autograd.grad(y_one_by_one, [x, *params], grad_y)

    # Same products, summed in another order inside the stacked GEMMs: rounding only (fp32: a few
    # ulps; bf16: 8 bits of mantissa, so about 2^-7 relative, more where terms cancel).
    tolerance = dict(rtol=1e-5, atol=1e-5) if storage_dtype == torch.float32 else dict(rtol=2**-6, atol=2**-5)
    torch.testing.assert_close(y, y_one_by_one, **tolerance)
    for got, want in zip(grads, grads_one_by_one):
        torch.testing.assert_close(got.to(want.dtype), want, **tolerance)


def test_group_split_feeds_one_gradient_buffer():
    """torch.split's backward concatenates: a consumer of some outputs only still gets zeros for the rest."""
    layers = make_group((48, 16, 16), bias=False, dropout=0.0, adapted=(True, True, True))
    x = torch.randn(3, IN, requires_grad=True)
    q, k, v = project(x, layers).split([48, 16, 16], -1)
    (q.sum() + v.sum()).backward()
    assert layers[1].lora_B.grad.abs().sum() == 0 and layers[2].lora_B.grad.abs().sum() > 0


def saved_for_backward(fn) -> list[torch.Tensor]:
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def test_backward_saves_input_and_adapter_never_the_dequantized_weight():
    layer = make_layer().train()
    x = torch.randn(3, 7, IN, requires_grad=True)
    saved = [t for t in saved_for_backward(lambda: layer(x)) if t is not None]
    shapes = sorted(tuple(t.shape) for t in saved)
    # x, xa = x A^T (tokens x r), A, B: the (OUT, IN) weight is dequantized again in backward.
    assert shapes == sorted([(3, 7, IN), (3 * 7, R), (R, IN), (OUT, R)])
    assert saved[0] is x  # the caller's tensor itself, no copy


def test_frozen_layer_without_adapter_saves_nothing_and_still_passes_gradients():
    layer = make_layer(lora=False)
    x = torch.randn(2, 3, IN, requires_grad=True)
    assert saved_for_backward(lambda: layer(x)) == []
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, dequantize_bnb(layer.weight).sum(0).expand(2, 3, IN))


def test_bf16_compute_keeps_fp32_adapter_and_fp32_gradients():
    layer = make_layer().train()
    layer.bias = nn.Parameter(layer.bias.to(torch.bfloat16), requires_grad=False)
    x = torch.randn(2, 4, IN, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_init_and_scaling_follow_peft():
    layer = make_layer(lora=False)
    torch.manual_seed(3)
    layer.add_lora(R, lora_alpha=8.0, lora_dropout=0.0, use_rslora=False, device=torch.device("cpu"))
    torch.manual_seed(3)
    expected_A = nn.init.kaiming_uniform_(torch.empty(R, IN), a=math.sqrt(5))
    assert torch.equal(layer.lora_A, expected_A) and torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == 8.0 / R
    assert make_layer(use_rslora=True).scaling == 8.0 / math.sqrt(R)


def test_targets_are_matched_like_peft():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    assert select_targets(names, "all-linear") == names
    assert select_targets(names, ["q_proj", "up_proj"]) == [names[0], names[2]]
    assert select_targets(names, r".*self_attn\.(q|v)_proj") == names[:2]
    with pytest.raises(ConfigError, match="qproj"):
        select_targets(names, ["qproj"])
    with pytest.raises(ConfigError, match="matches no linear layer"):
        select_targets(names, r"lm_head")
