import pytest
import torch

pytest.importorskip("triton")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from finetune_kernels.reference import rmsnorm_reference  # noqa: E402
from finetune_kernels.rmsnorm import rmsnorm  # noqa: E402

EPS = 1e-6
SHAPES = [(7, 67), (2, 3, 130), (5, 3)]
# (input dtype, weight dtype): bf16 throughout, and the fp32 weights that kbit training keeps.
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _tolerances(dtype):
    if dtype == torch.float32:
        # The kernel's row sum runs in a different order than torch's: a few fp32 ulps.
        return {"rtol": 1e-5, "atol": 1e-6}
    # Two bf16 roundings (the normalized value, then the output), and the CPU interpreter
    # truncates instead of rounding to nearest, so each can cost a full ulp, 2^-7 relative.
    return {"rtol": 2**-6, "atol": 1e-6}


def _inputs(shape, dtype, weight_dtype, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(weight_dtype).requires_grad_()
    return x, weight


def _assert_grads_close(actual, expected, dtype):
    for got, want in zip(actual, expected):
        # grad_x = r * (dn - n * mean(dn * n)) cancels, and dw sums over rows, so elementwise
        # relative bounds do not hold: compare against the gradient's scale. fp32: a few ulps of
        # reordered sums; bf16: the reference rounds dy * w to bf16 (2^-8) before the same formula.
        scale = want.abs().max().item()
        rel = 1e-5 if dtype == torch.float32 else 2**-6
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS)
def test_matches_reference(shape, dtype, weight_dtype):
    x, weight = _inputs(shape, dtype, weight_dtype)
    out = rmsnorm(x, weight, EPS)
    expected = rmsnorm_reference(x, weight, EPS)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **_tolerances(dtype))

    grad_out = torch.randn_like(out)
    _assert_grads_close(
        torch.autograd.grad(out, (x, weight), grad_out),
        torch.autograd.grad(expected, (x, weight), grad_out),
        dtype,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS)
def test_matches_transformers_llama_rmsnorm(shape, dtype, weight_dtype):
    x, weight = _inputs(shape, dtype, weight_dtype)
    module = LlamaRMSNorm(shape[-1], eps=EPS).to(weight_dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    out = rmsnorm(x, weight, EPS)
    expected = module(x)
    torch.testing.assert_close(out, expected, **_tolerances(dtype))

    grad_out = torch.randn_like(out)
    _assert_grads_close(
        torch.autograd.grad(out, (x, weight), grad_out),
        torch.autograd.grad(expected, (x, module.weight), grad_out),
        dtype,
    )


def test_strided_rows():
    torch.manual_seed(0)
    wide = torch.randn(9, 80, requires_grad=True)
    weight = torch.randn(67)
    x = wide[:, :67]
    out = rmsnorm(x, weight, EPS)
    torch.testing.assert_close(out, rmsnorm_reference(x, weight, EPS), **_tolerances(torch.float32))
    out.sum().backward()
    assert wide.grad[:, 67:].eq(0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_size", [4096, 5120 + 3])
def test_matches_reference_cuda(cuda, hidden_size):
    x, weight = _inputs((4, 511, hidden_size), torch.bfloat16, torch.bfloat16)
    x, weight = x.detach().to(cuda).requires_grad_(), weight.detach().to(cuda).requires_grad_()
    out = rmsnorm(x, weight, EPS)
    expected = rmsnorm_reference(x, weight, EPS)
    torch.testing.assert_close(out, expected, **_tolerances(torch.bfloat16))
    grad_out = torch.randn_like(out)
    _assert_grads_close(
        torch.autograd.grad(out, (x, weight), grad_out),
        torch.autograd.grad(expected, (x, weight), grad_out),
        torch.bfloat16,
    )
