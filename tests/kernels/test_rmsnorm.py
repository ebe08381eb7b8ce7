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


def _inputs(shape, dtype, weight_dtype, device, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(device, weight_dtype).requires_grad_()
    return x, weight


def _assert_grads_close(actual, expected, x, weight, grad_out):
    """Bound each gradient's error by the size of the terms it sums, since the sums may cancel."""
    x32, weight32, grad_out32 = x.detach().float(), weight.detach().float(), grad_out.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    normalized = (x32 * rstd).abs()
    grad_normalized = (grad_out32 * weight32).abs()
    # dx = r * (dn - n * mean(dn * n))  and  dw = sum over rows of dy * n.
    x_scale = rstd * (grad_normalized + normalized * (grad_normalized * normalized).mean(-1, keepdim=True))
    weight_scale = (grad_out32.abs() * normalized).reshape(-1, x.shape[-1]).sum(0)
    # fp32: sums reordered across rows and columns, a few ulps each (1e-5 of the terms' size).
    # bf16: up to four roundings of at most 2^-7 each (both outputs, the reference's bf16 product
    # dy * w and its bf16 row sum for dw), so 2^-5 of the terms' size.
    rel = 1e-5 if x.dtype == torch.float32 else 2**-5
    for got, want, scale in zip(actual, expected, (x_scale, weight_scale)):
        assert ((got.float() - want.float()).abs() <= rel * scale).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS)
def test_matches_reference(device, shape, dtype, weight_dtype):
    x, weight = _inputs(shape, dtype, weight_dtype, device)
    out = rmsnorm(x, weight, EPS)
    expected = rmsnorm_reference(x, weight, EPS)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **_tolerances(dtype))

    grad_out = torch.randn_like(out)
    _assert_grads_close(
        torch.autograd.grad(out, (x, weight), grad_out),
        torch.autograd.grad(expected, (x, weight), grad_out),
        x, weight, grad_out,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS)
def test_matches_transformers_llama_rmsnorm(device, shape, dtype, weight_dtype):
    x, weight = _inputs(shape, dtype, weight_dtype, device)
    module = LlamaRMSNorm(shape[-1], eps=EPS).to(device, weight_dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    out = rmsnorm(x, weight, EPS)
    expected = module(x)
    torch.testing.assert_close(out, expected, **_tolerances(dtype))

    grad_out = torch.randn_like(out)
    _assert_grads_close(
        torch.autograd.grad(out, (x, weight), grad_out),
        torch.autograd.grad(expected, (x, module.weight), grad_out),
        x, weight, grad_out,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS)
def test_a_frozen_weight_gets_no_gradient_and_the_same_input_gradient(device, shape, dtype, weight_dtype):
    """QLoRA's norms are frozen: the backward then skips the weight's partial sums, and dx is the
    trainable case's bit for bit (the same per-row arithmetic)."""
    x, weight = _inputs(shape, dtype, weight_dtype, device)
    grad_out = torch.randn(shape, device=device).to(torch.promote_types(dtype, weight_dtype))
    trained_dx, _ = torch.autograd.grad(rmsnorm(x, weight, EPS), (x, weight), grad_out)
    frozen = weight.detach()
    out = rmsnorm(x, frozen, EPS)
    (frozen_dx,) = torch.autograd.grad(out, (x,), grad_out)
    assert torch.equal(frozen_dx, trained_dx)
    out = rmsnorm(x, frozen, EPS)
    out.backward(grad_out)
    assert frozen.grad is None


def test_strided_rows(device):
    torch.manual_seed(0)
    wide = torch.randn(9, 80, device=device, requires_grad=True)
    weight = torch.randn(67, device=device)
    x = wide[:, :67]
    out = rmsnorm(x, weight, EPS)
    torch.testing.assert_close(out, rmsnorm_reference(x, weight, EPS), **_tolerances(torch.float32))
    out.sum().backward()
    assert wide.grad[:, 67:].eq(0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_size", [4096, 5120 + 3])
def test_matches_reference_cuda(cuda, hidden_size):
    x, weight = _inputs((4, 511, hidden_size), torch.bfloat16, torch.bfloat16, cuda)
    out = rmsnorm(x, weight, EPS)
    expected = rmsnorm_reference(x, weight, EPS)
    torch.testing.assert_close(out, expected, **_tolerances(torch.bfloat16))
    grad_out = torch.randn_like(out)
    _assert_grads_close(
        torch.autograd.grad(out, (x, weight), grad_out),
        torch.autograd.grad(expected, (x, weight), grad_out),
        x, weight, grad_out,
    )
