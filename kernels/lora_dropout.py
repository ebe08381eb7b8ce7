"""LoRA's input dropout fused into its low-rank products, with masks drawn from a seed.

A group of L adapted layers reads one input x (N, K); layer l has A_l (r, K), its own dropout
mask d_l (keep with probability 1 - p) and c = 1 / (1 - p). With grad_xa_l the gradient of its
xa_l (N, r) (finetune.lora's (dy S) columns):

    forward:  xa_l      = c (x * d_l) A_l^T
    backward: grad_x   += c sum_l (grad_xa_l A_l) * d_l
              grad_A_l  = c grad_xa_l^T (x * d_l)

Each kernel regenerates the masks it needs from (seed + l, element) with Philox, so no mask is
ever stored: the unfused path wrote N x K random numbers, a bool mask and two scaled copies of
x per layer and pass, and kept the masks alive from forward to backward. Here each pass reads x
(or grad_x) once, as the dropout-free GEMMs it replaces do, and the random numbers cost one
Philox call per four elements.

The mask of element (row, col) is tile-independent, so every kernel (and `keep_mask`, which
writes it out for tests) sees the same one: with Q = ceil(K / 4), Philox counter row * Q + g
gives four uniforms, the j-th for column j * Q + g; an element is kept where its uniform is >= p.
Each tile therefore covers four column strips of one g-range.

Every kernel takes all L layers of a group in one launch (a grid axis), so a group costs three
launches per pass whatever its size, and the layers' reads of the same x tiles meet in L2. The
forward's output is only r columns wide, so a program per row block and layer would leave most of
a card idle at a few thousand rows: K is split over programs too, their fp32 partial sums added
afterwards in a fixed order (grad_A likewise splits N).
"""

import functools

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64
BLOCK_GROUPS = 32  # a tile's columns: four strips of this many
# grad_A sums over all N rows; each column block's rows are split over this many programs (their
# fp32 partial sums added afterwards, deterministically) so the grid fills the card.
ROW_SPLITS = 8
# With 4 warps grad_x's four (BLOCK_ROWS, BLOCK_GROUPS) fp32 accumulators take 255 registers a
# thread and spill (ptxas for sm90, Triton 3.7); with 8 no kernel here spills, and each SM holds
# more warps of the other two (86 and 128 registers instead of 166) to hide their loads behind.
NUM_WARPS = 8


@triton.jit
def _strip(j: tl.constexpr, gs, Q, K):
    cols = j * Q + gs
    return cols, (gs < Q) & (cols < K)


@triton.jit
def _masked_rows(ptr, stride, rows, row_ok, cols, col_ok, u, p):
    """(BLOCK_ROWS, BLOCK_GROUPS) of a row-major matrix with the dropped elements zeroed."""
    # The keep mask is applied after the load, not as its mask: a per-element load mask makes every
    # element its own 2-byte load (Triton 3.7's PTX for sm90), where a tile bounded by rows and columns
    # alone is fetched in 16-byte asynchronous copies. A multiply, as torch's dropout does (so an inf that
    # is dropped gives NaN there too), because a select feeding tl.dot fails Triton 3.7's lowering on
    # sm90; in fp32, because Triton's CPU interpreter multiplies bf16 by a cast mask wrongly.
    tile = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return (tile.to(tl.float32) * (u >= p).to(tl.float32)).to(tile.dtype)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if IEEE:  # fp32 inputs: no TF32 rounding
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if UPCAST:
        # Triton's CPU interpreter multiplies 16-bit dots wrongly; in fp32 the products stay exact
        # (16-bit inputs have at most 8 significant bits, which TF32's 11 hold).
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    # On the GPU: the 16-bit tensor-core MMA (exact products, fp32 sums), as cuBLAS computes the
    # unfused path. (An fp32 cast of a masked 16-bit tile fails Triton 3.7's lowering on sm90.)
    return tl.dot(a, b, acc)


