"""The generic model path: transformers AutoModelForCausalLM + BitsAndBytesConfig NF4 + peft LoRA.

Broad rather than fast: it takes any causal LM transformers can load, and it is the reference
the native Llama-family path is tested against.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import peft
import torch
import torch.nn.functional as F

from finetune.adapter_format import write_adapter
from finetune.config import ConfigError, LoraConfig, ModelConfig, QuantConfig
from finetune.lora import FSDP_WRAPPED
from finetune.data.samples import IGNORE_INDEX
from finetune.models.sequence_logps import SequenceLogps, shifted_targets, sum_per_sequence
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


@contextlib.contextmanager
def quiet_peft_wrapping():
    """peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` while it wraps a
    model: a FutureWarning no user of ours can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class PeftLoRAModel(peft.PeftModelForCausalLM):
    """peft's LoRA causal LM, meeting `finetune.models.protocol.TrainableModel`.

    A subclass rather than a wrapper: parameter names, peft's own files and every `isinstance`
    check in peft and accelerate stay exactly as for the model `peft.get_peft_model` returns.
    """

    # transformers' models derive packed boundaries from position_ids.
    takes_packed_boundaries = False

    def forward(self, *args, per_sequence_logps: bool = False, **kwargs):
        if per_sequence_logps:
            return self.sequence_logps(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def sequence_logps(self, input_ids, labels, attention_mask=None, position_ids=None, cu_seqlens=None,
                       **_) -> SequenceLogps:
        """From the full logits: the generic path is the broad one, not the memory-lean one."""
        logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).logits  # (B, T, V)
        targets = shifted_targets(labels)
        token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="none")
        return sum_per_sequence(-token_losses.view_as(targets), targets, cu_seqlens, position_ids)

    def adapter_disabled(self):
        return self.disable_adapter()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return peft.get_peft_model_state_dict(self)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        result = peft.set_peft_model_state_dict(self, state)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing:
            raise ConfigError(f"the adapter lacks LoRA weights the model has, e.g. {missing[0]}.")

    def save_adapter(self, directory: Path, gathered_state: dict[str, torch.Tensor] | None = None) -> None:
        if gathered_state is None:
            self.save_pretrained(directory)
            return
        # peft's save_pretrained finds the weights by module name, which FSDP's nested units
        # change (peft strips the marker only in front): it would write an empty adapter. The
        # adapter is the trainable weights under peft's names, without the adapter's name.
        adapter = self.active_adapter
        names = [name.replace(FSDP_WRAPPED, "") for name, param in self.named_parameters() if param.requires_grad]
        weights = {name.replace(f".{adapter}.", "."): gathered_state[name] for name in names}
        config = copy.copy(self.peft_config[adapter])
        config.inference_mode = True
        write_adapter(directory, config, weights)

    def fsdp_wrap_policy(self):
        # Every LoRA layer gets its own FSDP unit: a unit flattens one dtype, and LoRA weights are
        # float32 beside a bfloat16 base.
        from peft.utils.other import fsdp_auto_wrap_policy

        return fsdp_auto_wrap_policy(self)

    def fsdp_param_init(self, device: torch.device):
        return None

    def param_count(self) -> int:
        total = 0
        for param in self.parameters():
            quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
            total += quant_state.shape.numel() if quant_state is not None else param.numel()
        return total

    def memory_footprint(self) -> int:
        return self.get_memory_footprint()
