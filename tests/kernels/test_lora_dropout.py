import pytest
import torch

pytest.importorskip("triton")
from test_lora import make_group, reference_group  # noqa: E402

from finetune.lora import project  # noqa: E402
from finetune_kernels import lora_dropout  # noqa: E402
from finetune_kernels.reference import lora_dropout_reference  # noqa: E402

# Odd sizes: partial row blocks, K not a multiple of 4 (its last column strip is short), ranks
# below tl.dot's 16 and between powers of two.
SHAPES = [(37, 45, 5), (70, 130, 16), (5, 7, 3)]


def _tolerances(dtype):
    """Against a float32 reference on the same inputs."""
    if dtype == torch.float32:
        # fp32 products (IEEE dot, no TF32) summed in another order: a few ulps of sums of ~100 terms.
        return {"rtol": 1e-5, "atol": 1e-5}
    # The kernels multiply bf16 inputs exactly and accumulate in fp32, like the reference, then
    # convert the result to bf16 once: at most one ulp (Triton's CPU interpreter truncates rather
    # than rounds), 2^-7 relative; 2^-6 leaves a margin of two. The absolute part covers fp32
    # reordering of sums near zero.
    return {"rtol": 2**-6, "atol": 1e-4}


def test_masks_keep_one_minus_p_and_differ_by_seed(device):
    p = 0.25
    a, b = lora_dropout.keep_mask(257, 129, 5, p, device), lora_dropout.keep_mask(257, 129, 6, p, device)
    # 33k Bernoulli(0.75) draws: the mean's standard deviation is 0.0024; 0.01 is four of them.
    assert abs(a.float().mean().item() - (1 - p)) < 0.01
    # Independent masks agree on p^2 + (1-p)^2 = 62.5% of elements.
    assert abs((a == b).float().mean().item() - 0.625) < 0.01
    assert torch.equal(a, lora_dropout.keep_mask(257, 129, 5, p, device))


@pytest.mark.parametrize("N,K,rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_reference(device, N, K, rank, dtype):
    torch.manual_seed(0)
    layers, p, seed = 3, 0.3, 1234
    x = torch.randn(N, K, device=device).to(dtype)
    lora_A = torch.randn(layers * rank, K, device=device).to(dtype)
    keeps = [lora_dropout.keep_mask(N, K, seed + l, p, device) for l in range(layers)]
    # Each layer's xa written into its columns of one wider matrix, as the LoRA group does.
    xa = torch.zeros(N, layers * rank + 3, device=device, dtype=dtype)
    lora_dropout.dropout_down(x, lora_A, rank, seed, p, out=xa)

    x_ref = x.float().requires_grad_()
    A_ref = [lora_A[l * rank:(l + 1) * rank].float().requires_grad_() for l in range(layers)]
    xa_ref = torch.cat([lora_dropout_reference(x_ref, A, keep, p) for A, keep in zip(A_ref, keeps)], 1)
    torch.testing.assert_close(xa[:, :layers * rank].float(), xa_ref.detach(), **_tolerances(dtype))
    assert not xa[:, layers * rank:].any()

    grad_xa = torch.randn(N, layers * rank, device=device).to(dtype)
    grad_x = torch.randn(N, K + 2, device=device).to(dtype)[:, :K]  # a column slice, as dy Wc gives
    start = grad_x.float().clone()  # .float() of an fp32 tensor is the tensor itself
    lora_dropout.dropout_grad_x(grad_x, grad_xa, lora_A, rank, seed, p)
    want_x, *want_A = torch.autograd.grad(xa_ref, [x_ref, *A_ref], grad_xa.float())
    torch.testing.assert_close(grad_x.float(), start + want_x, **_tolerances(dtype))
    got = lora_dropout.dropout_grad_a(grad_xa, x, rank, seed, p)
    assert got.dtype == torch.float32  # fp32 gradients for fp32 adapters, whatever the compute dtype
    # Exact products accumulated in fp32 on both sides, in another order.
    torch.testing.assert_close(got, torch.cat(want_A), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k_splits", [1, 2, 3])
def test_forward_splits_of_k_sum_to_the_same_result(device, k_splits):
    """K split over programs (as on a card with few rows to fill it) adds up the partial sums."""
    torch.manual_seed(0)
    N, K, rank, layers, p, seed = 37, 300, 5, 2, 0.3, 99  # 75 groups of 4 columns: 3 column tiles, the last short
    x, lora_A = torch.randn(N, K, device=device), torch.randn(layers * rank, K, device=device)
    xa = torch.zeros(N, layers * rank, device=device)
    lora_dropout.dropout_down(x, lora_A, rank, seed, p, out=xa, k_splits=k_splits)
    keeps = [lora_dropout.keep_mask(N, K, seed + l, p, device) for l in range(layers)]
    want = torch.cat([lora_dropout_reference(x, lora_A[l * rank:(l + 1) * rank], keeps[l], p) for l in range(layers)], 1)
    # fp32 IEEE products, sums in another order (per split, then across): a few ulps of ~200-term sums.
    torch.testing.assert_close(xa, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outs", [(48, 16, 16), (16, 8, 8)], ids=["fold", "no_fold"])
def test_group_with_fused_dropout_matches_plain_autograd(device, outs):
    """The LoRA group's kernel path: the seed it draws, the masks it implies, plain autograd's gradients."""
    p = 0.3
    layers = [layer.to(device) for layer in make_group(outs, bias=True, dropout=p, adapted=(True, False, True))]
    for layer in layers:
        layer.fused_dropout = lora_dropout
    x = torch.randn(2, 5, layers[0].in_features, device=device, requires_grad=True)
    grad_y = torch.randn(2, 5, sum(outs), device=device)
    params = [t for layer in layers for t in (layer.lora_A, layer.lora_B) if t is not None]
    torch.manual_seed(7)
    y = project(x, layers)
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    torch.manual_seed(7)
    seed = int(torch.randint(2**62, ()))  # the group's one draw
    keeps = [lora_dropout.keep_mask(10, x.shape[-1], seed + l, p, x.device).view(2, 5, -1) for l in range(2)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_group(layers, x_ref, keeps)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], grad_y)
    # fp32 both sides, the same products in another order (see test_lora's group test).
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
