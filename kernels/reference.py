"""Plain-PyTorch references for the Triton kernels in this package.

Each function states the same math as its kernel with nothing fused, so that tests (and anyone
debugging a kernel) have a readable oracle. The formulas live in each kernel module's docstring.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def nf4_dequantize_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    codes = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    nibbles = torch.stack([codes >> 4, codes & 0xF], dim=-1).reshape(-1)
    numel = quant_state.shape.numel()
    values = quant_state.code.float()[nibbles[:numel]]
    block_index = torch.arange(numel, device=packed.device) // quant_state.blocksize
    return (values * _absmax_fp32(quant_state)[block_index]).reshape(quant_state.shape).to(dtype or quant_state.dtype)


def _absmax_fp32(quant_state) -> torch.Tensor:
    if not quant_state.nested:
        return quant_state.absmax.float()
    nested = quant_state.state2
    codes = quant_state.absmax.to(torch.int64)
    block_index = torch.arange(codes.numel(), device=codes.device) // nested.blocksize
    # Two separately rounded fp32 ops, as bitsandbytes does: a fused multiply-add would differ.
    scaled = nested.code.float()[codes] * nested.absmax.float()[block_index]
    return scaled + quant_state.offset.float()


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_fp32 = x.float()
    normalized = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (..., tokens, heads, head_dim); cos, sin: (..., tokens, head_dim), broadcast over heads."""
    cos = cos.float().unsqueeze(-2)
    sin = sin.float().unsqueeze(-2)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # One upcast, so that the backward sums both terms' gradients in fp32 before rounding.
    x_fp32 = x.float()
    return (x_fp32 * cos + _rotate_half(x_fp32) * sin).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope_cos_sin_reference(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    angles = position_ids.float().unsqueeze(-1) * inv_freq.float()
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """reduction "mean", "sum" (scalars) or "none": each token's loss, 0 where ignored, in labels' shape."""
    logits = (x.reshape(-1, x.shape[-1]) @ weight.T).float()
    shape, labels = labels.shape, labels.reshape(-1)
    if num_items_in_batch is not None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    return losses.view(shape) if reduction == "none" else losses


def lora_dropout_reference(x: torch.Tensor, lora_A: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """xa = (x * keep / (1 - p)) A^T for one layer, with its mask given: lora_dropout.py's forward;
    autograd through it gives the kernels' grad_x term and grad_A."""
    return (x * keep / (1 - p)) @ lora_A.T


def host_embedding_reference(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] on ids' device, a zero row for an id outside [0, V)."""
    valid = (ids >= 0) & (ids < table.shape[0])
    rows = F.embedding(torch.where(valid, ids, 0).to(table.device), table).to(ids.device)
    return rows * valid.unsqueeze(-1).to(rows.dtype)
