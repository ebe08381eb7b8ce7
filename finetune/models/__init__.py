"""Model construction: the one function the training recipe calls to get a trainable model."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from finetune import memory
from finetune.config import ConfigError, Dtype, ModelImpl, OffloadMode, RunConfig
from finetune.models import hf, native
from finetune.models.native import Placement
from finetune.models.source import resolve_model_dir


@dataclass
class LoadedModel:
    model: torch.nn.Module  # frozen 4-bit base with trainable LoRA adapters (peft or native)
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


def choose_impl(cfg: RunConfig, model_dir: Path, hf_config) -> tuple[ModelImpl, str]:
    """The model path to take, and why (model.impl=auto prefers native wherever it applies)."""
    if cfg.model.impl is ModelImpl.hf:
        return ModelImpl.hf, "requested"
    reason = native.unsupported_reason(hf_config, cfg.lora, model_dir)
    if reason is None:
        return ModelImpl.native, f"{hf_config.model_type} is a native architecture"
    if cfg.model.impl is ModelImpl.native:
        raise ConfigError(f"model.impl=native cannot run {model_dir}: {reason}. Use model.impl=auto or hf.")
    return ModelImpl.hf, reason


def offload_decision(cfg: RunConfig, model_dir: Path, device: torch.device,
                     notices: list[str]) -> tuple[bool, bool]:
    """(stream weights, park checkpoints): hardware.offload, with auto settled by the memory planner.

    Only CUDA moves anything: elsewhere the weights and activations are in host memory already.
    """
    if device.type != "cuda":
        return False, False
    mode = cfg.hardware.offload
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if mode is OffloadMode.auto and processes > 1:
        # The planner plans one process holding the whole base, which DDP's and FSDP's processes
        # do not; and its answer for a big model, streaming, runs in one process only.
        notices.append(f"hardware.offload=auto: none under {processes} processes (the memory planner plans one "
                       "process); pass hardware.offload=activations to keep checkpoints in host memory.")
        mode = OffloadMode.none
    if mode is OffloadMode.auto:
        # Planned from the directory being loaded, so the plan reads the very config.json it trains.
        plan = memory.plan_for_run(replace(cfg, model=replace(cfg.model, name_or_path=str(model_dir))))
        mode = plan.offload
        notices.append(f"hardware.offload=auto: {mode.value}, planned peak {plan.gpu_total / memory.GiB:.1f} GiB "
                       f"of {plan.budget_bytes / memory.GiB:.1f} GiB ({plan.budget_source})"
                       + ("" if plan.fits else "; the plan says it does not fit, see train.dry_run=true"))
    stream = mode in memory.STREAMS_WEIGHTS
    if stream and processes > 1:
        # DDP keeps one copy of every buffer per GPU and syncs it at start: streamed NF4 buffers
        # live in host memory, where that cannot work.
        raise ConfigError(f"hardware.offload={cfg.hardware.offload.value} would stream the weights "
                          f"({mode.value}), which runs in one process only: under several processes each GPU "
                          "must hold the 4-bit base. Use hardware.offload=none or activations with a shorter "
                          "data.max_seq_len (train.dry_run=true shows what fits), or one process.")
    return stream, mode in memory.PARKS_ACTIVATIONS or cfg.model.offload_checkpoints


def build_model(cfg: RunConfig, device: torch.device, placement: Placement = Placement.device) -> LoadedModel:
    """Load the base quantized to 4 bits, attach LoRA, and load its tokenizer.

    `placement` other than `device` is for FSDP loading through its first process (host memory
    there, meta elsewhere). The native path only: the generic one loads onto `device` regardless.
    """
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.cache_dir, cfg.model.revision)
    compute_dtype, notices = choose_compute_dtype(cfg.quant.bnb_4bit_compute_dtype, device)
    hf_config = hf.causal_lm_config(model_dir, cfg.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    impl, why = choose_impl(cfg, model_dir, hf_config)
    if cfg.model.impl is ModelImpl.auto:
        notices.append(f"model.impl=auto: the {impl.value} model path ({why}).")
    if impl is ModelImpl.native:
        stream_weights, offload_checkpoints = offload_decision(cfg, model_dir, device, notices)
        model = native.build(cfg, model_dir, compute_dtype, device, stream_weights, offload_checkpoints, placement)
    else:
        if placement is not Placement.device:
            notices.append("the generic model path loads the whole 4-bit base onto every GPU before FSDP shards it "
                           "(fsdp_cpu_ram_efficient_loading applies to the native path).")
        if cfg.model.checkpoint_layers is not None:
            raise ConfigError(f"model.checkpoint_layers={cfg.model.checkpoint_layers} applies to the native model "
                              f"path, but this run takes the {impl.value} path ({why}); remove it.")
        base = hf.load_quantized_base(model_dir, cfg.model, cfg.quant, compute_dtype, device)
        model = hf.attach_lora(base, cfg.lora, cfg.model.gradient_checkpointing)
    return LoadedModel(model, tokenizer, model_dir, compute_dtype, notices)


def load_adapter_weights(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Put the LoRA weights saved in `adapter_dir` (PEFT format) back into a built model."""
    from safetensors.torch import load_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    if hasattr(model, "load_adapter_weights"):
        model.load_adapter_weights(weights)
        return
    import peft

    result = peft.set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"{adapter_dir} lacks LoRA weights the model has, e.g. {missing[0]}")
