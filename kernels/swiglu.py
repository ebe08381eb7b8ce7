"""SwiGLU gating ``h = silu(g) * u`` in Triton, on the fused gate/up projection, computed in fp32.

The input is one row per token holding ``[g | u]`` side by side (``(..., 2F)``: the gate and up
projections come out of one GEMM), the output ``h`` is ``(..., F)``. With ``sigma = sigmoid(g)``
and ``silu(g) = g * sigma``:

    forward:  h  = g * sigma * u
    backward: du = dh * g * sigma
              dg = dh * u * sigma * (1 + g * (1 - sigma))

since ``d silu / dg = sigma + g * sigma * (1 - sigma)``. Only ``[g | u]`` is saved; ``sigma`` is
recomputed in the backward rather than stored, trading a cheap exp for a tensor of memory. The
gradient is written as one ``(..., 2F)`` tensor, the layout the fused projection's backward reads,
so neither direction splits or concatenates the halves.

With ``overwrite_in_backward`` the backward writes ``[dg | du]`` over the saved ``[g | u]``
(each element is read before the same program writes its place), so the MLP's backward holds one
``(..., 2F)`` tensor instead of two at its peak. Only for an input nothing reads after backward:
the fused gate/up projection's output in a decoder layer. torch.compile traces it out-of-place.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024


@triton.jit
def _swiglu_forward_kernel(gate_up_ptr, out_ptr, width, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(grad_out_ptr, gate_up_ptr, grad_gate_up_ptr, width, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < width
    grad_out = tl.load(grad_out_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
    sigma = tl.sigmoid(gate)
    silu = gate * sigma
    grad_gate = grad_out * up * sigma * (1.0 + gate * (1.0 - sigma))
    dtype = grad_gate_up_ptr.dtype.element_ty
    tl.store(grad_gate_up_ptr + row * 2 * width + cols, grad_gate.to(dtype), mask=mask)
    tl.store(grad_gate_up_ptr + row * 2 * width + width + cols, (grad_out * silu).to(dtype), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, overwrite_in_backward: bool) -> torch.Tensor:
        if gate_up.shape[-1] % 2:
            raise ValueError(f"gate_up's last dim holds [gate | up] and must be even, got {tuple(gate_up.shape)}")
        gate_up = gate_up.contiguous()
        width = gate_up.shape[-1] // 2
        rows = gate_up.numel() // gate_up.shape[-1]
        out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
        _swiglu_forward_kernel[(rows, triton.cdiv(width, BLOCK_SIZE))](gate_up, out, width, BLOCK_SIZE=BLOCK_SIZE)
        ctx.save_for_backward(gate_up)
        ctx.overwrite = overwrite_in_backward and not torch.compiler.is_compiling()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate_up = gate_up if ctx.overwrite else torch.empty_like(gate_up)
        width = gate_up.shape[-1] // 2
        rows = gate_up.numel() // gate_up.shape[-1]
        _swiglu_backward_kernel[(rows, triton.cdiv(width, BLOCK_SIZE))](
            grad_out, gate_up, grad_gate_up, width, BLOCK_SIZE=BLOCK_SIZE
        )
        return grad_gate_up, None


def swiglu(gate_up: torch.Tensor, overwrite_in_backward: bool = False) -> torch.Tensor:
    """``silu(g) * u`` for ``gate_up = [g | u]`` (..., 2F): the Llama MLP's ``down_proj`` input.

    ``overwrite_in_backward``: backward leaves the gradient in ``gate_up``'s memory (the module docstring says when)."""
    return SwiGLUFunction.apply(gate_up, overwrite_in_backward)
