"""Llama-style RMSNorm in Triton.

Forward, per row ``x`` of length ``D`` (all arithmetic in fp32):

    r = 1 / sqrt(mean(x^2) + eps)
    n = x * r
    y = w * cast_to_input_dtype(n)

The cast before the weight product follows ``transformers``' ``LlamaRMSNorm``; the output dtype
is ``promote_types(x.dtype, w.dtype)`` for the same reason (fp32 norm weights, as kbit training
prepares them, give an fp32 output).

Backward, with ``dy`` the upstream gradient and ``dn = dy * w`` (the cast counts as identity):

    dw = sum over rows of dy * cast_to_input_dtype(n)     (only where w trains)
    dx = r * (dn - n * mean(dn * n))

The second line is the derivative of ``x * r(x)``: ``dr/dx_j = -r^3 x_j / D``, so the
``-r^3 x_j / D * sum_i dn_i x_i`` term becomes ``-r n_j mean(dn * n)``.
Only ``r`` (one fp32 per row) is saved; ``n`` is recomputed from ``x`` in the backward.
"""

import torch
import triton
import triton.language as tl

MAX_HIDDEN_SIZE = 65536
# Backward programs each fold many rows into one fp32 partial dw; a few per SM hides latency.
BACKWARD_PROGRAMS_PER_SM = 4


@triton.jit
def _rmsnorm_forward_kernel(
    x_ptr, weight_ptr, y_ptr, rstd_ptr, row_stride, hidden_size, eps, BLOCK_SIZE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden_size + eps)
    normalized = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * hidden_size + cols, (weight * normalized).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_backward_kernel(
    grad_y_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    grad_x_ptr,
    partial_grad_weight_ptr,
    row_stride,
    num_rows,
    hidden_size,
    rows_per_program,
    BLOCK_SIZE: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < hidden_size
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)

    # int64 bounds make the loop index int64, so row offsets cannot overflow on huge batches.
    first_row = program.to(tl.int64) * rows_per_program
    for row in range(first_row, tl.minimum(first_row + rows_per_program, num_rows)):
        row_offset = row * hidden_size
        x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normalized = x * rstd

        if GRAD_WEIGHT:
            grad_weight += grad_y * normalized.to(x_ptr.dtype.element_ty).to(tl.float32)
        grad_normalized = grad_y * weight
        correction = tl.sum(grad_normalized * normalized, axis=0) / hidden_size
        grad_x = rstd * (grad_normalized - normalized * correction)
        tl.store(grad_x_ptr + row_offset + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)

    if GRAD_WEIGHT:
        tl.store(partial_grad_weight_ptr + program * hidden_size + cols, grad_weight, mask=mask)


def _num_warps(block_size: int) -> int:
    return max(1, min(16, block_size // 256))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden_size = x.shape[-1]
        if hidden_size > MAX_HIDDEN_SIZE:
            raise ValueError(f"hidden size {hidden_size} exceeds the one-tile limit {MAX_HIDDEN_SIZE}")
        if weight.shape != (hidden_size,):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden_size}")
        rows = x.reshape(-1, hidden_size)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        num_rows = rows.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((num_rows, hidden_size), dtype=out_dtype, device=x.device)
        rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
        block_size = triton.next_power_of_2(hidden_size)
        _rmsnorm_forward_kernel[(num_rows,)](
            rows, weight, y, rstd, rows.stride(0), hidden_size, eps,
            BLOCK_SIZE=block_size, num_warps=_num_warps(block_size),
        )
        ctx.save_for_backward(rows, weight, rstd)
        ctx.input_shape = x.shape
        return y.reshape(*x.shape[:-1], hidden_size)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        num_rows, hidden_size = rows.shape
        grad_y = grad_y.reshape(num_rows, hidden_size).contiguous()
        grad_x = torch.empty((num_rows, hidden_size), dtype=rows.dtype, device=rows.device)
        sm_count = torch.cuda.get_device_properties(rows.device).multi_processor_count if rows.is_cuda else 1
        num_programs = max(1, min(num_rows, sm_count * BACKWARD_PROGRAMS_PER_SM))
        rows_per_program = triton.cdiv(num_rows, num_programs)
        # A frozen weight (QLoRA's norms) gets no gradient: no partials written, none summed.
        wants_grad_weight = ctx.needs_input_grad[1]
        partial_grad_weight = torch.empty((num_programs if wants_grad_weight else 0, hidden_size),
                                          dtype=torch.float32, device=rows.device)
        block_size = triton.next_power_of_2(hidden_size)
        _rmsnorm_backward_kernel[(num_programs,)](
            grad_y, rows, weight, rstd, grad_x, partial_grad_weight,
            rows.stride(0), num_rows, hidden_size, rows_per_program,
            BLOCK_SIZE=block_size, GRAD_WEIGHT=wants_grad_weight, num_warps=_num_warps(block_size),
        )
        grad_weight = partial_grad_weight.sum(0).to(weight.dtype) if wants_grad_weight else None
        return grad_x.reshape(ctx.input_shape), grad_weight, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x``; a drop-in for ``LlamaRMSNorm.forward``."""
    return RMSNormFunction.apply(x, weight, eps)
