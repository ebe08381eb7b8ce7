"""Optimizers over the trainable (LoRA) parameters, and learning-rate schedules."""

from __future__ import annotations

import torch

from finetune.config import ConfigError, OptimConfig, Optimizer


def check_optimizer_device(optim: OptimConfig, device: torch.device) -> None:
    """Refuse an optimizer the device cannot run; called before the model or data is loaded."""
    if optim.name is Optimizer.paged_adamw_8bit and device.type != "cuda":
        raise ConfigError(
            "optim.name=paged_adamw_8bit needs a CUDA GPU (its states page through CUDA unified memory). "
            "On this machine use optim=adamw."
        )


def build_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, device: torch.device):
    check_optimizer_device(optim, device)
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name is Optimizer.adamw:
        # The fused kernel is one launch per step instead of one per tensor; CUDA only.
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)
    if optim.name is Optimizer.paged_adamw_8bit:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    raise AssertionError(f"unhandled optimizer {optim.name}")


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """Linear warmup, then cosine decay to zero, linear decay to zero, or a constant rate."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.scheduler.value]
    return get_scheduler(name, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)