@triton.jit
def _down_strip(acc, x_ptr, a_ptr, stride_x, stride_a, rows, row_ok, ranks, rank_ok, j: tl.constexpr, gs, Q, K, u, p,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    cols, col_ok = _strip(j, gs, Q, K)
    a = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
    return _dot(_masked_rows(x_ptr, stride_x, rows, row_ok, cols, col_ok, u, p), a, acc, IEEE, UPCAST)


@triton.jit
def _down_kernel(x_ptr, a_ptr, out_ptr, N, K, Q, stride_x, stride_a, stride_out, stride_split, seed, p, scale,
                 groups_per_split, RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_G: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Layer program_id(1)'s xa columns for BLOCK_M rows, summed over split program_id(2)'s share of K."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    layer = tl.program_id(1)
    split = tl.program_id(2)
    a_ptr += layer * RANK * stride_a
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    first = split * groups_per_split  # a multiple of BLOCK_G: no tile crosses into the next split
    for g0 in range(first, tl.minimum(first + groups_per_split, Q), BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        u0, u1, u2, u3 = tl.rand4x(seed + layer, rows[:, None] * Q + gs[None, :])
        acc = _down_strip(acc, x_ptr, a_ptr, stride_x, stride_a, rows, row_ok, ranks, rank_ok, 0, gs, Q, K, u0, p, IEEE, UPCAST)
        acc = _down_strip(acc, x_ptr, a_ptr, stride_x, stride_a, rows, row_ok, ranks, rank_ok, 1, gs, Q, K, u1, p, IEEE, UPCAST)
        acc = _down_strip(acc, x_ptr, a_ptr, stride_x, stride_a, rows, row_ok, ranks, rank_ok, 2, gs, Q, K, u2, p, IEEE, UPCAST)
        acc = _down_strip(acc, x_ptr, a_ptr, stride_x, stride_a, rows, row_ok, ranks, rank_ok, 3, gs, Q, K, u3, p, IEEE, UPCAST)
    out_ptr += split * stride_split + layer * RANK
    tl.store(out_ptr + rows[:, None] * stride_out + ranks[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _up_strip(acc, grad_xa, a_ptr, stride_a, ranks, rank_ok, j: tl.constexpr, gs, Q, K, u, p, IEEE: tl.constexpr,
              UPCAST: tl.constexpr):
    cols, col_ok = _strip(j, gs, Q, K)
    a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    return acc + tl.where(u >= p, _dot(grad_xa, a, tl.zeros_like(acc), IEEE, UPCAST), 0.0)


@triton.jit
def _add_strip(grad_x_ptr, stride_gx, rows, row_ok, j: tl.constexpr, gs, Q, K, acc, scale):
    cols, col_ok = _strip(j, gs, Q, K)
    where = grad_x_ptr + rows[:, None] * stride_gx + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    total = tl.load(where, mask=ok, other=0.0).to(tl.float32) + acc * scale
    tl.store(where, total.to(grad_x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_x_kernel(grad_x_ptr, grad_xa_ptr, a_ptr, N, K, Q, stride_gx, stride_gxa, stride_a, seed, p, scale,
                   LAYERS: tl.constexpr, RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_G: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """grad_x += scale sum_l (grad_xa_l A_l) * d_l, in place: a program per tile, every layer at once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    acc0 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    for layer in tl.static_range(LAYERS):
        grad_xa = tl.load(grad_xa_ptr + rows[:, None] * stride_gxa + layer * RANK + ranks[None, :],
                          mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        layer_a = a_ptr + layer * RANK * stride_a
        u0, u1, u2, u3 = tl.rand4x(seed + layer, rows[:, None] * Q + gs[None, :])
        acc0 = _up_strip(acc0, grad_xa, layer_a, stride_a, ranks, rank_ok, 0, gs, Q, K, u0, p, IEEE, UPCAST)
        acc1 = _up_strip(acc1, grad_xa, layer_a, stride_a, ranks, rank_ok, 1, gs, Q, K, u1, p, IEEE, UPCAST)
        acc2 = _up_strip(acc2, grad_xa, layer_a, stride_a, ranks, rank_ok, 2, gs, Q, K, u2, p, IEEE, UPCAST)
        acc3 = _up_strip(acc3, grad_xa, layer_a, stride_a, ranks, rank_ok, 3, gs, Q, K, u3, p, IEEE, UPCAST)
    _add_strip(grad_x_ptr, stride_gx, rows, row_ok, 0, gs, Q, K, acc0, scale)
    _add_strip(grad_x_ptr, stride_gx, rows, row_ok, 1, gs, Q, K, acc1, scale)
    _add_strip(grad_x_ptr, stride_gx, rows, row_ok, 2, gs, Q, K, acc2, scale)
    _add_strip(grad_x_ptr, stride_gx, rows, row_ok, 3, gs, Q, K, acc3, scale)


@triton.jit
def _grad_a_strip(acc, grad_xa_t, x_ptr, stride_x, rows, row_ok, j: tl.constexpr, gs, Q, K, u, p, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr):
    cols, col_ok = _strip(j, gs, Q, K)
    return _dot(grad_xa_t, _masked_rows(x_ptr, stride_x, rows, row_ok, cols, col_ok, u, p), acc, IEEE, UPCAST)


@triton.jit
def _store_strip(out_ptr, K, ranks, rank_ok, j: tl.constexpr, gs, Q, acc, scale):
    cols, col_ok = _strip(j, gs, Q, K)
    tl.store(out_ptr + ranks[:, None] * K + cols[None, :], acc * scale, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_a_kernel(grad_xa_ptr, x_ptr, out_ptr, N, K, Q, stride_gxa, stride_x, seed, p, scale, rows_per_split,
                   RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Layer program_id(2)'s fp32 partial grad_A over split program_id(1) of the rows: its RANK rows
    of out[split] (L * RANK, K)."""
    gs = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    split = tl.program_id(1)
    layer = tl.program_id(2)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    acc0 = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    acc3 = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    first = split * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, N), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows = rows.to(tl.int64)
        grad_xa_t = tl.load(grad_xa_ptr + rows[None, :] * stride_gxa + layer * RANK + ranks[:, None],
                            mask=rank_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_M)
        u0, u1, u2, u3 = tl.rand4x(seed + layer, rows[:, None] * Q + gs[None, :])
        acc0 = _grad_a_strip(acc0, grad_xa_t, x_ptr, stride_x, rows, row_ok, 0, gs, Q, K, u0, p, IEEE, UPCAST)
        acc1 = _grad_a_strip(acc1, grad_xa_t, x_ptr, stride_x, rows, row_ok, 1, gs, Q, K, u1, p, IEEE, UPCAST)
        acc2 = _grad_a_strip(acc2, grad_xa_t, x_ptr, stride_x, rows, row_ok, 2, gs, Q, K, u2, p, IEEE, UPCAST)
        acc3 = _grad_a_strip(acc3, grad_xa_t, x_ptr, stride_x, rows, row_ok, 3, gs, Q, K, u3, p, IEEE, UPCAST)
    out_ptr += (split * tl.num_programs(2) + layer) * RANK * K
    _store_strip(out_ptr, K, ranks, rank_ok, 0, gs, Q, acc0, scale)
    _store_strip(out_ptr, K, ranks, rank_ok, 1, gs, Q, acc1, scale)
    _store_strip(out_ptr, K, ranks, rank_ok, 2, gs, Q, acc2, scale)
    _store_strip(out_ptr, K, ranks, rank_ok, 3, gs, Q, acc3, scale)


@triton.jit
def _store_keep(out_ptr, K, rows, row_ok, j: tl.constexpr, gs, Q, u, p):
    cols, col_ok = _strip(j, gs, Q, K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], (u >= p).to(tl.int8), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _keep_mask_kernel(out_ptr, N, K, Q, seed, p, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    u0, u1, u2, u3 = tl.rand4x(seed, rows[:, None] * Q + gs[None, :])
    _store_keep(out_ptr, K, rows, row_ok, 0, gs, Q, u0, p)
    _store_keep(out_ptr, K, rows, row_ok, 1, gs, Q, u1, p)
    _store_keep(out_ptr, K, rows, row_ok, 2, gs, Q, u2, p)
    _store_keep(out_ptr, K, rows, row_ok, 3, gs, Q, u3, p)


def _check(x: torch.Tensor, p: float) -> None:
    if not 0 < p < 1:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    if x.stride(-1) != 1:
        raise ValueError("the rows must be contiguous in their last dim")


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest side is 16


def _programs_wanted(device: torch.device) -> int:
    """Enough programs to keep every SM of the card busy (a few per SM hide the loads' latency)."""
    if device.type != "cuda":
        return 1
    return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _multiprocessors(device_index: int) -> int:
    # Asked once per card, not at every launch: this runs for every adapted group, every pass.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dropout_down(x: torch.Tensor, lora_A: torch.Tensor, rank: int, seed: int, p: float, out: torch.Tensor,
                 k_splits: int | None = None) -> None:
    """out[:, :L*rank] = (x * d_l) A_l^T / (1 - p) for each layer l, side by side; x (N, K) and
    lora_A (>= L*rank, K) in the compute dtype, layer l (mask seed + l) in rows l*rank.. of lora_A;
    L = lora_A's rows // rank. `out` may be a column slice of a wider matrix.

    With few rows the program per row block and layer would leave most of the card idle, so K is
    split over `k_splits` programs (default: as many as fill the card) whose fp32 partial sums are
    added afterwards, in a fixed order.
    """
    _check(x, p)
    N, K = x.shape
    layers = lora_A.shape[0] // rank
    Q = triton.cdiv(K, 4)
    lora_A = lora_A.contiguous()
    row_blocks = triton.cdiv(N, BLOCK_ROWS)
    if k_splits is None:
        k_splits = triton.cdiv(_programs_wanted(x.device), row_blocks * layers)
    k_splits = max(1, min(k_splits, triton.cdiv(Q, BLOCK_GROUPS)))
    groups_per_split = triton.cdiv(triton.cdiv(Q, k_splits), BLOCK_GROUPS) * BLOCK_GROUPS
    k_splits = triton.cdiv(Q, groups_per_split)
    target = out if k_splits == 1 else torch.empty(k_splits, N, layers * rank, dtype=torch.float32, device=x.device)
    _down_kernel[(row_blocks, layers, k_splits)](
        x, lora_A, target, N, K, Q, x.stride(0), lora_A.stride(0), target.stride(-2),
        0 if k_splits == 1 else target.stride(0), seed, p, 1 / (1 - p), groups_per_split,
        RANK=rank, BLOCK_R=_rank_block(rank), BLOCK_M=BLOCK_ROWS, BLOCK_G=BLOCK_GROUPS,
        IEEE=x.dtype == torch.float32, UPCAST=x.device.type != "cuda", num_warps=NUM_WARPS)
    if k_splits > 1:
        out[:, :layers * rank] = target.sum(0)


def dropout_grad_x(grad_x: torch.Tensor, grad_xa: torch.Tensor, lora_A: torch.Tensor, rank: int, seed: int,
                   p: float) -> None:
    """grad_x (N, K) += sum_l (grad_xa_l A_l) * d_l / (1 - p), in place.

    Layer l (mask seed + l) has columns l*rank .. (l+1)*rank of grad_xa (N, >= L*rank) and rows
    likewise of lora_A (>= L*rank, K); L = lora_A's rows // rank. grad_x may be a column slice.
    """
    _check(grad_x, p)
    N, K = grad_x.shape
    layers = lora_A.shape[0] // rank
    Q = triton.cdiv(K, 4)
    lora_A = lora_A.contiguous()
    grid = (triton.cdiv(N, BLOCK_ROWS), triton.cdiv(Q, BLOCK_GROUPS))
    _grad_x_kernel[grid](
        grad_x, grad_xa, lora_A, N, K, Q, grad_x.stride(0), grad_xa.stride(0), lora_A.stride(0), seed, p,
        1 / (1 - p), LAYERS=layers, RANK=rank, BLOCK_R=_rank_block(rank), BLOCK_M=BLOCK_ROWS, BLOCK_G=BLOCK_GROUPS,
        IEEE=grad_x.dtype == torch.float32, UPCAST=grad_x.device.type != "cuda", num_warps=NUM_WARPS)


def dropout_grad_a(grad_xa: torch.Tensor, x: torch.Tensor, rank: int, seed: int, p: float) -> torch.Tensor:
    """(grad_xa_l^T (x * d_l) / (1 - p)) for each layer l, stacked: (L*rank, K) in fp32. Layer l
    (mask seed + l) has columns l*rank .. (l+1)*rank of grad_xa (N, L*rank; may be a column slice)."""
    _check(x, p)
    N, K = x.shape
    layers = grad_xa.shape[1] // rank
    Q = triton.cdiv(K, 4)
    splits = min(ROW_SPLITS, triton.cdiv(N, BLOCK_ROWS))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), BLOCK_ROWS) * BLOCK_ROWS
    partial = torch.empty(splits, layers * rank, K, dtype=torch.float32, device=x.device)
    _grad_a_kernel[(triton.cdiv(Q, BLOCK_GROUPS), splits, layers)](
        grad_xa, x, partial, N, K, Q, grad_xa.stride(0), x.stride(0), seed, p, 1 / (1 - p), rows_per_split,
        RANK=rank, BLOCK_R=_rank_block(rank), BLOCK_M=BLOCK_ROWS, BLOCK_G=BLOCK_GROUPS,
        IEEE=x.dtype == torch.float32, UPCAST=x.device.type != "cuda", num_warps=NUM_WARPS)
    return partial.sum(0)


def keep_mask(N: int, K: int, seed: int, p: float, device: torch.device) -> torch.Tensor:
    """The (N, K) bool mask the kernels above apply for `seed`: for references and tests."""
    out = torch.empty(N, K, dtype=torch.int8, device=device)
    Q = triton.cdiv(K, 4)
    _keep_mask_kernel[(triton.cdiv(N, BLOCK_ROWS), triton.cdiv(Q, BLOCK_GROUPS))](
        out, N, K, Q, seed, p, BLOCK_M=BLOCK_ROWS, BLOCK_G=BLOCK_GROUPS)
    return out.bool()
