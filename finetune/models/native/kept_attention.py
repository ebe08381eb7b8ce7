"""Attention that a recomputed layer runs once, not twice.

A recomputed layer (model.RecomputedLayer) runs forward without autograd, then again in backward
only so that each op's backward gets what it saves. Causal attention, per query row i over keys
j <= i (a kv head shared by Hq / Hkv query heads),

    out_i = sum_j p_ij v_j,   p_ij = exp(q_i . k_j / sqrt(D) - lse_i),   lse_i = log sum_j exp(q_i . k_j / sqrt(D))

saves q, k, v, out and the fp32 row statistics lse; its backward rebuilds p from q, k and lse.
Keeping out and lse from the first pass spares attention's forward in the recompute. The q/k/v
projections' output [q | k | v] and the layer's residual h = x + o_proj(out) are kept too, so
that those projections run in the recompute only for what their backward saves, without their
GEMMs (as down_proj already does); RoPE and the norm run again, cheap elementwise kernels.

Those are SDPA's own kernels called through their private ops, which return lse (the public
function does not): cuDNN's or flash's on CUDA, the flash kernel on the CPU. Their outputs are
the public function's bit for bit where it picks the same kernel. For plain causal attention only
(whole rows, or packed rows of equal samples); masks, windows shorter than the rows and varlen
batches are recomputed as before.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# Shortest rows that keep attention. Below, what the recompute skips is a smaller share of a step
# (attention grows with the row) and the kept tensors in flight (2 layers x 28 KiB a token for an
# 8B) would lift the 2 x 2048 peak (6.88 GiB on an H100) above unsloth's 7.02.
MIN_ROW_TOKENS = 4096


def _cudnn_forward(q, k, v):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _cudnn_backward(grad, q, k, v, out, lse, extras):
    cum_q, cum_k, max_q, max_k, seed, offset = extras
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True)


def _flash_forward(q, k, v):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _flash_backward(grad, q, k, v, out, lse, extras):
    cum_q, cum_k, max_q, max_k, seed, offset = extras
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)


def _cpu_forward(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse, ()


def _cpu_backward(grad, q, k, v, out, lse, extras):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True)


# Kernels that refused a call here (private ops change between torch versions; a card may lack
# one): not tried again in this process; attention is recomputed instead, as without keeping.
_refused: set = set()


def kernels(device: torch.device) -> tuple | None:
    """(forward, backward) for `device`: cuDNN's where SDPA may use it (model.SDPA_PRIORITY puts it
    first), else flash's; the CPU's flash kernel. None when those refused a call before."""
    if device.type == "cpu":
        pairs = [(_cpu_forward, _cpu_backward)]
    else:
        pairs = [(_cudnn_forward, _cudnn_backward)] if torch.backends.cuda.cudnn_sdp_enabled() else []
        pairs.append((_flash_forward, _flash_backward))
    return next((pair for pair in pairs if not _refused & set(pair)), None)


def _refuse(kernel, error: Exception) -> None:
    _refused.add(kernel)
    warnings.warn(f"model.keep_attention: {kernel.__name__.strip('_')} refused ({error}); attention is recomputed "
                  "instead of kept where no other kernel takes it", stacklevel=3)


def _recomputed_gradients(grad, q, k, v):
    """Attention's input gradients by running it again under autograd: the backward kernel's stand-in."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(out, (q, k, v), grad)


def _inverse(order) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


class _ReplayedAttention(torch.autograd.Function):
    """q, k, v -> the kept `out`, with attention's backward (the first pass's lse) and no forward."""

    @staticmethod
    def forward(ctx, q, k, v, kept: KeptAttention):
        ctx.backward_kernel, ctx.extras = kept.backward_kernel, kept.extras
        ctx.save_for_backward(q, k, v, kept.out, kept.lse)
        return kept.out.view_as(kept.out)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        # The kernels want the output gradient in the output's layout.
        if grad.stride() != out.stride():
            grad = torch.empty_like(out).copy_(grad)
        if ctx.backward_kernel in _refused:
            return *_recomputed_gradients(grad, q, k, v), None
        try:
            grad_q, grad_k, grad_v = ctx.backward_kernel(grad, q, k, v, out, lse, ctx.extras)[:3]
        except (RuntimeError, TypeError) as error:  # a refusal, raised before the kernel runs
            _refuse(ctx.backward_kernel, error)
            grad_q, grad_k, grad_v = _recomputed_gradients(grad, q, k, v)
        return grad_q, grad_k, grad_v, None


