"""SwiGLU gating ``h = silu(g) * u`` in Triton, elementwise, computed in fp32.

With ``sigma = sigmoid(g)`` and ``silu(g) = g * sigma``:

    forward:  h  = g * sigma * u
    backward: du = dh * g * sigma
              dg = dh * u * sigma * (1 + g * (1 - sigma))

since ``d silu / dg = sigma + g * sigma * (1 - sigma)``. Only ``g`` and ``u`` are saved; ``sigma``
is recomputed in the backward rather than stored, trading a cheap exp for a tensor of memory.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, numel, BLOCK_SIZE: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < numel
    grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sigma = tl.sigmoid(gate)
    silu = gate * sigma
    grad_gate = grad_out * up * sigma * (1.0 + gate * (1.0 - sigma))
    tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + offsets, (grad_out * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        numel = gate.numel()
        _swiglu_forward_kernel[(triton.cdiv(numel, BLOCK_SIZE),)](gate, up, out, numel, BLOCK_SIZE=BLOCK_SIZE)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        numel = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(numel, BLOCK_SIZE),)](
            grad_out, gate, up, grad_gate, grad_up, numel, BLOCK_SIZE=BLOCK_SIZE
        )
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for the Llama MLP: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``."""
    return SwiGLUFunction.apply(gate, up)
