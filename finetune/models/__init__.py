"""Model construction: the one function the training recipe calls to get a trainable model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import Dtype, RunConfig
from finetune.models import hf
from finetune.models.source import resolve_model_dir


@dataclass
class LoadedModel:
    model: torch.nn.Module  # frozen 4-bit base with trainable LoRA adapters
    tokenizer: object
    model_dir: Path  # local directory the base was loaded from
    compute_dtype: torch.dtype
    notices: list[str]  # decisions the user should hear about (e.g. a dtype fallback)


def device_supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without these instructions torch emulates bf16 matmuls, which is slower than fp32.
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


def choose_compute_dtype(requested: Dtype, device: torch.device) -> tuple[torch.dtype, list[str]]:
    if requested is Dtype.bfloat16 and not device_supports_bf16(device):
        return torch.float32, [f"{device.type} has no bf16 support: computing in float32 instead of bfloat16."]
    return getattr(torch, requested.value), []


def build_model(cfg: RunConfig, device: torch.device) -> LoadedModel:
    """Load the base quantized to 4 bits, attach LoRA, and load its tokenizer."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.cache_dir, cfg.model.revision)
    compute_dtype, notices = choose_compute_dtype(cfg.quant.bnb_4bit_compute_dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    base = hf.load_quantized_base(model_dir, cfg.model, cfg.quant, compute_dtype, device)
    model = hf.attach_lora(base, cfg.lora, cfg.model.gradient_checkpointing)
    return LoadedModel(model, tokenizer, model_dir, compute_dtype, notices)
