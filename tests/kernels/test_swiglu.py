import pytest
import torch

pytest.importorskip("triton")
from transformers.activations import ACT2FN  # noqa: E402

from finetune_kernels.reference import swiglu_reference  # noqa: E402
from finetune_kernels.swiglu import swiglu  # noqa: E402

# The last dim is [gate | up]: odd widths (67, 1025) leave a partial block in each half.
SHAPES = [(7, 2 * 67), (2, 3, 2 * 130), (1, 1, 2 * 1025)]
DTYPES = [torch.float32, torch.bfloat16]


def _tolerances(dtype):
    if dtype == torch.float32:
        # Triton's sigmoid and torch's differ by a few fp32 ulps.
        return {"rtol": 1e-5, "atol": 1e-6}
    # Both sides compute in fp32 and round once to bf16; the CPU interpreter truncates instead,
    # and fp32 differences may straddle a rounding boundary: 2 ulps, 2^-6 relative.
    return {"rtol": 2**-6, "atol": 1e-5}


def _inputs(shape, dtype, device, seed=0):
    torch.manual_seed(seed)
    gate_up = torch.randn(shape)
    gate_up[..., : shape[-1] // 2] *= 3  # gates spread over silu's curved part
    return gate_up.to(device, dtype).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, shape, dtype):
    gate_up = _inputs(shape, dtype, device)
    out = swiglu(gate_up)
    expected = swiglu_reference(gate_up)
    torch.testing.assert_close(out, expected, **_tolerances(dtype))

    grad_out = torch.randn_like(out)
    got, = torch.autograd.grad(out, gate_up, grad_out)
    want, = torch.autograd.grad(expected, gate_up, grad_out)
    torch.testing.assert_close(got, want, **_tolerances(dtype))


@pytest.mark.parametrize("shape", SHAPES)
def test_overwriting_backward_leaves_the_gradient_in_the_inputs_memory(device, shape):
    leaf = _inputs(shape, torch.bfloat16, device)
    gate_up = leaf * 1  # a projection's output: not the leaf, whose values the reference still needs
    out = swiglu(gate_up, overwrite_in_backward=True)
    grad_out = torch.randn_like(out)
    got, = torch.autograd.grad(out, gate_up, grad_out)
    assert got.data_ptr() == gate_up.data_ptr()  # no second (..., 2F) tensor
    expected = swiglu_reference(leaf)
    want, = torch.autograd.grad(expected, leaf, grad_out)
    # The same kernel arithmetic as the out-of-place backward, read before written: equal bit for bit.
    plain, = torch.autograd.grad(swiglu(leaf * 1), leaf, grad_out)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    torch.testing.assert_close(got, want, **_tolerances(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_transformers_llama_mlp_activation(device, dtype):
    gate_up = _inputs((7, 2 * 67), dtype, device)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = ACT2FN["silu"](gate) * up
    # In bf16 transformers rounds silu(g) before the product: one more ulp on its side.
    tolerances = _tolerances(torch.float32) if dtype == torch.float32 else {"rtol": 2**-5, "atol": 1e-5}
    torch.testing.assert_close(swiglu(gate_up), expected, **tolerances)


@pytest.mark.gpu
def test_matches_reference_cuda(cuda):
    gate_up = _inputs((4, 1021, 2 * 11008), torch.bfloat16, cuda)
    out = swiglu(gate_up)
    expected = swiglu_reference(gate_up)
    grad_out = torch.randn_like(out)
    for got, want in zip(
        (out, *torch.autograd.grad(out, gate_up, grad_out)),
        (expected, *torch.autograd.grad(expected, gate_up, grad_out)),
    ):
        torch.testing.assert_close(got, want, **_tolerances(torch.bfloat16))
