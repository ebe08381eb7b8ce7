"""Rotary position embedding (HF Llama ``rotate_half`` convention) on q and k in Triton.

For a head vector split into halves ``x = [x1, x2]`` (each ``D / 2`` long) at a token with angles
``theta_j = position * inv_freq_j``, ``c = a * cos(theta)`` and ``s = a * sin(theta)`` (``a`` the
attention scaling, 1 for plain RoPE), all elementwise over ``j`` and computed in fp32:

    forward:  y1 = x1 * c - x2 * s         y2 = x2 * c + x1 * s
    backward: dx1 = dy1 * c + dy2 * s      dx2 = dy2 * c - dy1 * s

The backward is the transposed rotation, i.e. the same kernel with ``sin`` negated (rotation by
``-theta``). ``cos``/``sin`` carry no gradient: they come from the frozen ``inv_freq`` buffer.

Tokens are addressed one by one, each with its own cos/sin row, so packed batches whose
``position_ids`` restart at every sample need nothing special. HF's cos/sin tables repeat the
same ``D / 2`` values in both halves (``cat(freqs, freqs)``); the kernel reads the first half only.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    table_stride,
    num_q_heads,
    num_k_heads,
    half_dim,
    SIN_SIGN: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < half_dim
    cos = tl.load(cos_ptr + token * table_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = SIN_SIGN * tl.load(sin_ptr + token * table_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr, q_out_ptr, token, q_token_stride, q_head_stride, num_q_heads, half_dim, cos, sin, BLOCK_Q_HEADS
    )
    _rotate_heads(
        k_ptr, k_out_ptr, token, k_token_stride, k_head_stride, num_k_heads, half_dim, cos, sin, BLOCK_K_HEADS
    )


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, token, token_stride, head_stride, num_heads, half_dim, cos, sin, BLOCK_HEADS: tl.constexpr
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, cos.shape[0])[None, :]
    mask = (heads < num_heads) & (dims < half_dim)
    in_offsets = token * token_stride + heads * head_stride + dims
    # The output is a fresh contiguous (tokens, heads, 2 * half_dim) tensor.
    out_offsets = (token * num_heads + heads) * (2 * half_dim) + dims
    first = tl.load(in_ptr + in_offsets, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(in_ptr + in_offsets + half_dim, mask=mask, other=0.0).to(tl.float32)
    rotated_first = first * cos[None, :] - second * sin[None, :]
    rotated_second = second * cos[None, :] + first * sin[None, :]
    tl.store(out_ptr + out_offsets, rotated_first.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offsets + half_dim, rotated_second.to(out_ptr.dtype.element_ty), mask=mask)


def _as_token_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) or (N, H, D) -> (tokens, H, D) with unit stride along D (copies only if needed)."""
    rows = x.reshape(-1, x.shape[-2], x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_warps(block_q_heads: int, block_k_heads: int, block_half: int) -> int:
    """About one warp per 256 elements of a token's q and k halves, at most 8, a power of two
    (Triton refuses others: 8 q heads beside 4 k heads at 64 would make 3)."""
    return max(1, min(8, triton.next_power_of_2((block_q_heads + block_k_heads) * block_half) // 256))


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_sign: float):
    q_rows, k_rows = _as_token_rows(q), _as_token_rows(k)
    num_tokens, num_q_heads, head_dim = q_rows.shape
    num_k_heads = k_rows.shape[1]
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_k_heads, head_dim), dtype=k.dtype, device=k.device)
    half_dim = head_dim // 2
    block_half = triton.next_power_of_2(half_dim)
    block_q_heads, block_k_heads = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_k_heads)
    _rope_kernel[(num_tokens,)](
        q_rows, k_rows, cos, sin, q_out, k_out,
        q_rows.stride(0), q_rows.stride(1), k_rows.stride(0), k_rows.stride(1), cos.stride(0),
        num_q_heads, num_k_heads, half_dim,
        SIN_SIGN=sin_sign, BLOCK_Q_HEADS=block_q_heads, BLOCK_K_HEADS=block_k_heads, BLOCK_HALF=block_half,
        num_warps=_num_warps(block_q_heads, block_k_heads, block_half),
    )
    return q_out.reshape(q.shape), k_out.reshape(k.shape)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = _rotate(grad_q, grad_k, cos, sin, -1.0)
        return grad_q, grad_k, None, None


