"""Model construction: the one function the training recipe calls to get a trainable model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.adapter_format import read_weights
from finetune.config import ConfigError, Dtype, ModelImpl, RunConfig
from finetune.models import hf, native
from finetune.models.native import MemoryLayout, Placement
from finetune.models.protocol import TrainableModel
from finetune.models.source import ModelSource, resolve_source


@dataclass
class LoadedModel:
    model: TrainableModel  # frozen 4-bit base with trainable LoRA adapters
    tokenizer: object
    model_dir: Path  # local directory the base was loaded from
    compute_dtype: torch.dtype
    notices: list[str]  # decisions the user should hear about (e.g. a dtype fallback)
    source: ModelSource | None = None


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


def choose_impl(cfg: RunConfig, source: ModelSource) -> tuple[ModelImpl, str]:
    """The model path to take, and why (model.impl=auto prefers native wherever it applies).

    The only place that decides it: training, the dry run's plan and the API all ask here.
    """
    if cfg.model.impl is ModelImpl.hf:
        return ModelImpl.hf, "model.impl=hf"
    reason = native.unsupported_reason(source.hf_config, cfg.lora, source.directory)
    if reason is None:
        return ModelImpl.native, f"model.impl={cfg.model.impl.value}: {source.config['model_type']} is a native architecture"
    if cfg.model.impl is ModelImpl.native:
        raise ConfigError(f"model.impl=native cannot run {source.name_or_path}: {reason}. Use model.impl=auto or hf.")
    return ModelImpl.hf, f"model.impl=auto: {reason}"


def load_tokenizer(cfg: RunConfig, source: ModelSource):
    """The checkpoint's tokenizer (no weights read)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.directory, trust_remote_code=cfg.model.trust_remote_code)


def build_model(cfg: RunConfig, device: torch.device, placement: Placement = Placement.device,
                layout: MemoryLayout = MemoryLayout(), source: ModelSource | None = None,
                impl: ModelImpl | None = None, tokenizer=None) -> LoadedModel:
    """Load the base quantized to 4 bits, attach LoRA, and load its tokenizer (unless given).

    The recipe passes the `source` it resolved, the `impl` it chose and the tokenizer it read the
    data with; other callers (the API, tests) may leave them to `resolve_source`, `choose_impl` and
    `load_tokenizer`. `placement` other than `device` is for FSDP loading through its first process
    (host memory there, meta elsewhere). The native path only: the generic one loads onto `device`
    regardless.
    """
    source = source or resolve_source(cfg.model, cfg.cache_dir)
    impl = impl or choose_impl(cfg, source)[0]
    compute_dtype, notices = choose_compute_dtype(cfg.quant.bnb_4bit_compute_dtype, device)
    hf.check_causal_lm(source)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg, source)
    if impl is ModelImpl.native:
        model = native.build(cfg, source, compute_dtype, device, layout, placement)
    else:
        if placement is not Placement.device:
            notices.append("the generic model path loads the whole 4-bit base onto every GPU before FSDP shards it "
                           "(fsdp_cpu_ram_efficient_loading applies to the native path).")
        if isinstance(cfg.model.requested_checkpoint_layers(), int):
            raise ConfigError(f"model.checkpoint_layers={cfg.model.checkpoint_layers} applies to the native model "
                              "path, but this run takes the generic one; remove it.")
        base = hf.load_quantized_base(source, cfg.model, cfg.quant, compute_dtype, device)
        model = hf.attach_lora(base, cfg.lora, cfg.model.gradient_checkpointing)
    return LoadedModel(model, tokenizer, source.directory, compute_dtype, notices, source)


def load_adapter_weights(model: TrainableModel, adapter_dir: Path) -> None:
    """Put the LoRA weights saved in `adapter_dir` (peft's format) back into a built model."""
    model.load_adapter_state(read_weights(adapter_dir))
