"""The one contract every trainable model meets, whichever path built it.

The native decoder (`native.NativeCausalLM`) and peft's LoRA model (`peft_lora.PeftLoRAModel`) both meet
it, so the recipe, evaluation, checkpoints and the API never ask which one they hold.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainableModel(Protocol):
    """A frozen 4-bit base with trainable LoRA adapters (an `nn.Module` besides)."""

    # forward takes `cu_seqlens` (packed samples' boundaries, for varlen attention) beside position_ids.
    takes_packed_boundaries: bool

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, **kwargs):
        """`.loss`: the summed token cross-entropy / `num_items_in_batch` (or the mean without it).

        With `per_sequence_logps=True` (and labels): `sequence_logps(...)`'s result instead. Callers
        go through forward, not the method, so that DDP and FSDP wrappers see the call.
        """

    def sequence_logps(self, input_ids, labels, attention_mask=None, position_ids=None, cu_seqlens=None):
        """`SequenceLogps`: per sequence (padded row, or packed sample) the summed log-prob of its label
        tokens (labels shifted as for the loss), and their count."""

    def adapter_disabled(self) -> AbstractContextManager:
        """Within it the model computes the frozen base alone: the reference model of preference
        objectives, without a second copy of the base. The adapter's weights are kept as they are."""

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16, **kwargs) -> torch.Tensor:
        """Greedy continuation of the prompts: prompt and new token ids, (B, T + new)."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA weights under peft's key names."""

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved LoRA weights (peft's key names) into the adapters, in place."""

    def save_adapter(self, directory: Path, gathered_state: dict[str, torch.Tensor] | None = None) -> None:
        """adapter_config.json + adapter_model.safetensors, in peft's format. `gathered_state`: the
        trainable weights gathered from FSDP's shards, by parameter name, to save instead."""

    def fsdp_wrap_policy(self):
        """FSDP's auto_wrap_policy for this model (after making its weights shardable)."""

    def fsdp_param_init(self, device: torch.device) -> Callable | None:
        """FSDP's param_init_fn for processes that built the model empty, or None for accelerate's."""

    def param_count(self) -> int:
        """Parameters as the user thinks of them, adapters included: a 4-bit weight counts its
        unpacked elements."""

    def memory_footprint(self) -> int:
        """Bytes of the model's tensors."""
