"""LoRA over NF4: exact gradients, nothing large saved for backward, peft's init and scaling."""

import math

import pytest
import torch
from torch import nn

from finetune.config import ConfigError
from finetune.lora import QLoRALinear, dequantize_rows, project, select_targets
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


def padded_rank(layers) -> int:
    """The group's summed rank as it computes: zero ranks pad it to a multiple of 8."""
    return -(-sum(layer.r for layer in layers) // 8) * 8


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


# in = 64 against the group's summed out. Where out >= in, the LoRA term rides along the base
# GEMM as extra columns ([x | xa] times [W | s B]); where out < in it is one addmm into y.
GROUPS = {
    "fold": (48, 16, 16),  # q/k/v-like, in < out
    "fold_alone": (64,),  # o_proj-like, in == out
    "no_fold": (16, 8, 8),  # in > out
    "no_fold_alone": (48,),  # down_proj-like, in > out
}
ADAPTED = {1: [(True,)], 3: [(True, True, True), (True, False, True), (False, True, False)]}
GROUP_CASES = [pytest.param(outs, adapted, id=f"{name}-{''.join('A' if a else '_' for a in adapted)}")
               for name, outs in GROUPS.items() for adapted in ADAPTED[len(outs)]]


def reference_group(layers, x, masks=()):
    """Plain autograd, layer by layer, on the dequantized weights (constants) and the adapters themselves."""
    masks = list(masks)
    outputs = []
    for layer in layers:
        weight = dequantize_bnb(layer.weight).to(x.dtype)
        y = x @ weight.T
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        if layer.lora_A is not None:
            xd = x * masks.pop(0) / (1 - layer.lora_dropout) if layer.lora_dropout else x
            y = y + layer.scaling * (xd @ layer.lora_A.T.to(x.dtype)) @ layer.lora_B.T.to(x.dtype)
        outputs.append(y)
    return torch.cat(outputs, -1)


def group_and_reference(layers, x, grad_y, dropout):
    """(y, grads) of project() and of reference_group() in float32, for x and every adapter."""
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B) if p is not None]
    inputs = [x, *params] if x.requires_grad else params
    torch.manual_seed(7)
    y = project(x, layers)
    grads = torch.autograd.grad(y, inputs, grad_y)
    torch.manual_seed(7)  # the group's draws: one mask per adapted layer, in layer order
    masks = [torch.rand_like(x) >= dropout for layer in layers if layer.lora_A is not None] if dropout else ()
    x_ref = x.detach().float().requires_grad_(x.requires_grad)
    y_ref = reference_group(layers, x_ref, masks)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params] if x.requires_grad else params, grad_y.float())
    return (y, grads), (y_ref, grads_ref)


