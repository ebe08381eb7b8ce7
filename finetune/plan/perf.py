"""The rates a run's speed depends on: the card's matmul peak and the host-to-GPU link, measured
on the GPU (bench.py, the recipe's MFU metric), or assumed where the plan cannot measure them.

MFU, as BENCH.md defines it: useful FLOPs per token (memory.useful_flops_per_token) times
tokens per second, over `matmul_peak_flops`.
"""

from __future__ import annotations

# Pinned host-to-device copies over PCIe 4.0 x16 (a desktop's link); BENCH.md measured 55 GB/s
# over the H100's PCIe 5.0 x16.
DEFAULT_HOST_LINK_GBPS = 25.0
# The informative streaming estimate's compute side: 40% MFU (BENCH.md's definition) of 165 TFLOP/s,
# the dense bf16 rate of an RTX 4090-class card, where streaming is what makes a 70B model fit.
ASSUMED_MFU = 0.40
ASSUMED_PEAK_TFLOPS = 165.0


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
