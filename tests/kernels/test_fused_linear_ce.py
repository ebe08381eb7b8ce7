import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from finetune_kernels.fused_linear_ce import fused_linear_cross_entropy  # noqa: E402
from finetune_kernels.reference import linear_cross_entropy_reference  # noqa: E402

# (tokens, hidden, vocab). 5000 spans two 4096-wide vocab blocks of the online softmax.
SHAPES = [(13, 67, 130), (5, 8, 5000)]
DTYPES = [torch.float32, torch.bfloat16]
# (reduction, num_items_in_batch)
REDUCTIONS = [("mean", None), ("sum", None), ("mean", 23)]


def _inputs(tokens, hidden, vocab, dtype, device, seed=0, ignored=(1, 4)):
    torch.manual_seed(seed)
    x = torch.randn(tokens, hidden).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden) / hidden**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    labels[[i for i in ignored if i < tokens]] = -100
    return x, weight, labels.to(device)


def _assert_loss_close(got, want, dtype):
    # fp32: the kernel's online log-sum-exp reorders the sums, a few ulps. bf16: the chunked and
    # the full-width matmul may round a logit differently by one bf16 ulp (2^-8 relative).
    rtol = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)


def _assert_grads_close(got_grads, want_grads, dtype):
    for got, want in zip(got_grads, want_grads):
        # Gradients are matmuls of (softmax - onehot) that cancel, so compare against their
        # scale. fp32: reordered sums, 1e-5. bf16: the gradient of the logits is rounded to bf16
        # on both sides before a bf16 matmul, and dW is summed over chunks: a few ulps, 2^-6.
        rel = 1e-5 if dtype == torch.float32 else 2**-6
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,num_items_in_batch", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matches_torch_cross_entropy(device, shape, dtype, reduction, num_items_in_batch, chunk_size):
    x, weight, labels = _inputs(*shape, dtype, device)
    loss = fused_linear_cross_entropy(
        x, weight, labels, reduction=reduction, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size
    )
    expected = linear_cross_entropy_reference(
        x, weight, labels, reduction=reduction, num_items_in_batch=num_items_in_batch
    )
    assert loss.dtype == torch.float32
    _assert_loss_close(loss, expected, dtype)
    # An upstream gradient other than 1, as a loss scale or averaging would give.
    _assert_grads_close(
        torch.autograd.grad(3 * loss, (x, weight)), torch.autograd.grad(3 * expected, (x, weight)), dtype
    )


def test_frozen_weight_gets_no_gradient(device):
    x, weight, labels = _inputs(13, 67, 130, torch.float32, device)
    weight.requires_grad_(False)
    fused_linear_cross_entropy(x.reshape(1, 13, 67), weight, labels.reshape(1, 13)).backward()
    expected_grad_x = torch.autograd.grad(linear_cross_entropy_reference(x, weight, labels), x)[0]
    assert weight.grad is None
    _assert_grads_close([x.grad.reshape(13, 67)], [expected_grad_x], torch.float32)


def test_gradient_accumulation_with_num_items_in_batch(device):
    x, weight, labels = _inputs(13, 67, 130, torch.float32, device)
    full_batch = F.cross_entropy((x @ weight.T).float(), labels, ignore_index=-100)
    num_items = int((labels != -100).sum())
    micro_batches = [slice(0, 6), slice(6, 13)]
    accumulated = sum(
        fused_linear_cross_entropy(x[part], weight, labels[part], num_items_in_batch=num_items)
        for part in micro_batches
    )
    _assert_loss_close(accumulated, full_batch, torch.float32)
    _assert_grads_close(
        torch.autograd.grad(accumulated, (x, weight)), torch.autograd.grad(full_batch, (x, weight)), torch.float32
    )


def test_all_tokens_ignored(device):
    x, weight, labels = _inputs(5, 8, 33, torch.float32, device, ignored=range(5))
    loss = fused_linear_cross_entropy(x, weight, labels, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad.eq(0).all() and weight.grad.eq(0).all()
    # Like torch, a mean over no tokens is 0 / 0.
    assert fused_linear_cross_entropy(x, weight, labels).isnan()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_per_token_losses_match_torch_cross_entropy(device, shape, dtype, chunk_size):
    x, weight, labels = _inputs(*shape, dtype, device)
    losses = fused_linear_cross_entropy(x, weight, labels, reduction="none", chunk_size=chunk_size)
    expected = F.cross_entropy((x @ weight.T).float(), labels, ignore_index=-100, reduction="none")
    assert losses.dtype == torch.float32 and losses.shape == labels.shape
    _assert_loss_close(losses, expected, dtype)
    assert losses[1].item() == 0.0
    # A different upstream gradient per token, as per-sequence sums weighted by a loss would give.
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(device)
    _assert_grads_close(torch.autograd.grad((losses * upstream).sum(), (x, weight)),
                        torch.autograd.grad((expected * upstream).sum(), (x, weight)), dtype)


def test_per_token_losses_keep_the_labels_shape_and_match_the_reference(device):
    x, weight, labels = _inputs(12, 67, 130, torch.float32, device)
    x, labels = x.detach().reshape(3, 4, 67).requires_grad_(), labels.reshape(3, 4)
    per_row = fused_linear_cross_entropy(x, weight, labels, reduction="none").sum(-1)  # (3,)
    expected = linear_cross_entropy_reference(x, weight, labels, reduction="none").sum(-1)
    assert per_row.shape == (3,)
    _assert_loss_close(per_row, expected, torch.float32)
    upstream = torch.tensor([1.0, -2.0, 0.5], device=device)
    _assert_grads_close(torch.autograd.grad(per_row @ upstream, (x, weight)),
                        torch.autograd.grad(expected @ upstream, (x, weight)), torch.float32)
    with torch.no_grad():  # the reference log-probs of preference training: no gradient buffers
        _assert_loss_close(fused_linear_cross_entropy(x, weight, labels, reduction="none").sum(-1), expected,
                           torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction,num_items_in_batch", [*REDUCTIONS, ("none", None)])
def test_matches_torch_cross_entropy_cuda(cuda, reduction, num_items_in_batch):
    x, weight, labels = _inputs(2047, 1024, 32003, torch.bfloat16, cuda, ignored=range(0, 2047, 7))
    loss = fused_linear_cross_entropy(x, weight, labels, reduction=reduction, num_items_in_batch=num_items_in_batch)
    expected = linear_cross_entropy_reference(
        x, weight, labels, reduction=reduction, num_items_in_batch=num_items_in_batch
    )
    _assert_loss_close(loss, expected, torch.bfloat16)
    if reduction == "none":
        loss, expected = loss.sum(), expected.sum()
    _assert_grads_close(
        torch.autograd.grad(loss, (x, weight)), torch.autograd.grad(expected, (x, weight)), torch.bfloat16
    )
