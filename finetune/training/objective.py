"""Training objectives: what the step asks for the loss of a batch.

A second objective (preference tuning) is a second class here meeting `Objective`; the step and
the loop do not change.
"""

from __future__ import annotations

from typing import Protocol

import torch

from finetune import data as data_lib
from finetune.models import TrainableModel


class Objective(Protocol):
    def targets(self, micro_batches: list[dict]) -> int:
        """How many items the step's loss is normalized by, over all its micro-batches."""

    def loss(self, model, batch: dict, device: torch.device, packed_boundaries: bool, num_items: int) -> torch.Tensor:
        """This micro-batch's share of the step's loss: its summed loss / `num_items`."""


class SupervisedFineTuning:
    """Next-token cross-entropy on the trained tokens (labels != IGNORE_INDEX)."""

    def targets(self, micro_batches: list[dict]) -> int:
        # Labels that some position predicts: the first label of a row has no position before it.
        return sum(int((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for mb in micro_batches)

    def loss(self, model: TrainableModel, batch: dict, device: torch.device, packed_boundaries: bool,
             num_items: int) -> torch.Tensor:
        return model(**data_lib.model_inputs(batch, device, packed_boundaries), num_items_in_batch=num_items).loss
