"""Per-sequence log-probabilities: token log-probs summed over each sequence's trained tokens.

Preference objectives score whole responses: for each sequence, the sum of log p(label_t | tokens
before t) over its label tokens (labels != IGNORE_INDEX), and how many there are. A sequence is a
row of a padded batch, or one sample of a packed row (boundaries in cu_seqlens, or position ids
restarting at 0, transformers' convention).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from finetune.data.samples import IGNORE_INDEX


class SequenceLogps(NamedTuple):
    logps: torch.Tensor  # (N,) fp32: summed log-probs of each sequence's label tokens
    token_counts: torch.Tensor  # (N,) long: how many label tokens each sums over


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) the token each position predicts: labels[t + 1] (transformers' shift), IGNORE_INDEX last."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def sum_per_sequence(token_logps: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> SequenceLogps:
    """token_logps (B, T) fp32, 0 where targets (B, T) is IGNORE_INDEX -> one sum per sequence.

    Padded rows give B sequences. A packed row (B = 1, with cu_seqlens or restarting position_ids)
    gives one per sample: a sample's last position predicts nothing (the next sample's first label
    is IGNORE_INDEX), so no sum crosses a boundary.
    """
    counted = (targets != IGNORE_INDEX).long()
    if cu_seqlens is None and position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu_seqlens = F.pad(starts, (0, 1), value=targets.shape[1])
    if cu_seqlens is None:
        return SequenceLogps(token_logps.sum(-1), counted.sum(-1))
    if targets.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {targets.shape[0]}")
    cu_seqlens = cu_seqlens.to(targets.device, torch.long)
    segments = torch.searchsorted(cu_seqlens[1:], torch.arange(targets.shape[1], device=targets.device), right=True)
    n = cu_seqlens.numel() - 1
    sums = token_logps.new_zeros(n).index_add(0, segments, token_logps[0])
    counts = counted.new_zeros(n).index_add_(0, segments, counted[0])
    return SequenceLogps(sums, counts)
