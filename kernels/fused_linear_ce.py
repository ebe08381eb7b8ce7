"""Chunked fused linear + cross-entropy: the LM-head loss without materializing (N, V) logits.

For token rows ``x_i`` (hidden size H), the head ``W`` (V x H) and labels ``y_i``:

    z_i    = W x_i                                  (logits, computed chunk by chunk)
    lse_i  = log sum_v exp(z_iv)                    (online max / sum, in fp32)
    loss   = (1 / Z) * sum_{i : y_i != ignore} (lse_i - z_{i, y_i})

with ``Z`` the number of non-ignored tokens (reduction "mean"), 1 ("sum"), or a caller-given
``num_items_in_batch`` (so that gradient-accumulation steps add up to one true mean). Reduction
"none" returns each token's loss ``lse_i - z_{i, y_i}`` (0 for ignored tokens) instead: what
per-sequence log-probabilities (preference objectives) sum row by row.

Gradients, with ``p_i = softmax(z_i)`` and ``dz_i = (p_i - onehot(y_i)) / Z`` (zero for ignored rows):

    dx_i = dz_i W          dW = sum_i dz_i^T x_i

The forward already knows everything the backward needs, so it computes ``dx`` and ``dW`` chunk
by chunk while each chunk's logits are live (the Triton kernel overwrites the logits with
``dz`` in place) and the backward only scales them by the upstream gradient. Peak extra memory is
one chunk of logits plus ``dx`` (and ``dW`` when the head is trained). Matmuls stay in torch;
``dW`` accumulates in the weight's dtype, one rounding per chunk.

With reduction "none" the upstream gradient ``g_i`` differs per token. ``dx_i`` depends on row
``i`` alone, so the forward still computes it (with ``Z = 1``) and the backward scales each row by
``g_i``. ``dW`` mixes rows, so a trained head is handled in the backward instead: each chunk's
logits are recomputed, turned into ``dz`` by the same kernel, scaled by ``g`` and accumulated.

Labels must already be shifted (``labels[i]`` is the target for ``x[i]``) and lie in
``[0, V)`` or equal ``ignore_index``.
"""

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
MAX_BLOCK_VOCAB = 4096


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    labels_ptr,
    losses_ptr,
    inverse_normalizer_ptr,
    logits_row_stride,
    vocab_size,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_VOCAB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    is_target = label != ignore_index
    tl.device_assert(~is_target | ((label >= 0) & (label < vocab_size)), "label out of range")

    # Every block holds at least one real column, so the running max is finite after block one.
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab_size, BLOCK_VOCAB):
        cols = start + tl.arange(0, BLOCK_VOCAB)
        logits = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(logits, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        running_max = new_max
    log_sum_exp = running_max + tl.log(running_sum)

    target_logit = tl.load(row_ptr + label, mask=is_target, other=0.0).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(is_target, log_sum_exp - target_logit, 0.0))

    if WRITE_GRAD:
        grad_scale = tl.where(is_target, tl.load(inverse_normalizer_ptr), 0.0)
        for start in range(0, vocab_size, BLOCK_VOCAB):
            cols = start + tl.arange(0, BLOCK_VOCAB)
            mask = cols < vocab_size
            logits = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            probs = tl.exp(logits - log_sum_exp)
            grad = (probs - tl.where(cols == label, 1.0, 0.0)) * grad_scale
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    # Size a chunk's logits like x itself: the loss then costs at most about one more copy of x.
    return max(1, min(num_tokens, triton.next_power_of_2(triton.cdiv(num_tokens * hidden_size, vocab_size))))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index, reduction, num_items_in_batch, chunk_size):
        if x.dtype != weight.dtype:
            raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
        hidden_size = x.shape[-1]
        vocab_size = weight.shape[0]
        x_rows = x.reshape(-1, hidden_size)
        labels_shape = labels.shape
        labels = labels.reshape(-1).contiguous()
        num_tokens = x_rows.shape[0]
        if labels.numel() != num_tokens:
            raise ValueError(f"{labels.numel()} labels for {num_tokens} tokens")
        chunk_size = chunk_size or _default_chunk_size(num_tokens, hidden_size, vocab_size)
        per_token = reduction == "none"
        needs_grad_x = ctx.needs_input_grad[0]
        # Per-token losses: dW needs each token's upstream gradient, which only the backward has.
        needs_grad_weight = ctx.needs_input_grad[1] and not per_token

        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=x.device)
        elif reduction == "mean":
            normalizer = (labels != ignore_index).sum().float()
        else:
            normalizer = torch.ones((), dtype=torch.float32, device=x.device)
        # Kept on the device: reading the token count on the host would sync every step.
        inverse_normalizer = normalizer.reciprocal().reshape(1)

        losses = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
        grad_x = torch.empty((num_tokens, hidden_size), dtype=x.dtype, device=x.device) if needs_grad_x else None
        grad_weight = torch.zeros_like(weight) if needs_grad_weight else None
        for start, end, x_chunk, grad_logits in _chunks(x_rows, weight, labels, losses, inverse_normalizer,
                                                        ignore_index, chunk_size, needs_grad_x or needs_grad_weight):
            if needs_grad_x:
                torch.mm(grad_logits, weight, out=grad_x[start:end])
            if needs_grad_weight:
                grad_weight.addmm_(grad_logits.T, x_chunk)

        ctx.per_token, ctx.x_shape = per_token, x.shape
        if per_token:
            ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
            recompute = (x, weight, labels) if ctx.needs_input_grad[1] else ()
            ctx.save_for_backward(grad_x, *recompute)
            return losses.view(labels_shape)
        ctx.save_for_backward(grad_x, grad_weight)
        return losses.sum() * inverse_normalizer[0]

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.per_token:
            return LinearCrossEntropyFunction._per_token_backward(ctx, grad_loss.reshape(-1).float())
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x is not None:
            grad_x = (grad_x * grad_loss).reshape(ctx.x_shape)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_x, grad_weight, None, None, None, None, None

    @staticmethod
    def _per_token_backward(ctx, grad_losses):
        grad_x, *recompute = ctx.saved_tensors
        if grad_x is not None:
            grad_x = (grad_x.float() * grad_losses[:, None]).to(grad_x.dtype).reshape(ctx.x_shape)
        grad_weight = None
        if recompute:
            x, weight, labels = recompute
            x_rows = x.reshape(-1, x.shape[-1])
            grad_weight = torch.zeros_like(weight)
            unit = torch.ones(1, dtype=torch.float32, device=x.device)
            scratch = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
            for start, end, x_chunk, grad_logits in _chunks(x_rows, weight, labels, scratch, unit, ctx.ignore_index,
                                                            ctx.chunk_size, True):
                grad_logits = (grad_logits.float() * grad_losses[start:end, None]).to(weight.dtype)
                grad_weight.addmm_(grad_logits.T, x_chunk)
        return grad_x, grad_weight, None, None, None, None, None


