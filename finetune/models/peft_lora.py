"""peft's LoRA model on the generic path, meeting `finetune.models.protocol.TrainableModel`.

Its own module because importing peft takes seconds (it imports bitsandbytes and transformers'
model code): the CLI, the native path and every early error message get by without it.
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
from finetune.config import ConfigError
from finetune.data.samples import IGNORE_INDEX
from finetune.lora import FSDP_WRAPPED
from finetune.models.sequence_logps import SequenceLogps, shifted_targets, sum_per_sequence


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
