"""The rates a run's speed depends on: the card's matmul peak and the host-to-GPU link, measured
on the GPU (bench.py, the recipe's MFU metric), or assumed where the plan cannot measure them; and
the matmul work of a step, which the memory plan weighs its choices by where several fit.

MFU, as BENCH.md defines it: useful FLOPs per token (memory.useful_flops_per_token) times
tokens per second, over `matmul_peak_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pinned host-to-device copies over PCIe 4.0 x16 (a desktop's link); BENCH.md measured 55 GB/s
# over the H100's PCIe 5.0 x16.
DEFAULT_HOST_LINK_GBPS = 25.0
# The informative streaming estimate's compute side: 40% MFU (BENCH.md's definition) of 165 TFLOP/s,
# the dense bf16 rate of an RTX 4090-class card, where streaming is what makes a 70B model fit.
ASSUMED_MFU = 0.40
ASSUMED_PEAK_TFLOPS = 165.0
# FlashAttention's backward runs five matmuls to its forward's two: the probabilities are rebuilt
# from q, k and the log-sum-exp before dq, dk and dv.
ATTENTION_BACKWARD_RATIO = 2.5
# Parking recomputed layers' inputs in host memory ran 0.97x keeping them on the GPU at 2 x 2048 and
# 1.00x at 1 x 8192 (Llama-3-8B, H100, the same layers recomputed): the copies mostly hide behind
# the compute. hardware.offload=auto parks for speed only where the plan predicts a larger saving.
PARKING_COST = 0.03
# What a step parks leaves during its forward, and hides only if the link carries it meanwhile. An
# H100 copied 55 GB/s to pinned memory (PCIe 5.0 x16) while its forward ran at an estimated ~590
# TFLOP/s (Llama-3-8B at 2 x 2048: ~59 TFLOP in ~100 ms, from the profile's GEMM share): ~93 bytes
# per million FLOPs. A desktop card (PCIe 4.0 at 25 GB/s, ~66 TFLOP/s sustained) has four times that
# headroom, so the H100's ratio is the one parking for speed must keep within. It separates what was
# measured: all 32 layers parked at 1 x 32768 (36 GiB in ~1.2 s of forward) paid, 1.11x; at 2 x 2048
# (26 GB in ~0.1 s) it ran 0.60x.
PARKING_BYTES_PER_FORWARD_FLOP = 55e9 / 590e12


@dataclass(frozen=True)
class LayerFlops:
    """Matmul FLOPs per token of one decoder layer's forward over rows of the run's length: its
    linear projections (LoRA's rank-r products are below this estimate's resolution), the MLP's
    share of them, and causal attention (two matmuls over on average half the row)."""

    projections: float
    mlp: float
    attention: float

    @property
    def forward(self) -> float:
        return self.projections + self.attention

    def step(self, recomputed: bool, keeps_attention: bool, mlp_chunked: bool) -> float:
        """Per token, one training step of the layer. QLoRA's frozen projections compute only their
        input's gradient in backward, as much work as their forward; attention's backward
        ATTENTION_BACKWARD_RATIO times its forward. A recomputed layer runs its forward again, or
        only its MLP where it kept attention's results and the q/k/v and o_proj outputs
        (kept_attention.py); an MLP run in chunks runs again chunk by chunk in its backward."""
        work = 2 * self.projections + (1 + ATTENTION_BACKWARD_RATIO) * self.attention
        if recomputed:
            work += self.mlp if keeps_attention else self.projections + self.attention
        if mlp_chunked:
            work += self.mlp
        return work


def matmul_peak_flops(device, n: int = 8192, iters: int = 10) -> float:
    """The card's measured bf16 matmul rate (FLOP/s): MFU's denominator, as BENCH.md defines it."""
    import time

    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up: cuBLAS picks its kernel on the first call
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def host_link_bytes_per_s(device, nbytes: int = 2**30, iters: int = 5) -> float:
    """The measured pinned host-to-GPU copy rate (bytes/s): what weight streaming moves layers over."""
    import time

    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes * iters / (time.perf_counter() - start)
