"""Embedding lookup from a table that stays in pinned host memory, read by the GPU over the bus.

    out[t, :] = table[ids[t], :]     for each token t; ids outside [0, V) give a row of zeros

The table ``(V, C)`` is page-locked host memory, which CUDA maps into the device's address space
at the same address (unified virtual addressing), so a kernel reads the rows it needs straight
from it: a lookup moves T x C elements over the bus and the GPU never holds the V x C table. For
Llama-3-8B that is 1.0 GiB of GPU memory kept free for 32 MiB read per 4,096 tokens.

An out-of-range id must not become a read of arbitrary host memory (a crash with no message at
best), and checking the ids on the host would wait for the GPU, so such rows read as zeros
(where torch's embedding on the GPU stops the process with a device-side assert).

Forward only: the table is frozen (LoRA trains adapters, not embeddings) and the ids are integers.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, vocab, width, BLOCK_SIZE: tl.constexpr):
    position = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    token = tl.load(ids_ptr + position).to(tl.int64)
    valid = (token >= 0) & (token < vocab)
    row = tl.where(valid, token, 0)
    # An invalid id reads no column: its row is zeros.
    readable = tl.where(valid, width, 0)
    values = tl.load(table_ptr + row * width + cols, mask=cols < readable, other=0.0)
    tl.store(out_ptr + position * width + cols, values, mask=cols < width)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table (V, C), contiguous, in pinned host memory (or on `ids`' device); ids (...) integer on
    the device that runs the kernel. Returns (..., C) in table's dtype on ids' device."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"the table must be a contiguous (V, C) tensor, got {tuple(table.shape)}")
    if table.device.type == "cpu" and ids.device.type == "cuda" and not table.is_pinned():
        raise ValueError("a host table read by the GPU must be in pinned memory (tensor.pin_memory())")
    ids = ids.contiguous()
    vocab, width = table.shape
    out = torch.empty(*ids.shape, width, dtype=table.dtype, device=ids.device)
    if ids.numel():
        grid = (ids.numel(), triton.cdiv(width, BLOCK_SIZE))
        _gather_rows_kernel[grid](table, ids, out, vocab, width, BLOCK_SIZE=BLOCK_SIZE)
    return out