def _chunks(x_rows, weight, labels, losses, inverse_normalizer, ignore_index, chunk_size, write_grad):
    """Per chunk of tokens: (start, end, x chunk, its logits), losses[start:end] filled; with
    `write_grad` the logits are overwritten by their gradient dz (scaled by inverse_normalizer)."""
    vocab_size = weight.shape[0]
    block_vocab = min(MAX_BLOCK_VOCAB, triton.next_power_of_2(vocab_size))
    for start in range(0, x_rows.shape[0], chunk_size):
        end = min(start + chunk_size, x_rows.shape[0])
        x_chunk = x_rows[start:end]
        logits = x_chunk @ weight.T
        _cross_entropy_rows_kernel[(end - start,)](
            logits, labels[start:end], losses[start:end], inverse_normalizer,
            logits.stride(0), vocab_size, ignore_index,
            WRITE_GRAD=write_grad, BLOCK_VOCAB=block_vocab,
            num_warps=max(1, min(16, block_vocab // 256)),
        )
        yield start, end, x_chunk, logits


def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``x @ weight.T`` against ``labels`` as an fp32 scalar, chunked over tokens;
    with ``reduction="none"`` each token's loss instead, fp32 in the shape of ``labels``.

    ``num_items_in_batch`` replaces the "mean" denominator (the count of non-ignored tokens) with
    a caller-given count, as transformers does under gradient accumulation.
    ``chunk_size`` (tokens per chunk) defaults to a size whose logits are about as large as ``x``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch sets the denominator of a mean; it has no meaning with 'sum'")
    return LinearCrossEntropyFunction.apply(
        x, weight, labels, ignore_index, reduction, num_items_in_batch, chunk_size
    )