class _Substituted(torch.autograd.Function):
    """A kept value in place of the sum of `terms` (or of one term) that the recompute left
    uncomputed: the value comes back, its gradient goes to every term."""

    @staticmethod
    def forward(ctx, kept, *terms):
        ctx.terms = len(terms)
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):
        return None, *(grad,) * ctx.terms


class KeptAttention:
    """One recomputed layer's attention results, from its first pass to its recompute.

    Recording (made empty, in the first pass): the layer keeps its q/k/v projections' output
    through `projections`, `attend` runs attention by a kernel that returns lse too and keeps out
    and lse, and the layer keeps its residual through `keep_residual`. Replaying (made from what
    was kept, in the recompute): `projections` and `residual` return the kept q/k/v and h behind
    their backward (the projections' GEMM and o_proj's were skipped: their outputs unused),
    `attend` the kept out behind attention's backward. `to_save` gives what to save between the
    two, nothing when attention did not qualify (a mask, a short window): the recompute then runs
    all of it again.
    """

    def __init__(self, out=None, lse=None, h=None, qkv=None, extras: tuple = (), backward_kernel=None):
        self.out, self.lse, self.h, self.qkv = out, lse, h, qkv
        self.extras, self.backward_kernel = extras, backward_kernel
        self.replaying = out is not None

    @classmethod
    def replay(cls, tensors: tuple[torch.Tensor, ...], extras: tuple, backward_kernel) -> KeptAttention:
        """From `to_save`'s tensors and extras and the recording's `backward_kernel`."""
        out, lse, h, qkv = tensors
        *extras, order = extras
        # The kernels' output layout again ((B, T, H, D) memory for a (B, H, T, D) tensor), whatever
        # layout the tensor travelled in.
        return cls(out.permute(_inverse(order)), lse, h, qkv, tuple(extras), backward_kernel)

    def to_save(self) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """What to save until the recompute, and the extras `replay` takes with it: out (in its
        memory order, contiguous, so that parking's copy keeps its layout), lse, h and the q/k/v
        projections; nothing when nothing was recorded."""
        if self.h is None:
            return (), ()
        order = tuple(sorted(range(self.out.dim()), key=lambda dim: -self.out.stride(dim)))
        return (self.out.permute(order), self.lse, self.h, self.qkv), (*self.extras, order)

    def projections(self, qkv: torch.Tensor) -> torch.Tensor:
        """The q/k/v projections' output: kept (recording), or the kept one in place of `qkv`, which
        the recompute left unwritten (replaying)."""
        if self.replaying:
            return _Substituted.apply(self.qkv, qkv)
        self.qkv = qkv
        return qkv

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Causal attention over q (B, Hq, T, D), k and v (B, Hkv, T, D) -> (B, Hq, T, D); None
        where no kernel takes it (the caller attends as usual, and nothing is kept): any dtype on the
        CPU; on CUDA 16-bit with heads of at most 128 (the widest that cuDNN's and flash's kernels
        both take on every card here), unless those refused a call before."""
        if self.replaying:
            return _ReplayedAttention.apply(q, k, v, self)
        if q.device.type != "cpu" and (q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > 128):
            return None
        pair = kernels(q.device)
        if pair is None:
            return None
        forward, backward = pair
        try:
            self.out, self.lse, self.extras = forward(q, k, v)
        except (RuntimeError, TypeError) as error:  # a refusal, raised before the kernel runs
            _refuse(forward, error)
            return self.attend(q, k, v)
        self.backward_kernel = backward
        return self.out

    def keep_residual(self, h: torch.Tensor) -> None:
        if self.out is not None:
            self.h = h

    def residual(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """x + block as kept, `block` (o_proj's output) left unwritten by the recompute."""
        return _Substituted.apply(self.h, x, block)
