"""The generic model path: transformers AutoModelForCausalLM + BitsAndBytesConfig NF4 + peft LoRA.

Broad rather than fast: it takes any causal LM transformers can load, and it is the reference
the native Llama-family path is tested against.
"""

from __future__ import annotations

import torch

from finetune.config import ConfigError, LoraConfig, ModelConfig, QuantConfig
from finetune.models.source import ModelSource


def bnb_config(quant: QuantConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=quant.load_in_4bit,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type.value,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, quant.bnb_4bit_quant_storage.value),
    )


def load_quantized_base(source: ModelSource, model: ModelConfig, quant: QuantConfig, compute_dtype: torch.dtype,
                        device: torch.device):
    """Load the base with every linear layer (but the LM head) stored as 4-bit bitsandbytes weights."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(source)
    base = AutoModelForCausalLM.from_pretrained(
        source.directory,
        config=source.hf_config,
        quantization_config=bnb_config(quant, compute_dtype),
        dtype=getattr(torch, quant.torch_dtype.value),
        device_map={"": device},
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
        revision=model.revision,
    )
    keep_trainable_layout(base)
    return base


def keep_trainable_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode without grad rewrites its weight into
    an inference layout in place, and from then on its matmul has no autograd: gradients stop
    flowing through the frozen layers, so every LoRA weight below the last layer stops learning
    after the first evaluation. Training interleaves evaluation, so it must keep the trainable
    layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_causal_lm(source: ModelSource) -> None:
    """Refuse models that are not causal language models."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    hf_config = source.hf_config
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"model.name_or_path={str(source.directory)!r} is a {type(hf_config).__name__} "
            f"(architectures={getattr(hf_config, 'architectures', None)}), not a causal language model. "
            "Pass a decoder-only model such as Llama, Mistral or Qwen."
        )


def attach_lora(base, lora: LoraConfig, gradient_checkpointing: bool):
    """Freeze the base, optionally turn on activation checkpointing, and wrap it in peft LoRA."""
    import peft

    from finetune.models.peft_lora import PeftLoRAModel, quiet_peft_wrapping

    base.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing gives LoRA weights their gradients even though the
        # frozen embeddings feeding the first layer do not require grad.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=target,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        # What peft.get_peft_model records, so that the adapter names its base.
        base_model_name_or_path=base.__dict__.get("name_or_path") or None,
    )
    try:
        with quiet_peft_wrapping():
            return PeftLoRAModel(base, peft_config)
    except ValueError as error:
        raise ConfigError(f"lora.target_modules={target!r} does not fit this model: {error}") from None