def _token_table(table: torch.Tensor, token_shape: torch.Size, head_dim: int) -> torch.Tensor:
    """Broadcast a (tokens, D) / (B, T, D) table to one row per token, keeping only its first half."""
    if table.shape[-1] != head_dim:
        raise ValueError(f"cos/sin last dim {table.shape[-1]} does not match head_dim {head_dim}")
    # Contiguous so that cos and sin share the one row stride the kernel takes.
    return table.expand(*token_shape, head_dim).reshape(-1, head_dim)[:, : head_dim // 2].contiguous()


def token_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``a * cos`` and ``a * sin`` of the angles ``position * inv_freq`` (fp32, like HF's rotary
    embedding) at ``position_ids`` (``...``), as the kernel reads them: one contiguous row of D / 2
    per token. A model makes them once per forward and passes them to every layer's
    ``apply_rope_tables``, instead of each call converting HF's (``...``, D) tables."""
    # cos/sin of large angles need the accurate library.
    angles = position_ids.reshape(-1, 1).float() * inv_freq.float().reshape(1, -1)
    cos_rows, sin_rows = angles.cos(), angles.sin()
    if attention_scaling != 1.0:
        cos_rows, sin_rows = cos_rows * attention_scaling, sin_rows * attention_scaling
    return cos_rows, sin_rows


def apply_rope_tables(q: torch.Tensor, k: torch.Tensor, cos_rows: torch.Tensor,
                      sin_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` with ``token_tables``' rows: q (``...``, Hq, D), k (``...``, Hk, D), one row per token."""
    tokens, head_dim = q.numel() // (q.shape[-2] * q.shape[-1]), q.shape[-1]
    if cos_rows.shape != (tokens, head_dim // 2) or sin_rows.shape != cos_rows.shape or not cos_rows.is_contiguous() \
            or not sin_rows.is_contiguous() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} need contiguous ({tokens}, {head_dim // 2}) "
                         f"tables, got {tuple(cos_rows.shape)} and {tuple(sin_rows.shape)}")
    return RoPEFunction.apply(q, k, cos_rows, sin_rows)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (..., Hq, D) and k (..., Hk, D), where ``...`` is (B, T) or packed (N,).

    Pass either ``position_ids`` (shape ``...``) with ``inv_freq`` (D / 2,), or HF-style ``cos``
    and ``sin`` tables of shape (``...``, D) (a leading batch dim of 1 broadcasts).
    """
    token_shape, head_dim = q.shape[:-2], q.shape[-1]
    if head_dim % 2 or k.shape[:-2] != token_shape or k.shape[-1] != head_dim:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} for RoPE")
    table_given, positions_given = cos is not None and sin is not None, position_ids is not None and inv_freq is not None
    if table_given == positions_given or (cos is None) != (sin is None):
        raise ValueError("pass either position_ids with inv_freq, or cos and sin")
    if position_ids is not None:
        if position_ids.shape != token_shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != token shape {tuple(token_shape)}")
        cos_rows, sin_rows = token_tables(position_ids, inv_freq, attention_scaling)
    else:
        if cos.requires_grad or sin.requires_grad:
            raise ValueError("apply_rope gives no gradient to cos/sin")
        cos_rows, sin_rows = _token_table(cos, token_shape, head_dim), _token_table(sin, token_shape, head_dim)
    return RoPEFunction.apply(q, k, cos_rows, sin_rows)