@pytest.mark.parametrize("outs,adapted", GROUP_CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_group_gradients_match_plain_autograd(outs, adapted, dropout, bias):
    layers = make_group(outs, bias=bias, dropout=dropout, adapted=adapted)
    x = torch.randn(2, 5, IN, requires_grad=True)
    grad_y = torch.randn(2, 5, sum(outs))
    (y, grads), (y_ref, grads_ref) = group_and_reference(layers, x, grad_y, dropout)
    # fp32 on both sides, the same products summed in another order: a few ulps (1e-7 relative
    # each) of values up to about a hundred, well inside 1e-5.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outs", [GROUPS["fold"], GROUPS["no_fold"]], ids=["fold", "no_fold"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_group_with_fp32_adapters_matches_fp32_autograd(outs, dropout):
    """Training's case: bf16 weights, activations and LoRA products, fp32 parameters and gradients."""
    layers = make_group(outs, bias=True, dropout=dropout, adapted=(True, False, True),
                        storage_dtype=torch.bfloat16)
    for layer in layers:
        layer.bias = nn.Parameter(layer.bias.to(torch.bfloat16), requires_grad=False)
    x = torch.randn(2, 5, IN, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(2, 5, sum(outs), dtype=torch.bfloat16)
    (y, grads), (y_ref, grads_ref) = group_and_reference(layers, x, grad_y, dropout)
    assert y.dtype == grads[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[1:])
    # The reference sees the same bf16 inputs and weights but keeps every product in fp32; the
    # group rounds xa, s B, y and each gradient GEMM's result to bf16, 2^-9 relative each. A few
    # such roundings compound to about 2 * 2^-9 in norm (measured: at most 0.0045); entries that
    # cancel to near zero have no useful elementwise bound, so the check is on the whole tensor,
    # with 2^-7 leaving a margin of about two.
    for got, want in zip([y, *grads], [y_ref, *grads_ref]):
        assert (got.float() - want).norm() <= 2**-7 * want.norm()


@pytest.mark.parametrize("outs", [GROUPS["fold"], GROUPS["no_fold"]], ids=["fold", "no_fold"])
def test_input_without_gradient_still_trains_the_adapters(outs):
    """The first layer's input needs no gradient: backward skips dx (and the weight) but not dA, dB."""
    layers = make_group(outs, bias=False, dropout=0.0, adapted=(True, False, True))
    x = torch.randn(2, 5, IN)
    grad_y = torch.randn(2, 5, sum(outs))
    (_, grads), (_, grads_ref) = group_and_reference(layers, x, grad_y, 0.0)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, summation order only


@pytest.mark.parametrize("outs,adapted", [(GROUPS["no_fold_alone"], (True,)), (GROUPS["no_fold"], (True, False, True)),
                                          (GROUPS["no_fold_alone"], (False,)), (GROUPS["fold"], (True, True, True))],
                         ids=["no_fold_alone", "no_fold", "no_fold_frozen", "fold"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_reused_input_takes_its_gradient_with_the_same_bits(outs, adapted, dropout):
    """reuse_input: where the input is wider than the output (down_proj) and saved, backward writes
    dx over it (one input-sized tensor less at the MLP's backward peak), after A's gradients have
    read it; dx and every adapter gradient equal the plain backward's bit for bit. A group that
    folds (dx copied out of dy [W | S]) or saves no input (no adapter) computes as before."""
    layers = make_group(outs, bias=True, dropout=dropout, adapted=adapted)
    leaf = torch.randn(2, 5, IN, requires_grad=True)
    grad_y = torch.randn(2, 5, sum(outs))
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B) if p is not None]
    results = []
    for reuse in (False, True):
        x = leaf * 1  # a computed input, as the SwiGLU output is
        seen = []
        x.register_hook(lambda grad: seen.append(grad.data_ptr()))
        torch.manual_seed(7)
        y = project(x, layers, reuse_input=reuse)
        results.append(torch.autograd.grad(y, [leaf, *params], grad_y))
        results.append(seen[0] == x.data_ptr())
    plain, plain_reused, grads, reused = results
    writes_over = any(adapted) and IN > sum(outs)
    assert (plain_reused, reused) == (False, writes_over)
    for got, want in zip(grads, plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("outs", [GROUPS["fold"], GROUPS["no_fold"]], ids=["fold", "no_fold"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_kept_weight_gives_the_same_gradients(outs, dropout):
    """keep_dequantized hands forward's weight to backward instead of rebuilding it: identical bits."""
    layers = make_group(outs, bias=True, dropout=dropout, adapted=(True, False, True))
    x = torch.randn(2, 5, IN, requires_grad=True)
    grad_y = torch.randn(2, 5, sum(outs))
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B) if p is not None]
    results = []
    for keep in (False, True):
        for layer in layers:
            layer.keep_dequantized = keep
        torch.manual_seed(7)
        outputs = []
        saved = saved_for_backward(lambda: outputs.append(project(x, layers)))
        results.append((outputs[0], torch.autograd.grad(outputs[0], [x, *params], grad_y), saved))
    (y, grads, saved), (y_kept, grads_kept, saved_kept) = results
    assert torch.equal(y, y_kept)
    for got, want in zip(grads_kept, grads):
        assert torch.equal(got, want)
    R = padded_rank(layers)
    weight_shape = (sum(outs), IN + R) if IN <= sum(outs) else (sum(outs), IN)  # [W | s B] or W
    assert [tuple(t.shape) for t in saved_kept if t is not None] == \
        [weight_shape] + [tuple(t.shape) for t in saved if t is not None]


@pytest.mark.parametrize("outs", [GROUPS["fold"], GROUPS["no_fold"]], ids=["fold", "no_fold"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("adapted", [(True, True, True), (True, False, True)])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_group_equals_the_layers_one_by_one(outs, dropout, adapted, storage_dtype):
    """One GEMM for q/k/v-like layers computes what three calls compute, values and gradients."""
    layers = make_group(outs, bias=True, dropout=dropout, adapted=adapted, storage_dtype=storage_dtype)
    for layer in layers:
        layer.bias = nn.Parameter(layer.bias.to(storage_dtype), requires_grad=False)
    # Computing in the storage dtype: bf16 compute is what training on a GPU does.
    x = torch.randn(2, 5, IN, dtype=storage_dtype, requires_grad=True)
    grad_y = torch.randn(2, 5, sum(outs), dtype=storage_dtype)
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


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_weights_fill_the_first_columns_of_a_wider_matrix(storage_dtype):
    """[W | s B] is built in place: each weight lands in its row block, the other columns untouched."""
    layers = make_group((48, 16, 16), bias=False, dropout=0.0, adapted=(False, False, False),
                        storage_dtype=storage_dtype)
    wide = torch.full((80, IN + 5), float("nan"), dtype=torch.bfloat16)
    # bf16 storage dequantizes straight into the view; fp32 storage is dequantized, then copied.
    dequantize_rows(layers, torch.bfloat16, out=wide[:, :IN])
    expected = torch.cat([dequantize_bnb(layer.weight).to(torch.bfloat16) for layer in layers])
    assert torch.equal(wide[:, :IN], expected)
    assert bool(wide[:, IN:].isnan().all())


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


@pytest.mark.parametrize("outs", [(OUT,), GROUPS["fold"], GROUPS["fold_alone"], GROUPS["no_fold"]],
                         ids=["no_fold_alone", "fold", "fold_alone", "no_fold"])
def test_backward_saves_input_and_adapter_never_the_dequantized_weight(outs):
    layers = make_group(outs, bias=True, dropout=0.0, adapted=(True, False, True) if len(outs) == 3 else (True,))
    R = padded_rank(layers)
    x = torch.randn(3, 7, IN, requires_grad=True)
    saved = [t for t in saved_for_backward(lambda: project(x, layers)) if t is not None]
    shapes = sorted(tuple(t.shape) for t in saved)
    # x, xa = x A^T (tokens x R), the stacked A and s B (sum out x R), R padded to a multiple of
    # 8: neither W (sum out x in) nor [W | s B] nor [x | xa]; W is dequantized again in backward.
    assert shapes == sorted([(3, 7, IN), (3 * 7, R), (R, IN), (sum(outs), R)])
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
