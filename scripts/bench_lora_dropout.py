"""Where LoRA dropout's time goes: each fused kernel against the dropout-free GEMM it replaces, and
the mask's random numbers alone, at Llama-3-8B shapes (one GPU, CUDA events).

    python scripts/bench_lora_dropout.py                 # 4,096 token rows (2 x 2048)
    python scripts/bench_lora_dropout.py --rows 32768

Per group (q/k/v: 3 layers reading x of width 4096; o_proj 1 x 4096; down_proj 1 x 14336) it
prints microseconds and the effective bandwidth of x's reads and writes: the forward down-projection,
grad_x (read and written), grad_A, each beside its GEMM without dropout, and Philox alone (the
`tl.rand4x` draws every kernel repeats for its masks, counted per layer), so one can tell whether
the kernels wait on memory or on the random numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without an install
    from finetune.entry import start

    start("python scripts/bench_lora_dropout.py")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

GROUPS = [("q/k/v", 4096, 3), ("o_proj", 4096, 1), ("gate/up", 4096, 2), ("down_proj", 14336, 1)]


@triton.jit
def _philox_only(out_ptr, N, Q, seed, p, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """The kernels' draws for one layer, reduced to a count so that the compiler keeps them."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    u0, u1, u2, u3 = tl.rand4x(seed, rows[:, None].to(tl.int64) * Q + gs[None, :])
    kept = (u0 >= p).to(tl.int32) + (u1 >= p).to(tl.int32) + (u2 >= p).to(tl.int32) + (u3 >= p).to(tl.int32)
    tl.atomic_add(out_ptr, tl.sum(tl.sum(kept, 1), 0))


def microseconds(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def main(argv=None) -> None:
    from finetune_kernels import lora_dropout as kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="token rows (micro-batch x sequence)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark times CUDA kernels; run it on the GPU machine")
    device, N, r, p, seed = torch.device("cuda"), args.rows, args.rank, args.p, 7
    print(f"{torch.cuda.get_device_name(0)}: {N:,} rows, rank {r}, p {p}")
    print("| group | pass | fused us | GEMM us | fused / GEMM | fused TB/s |")
    print("|---|---|---|---|---|---|")
    total_fused = total_gemm = total_philox = 0.0
    for name, K, layers in GROUPS:
        x = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        lora_A = torch.randn(layers * r, K, device=device, dtype=torch.bfloat16)
        xa = torch.empty(N, layers * r, device=device, dtype=torch.bfloat16)
        grad_xa = torch.randn(N, layers * r, device=device, dtype=torch.bfloat16)
        grad_x = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        x_bytes = x.numel() * x.element_size()
        passes = [("forward", lambda: kernels.dropout_down(x, lora_A, r, seed, p, xa), lambda: x @ lora_A.T, x_bytes),
                  ("grad_x", lambda: kernels.dropout_grad_x(grad_x, grad_xa, lora_A, r, seed, p),
                   lambda: grad_x.addmm_(grad_xa, lora_A), 2 * x_bytes),
                  ("grad_A", lambda: kernels.dropout_grad_a(grad_xa, x, r, seed, p), lambda: grad_xa.T @ x, x_bytes)]
        for label, fused, gemm, moved in passes:
            fused_us, gemm_us = microseconds(fused), microseconds(gemm)
            total_fused, total_gemm = total_fused + fused_us, total_gemm + gemm_us
            print(f"| {name} | {label} | {fused_us:.1f} | {gemm_us:.1f} | {fused_us / gemm_us:.2f}x "
                  f"| {moved / fused_us * 1e-6:.2f} |")
        count = torch.zeros((), device=device, dtype=torch.int32)
        Q = triton.cdiv(K, 4)
        grid = (triton.cdiv(N, kernels.BLOCK_ROWS), triton.cdiv(Q, kernels.BLOCK_GROUPS))
        philox_us = layers * microseconds(lambda: _philox_only[grid](count, N, Q, seed, p, BLOCK_M=kernels.BLOCK_ROWS,
                                                                     BLOCK_G=kernels.BLOCK_GROUPS))
        total_philox += 3 * philox_us  # every pass redraws every layer's mask
        print(f"| {name} | Philox alone, {layers} layer(s) | {philox_us:.1f} | | | |")
    print(f"\none layer, all groups: fused {total_fused:.0f} us, dropout-free GEMMs {total_gemm:.0f} us, "
          f"of which Philox (3 passes) {total_philox:.0f} us")


if __name__ == "__main__":
    main()
