"""Samples -> micro-batches: padded rows, or packed rows with attention kept inside each sample.

A packed micro-batch is one row holding several samples back to back, with no padding:

    input_ids     (1, T)   the samples' tokens, concatenated
    labels        (1, T)   each sample's labels, IGNORE_INDEX at its first position
    position_ids  (1, T)   0, 1, ... restarting at every sample
    cu_seqlens    (n + 1,) int32 sample boundaries [0, len0, len0 + len1, ..., T], as flash-attn's varlen takes

transformers (5.x) reads position ids that restart, given no attention mask and no KV cache, as
packed samples and builds a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`),
so no token attends across a sample boundary. Its loss shifts labels left by one, so the last
token of a sample would be trained to predict the next sample's first token; that first label
is IGNORE_INDEX, as it is (by the shift) in an unpacked row.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from finetune.config import DataConfig
from finetune.data.samples import IGNORE_INDEX, Sample, TokenizedSplit


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding is masked from attention and loss."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Concatenate samples into one row; see the module docstring for the layout."""
    lengths = [len(s.input_ids) for s in samples]
    labels = torch.cat([torch.tensor(s.labels) for s in samples])
    starts = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    labels[starts[:-1].long()] = IGNORE_INDEX
    return {
        "input_ids": torch.cat([torch.tensor(s.input_ids) for s in samples])[None],
        "labels": labels[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": starts,
    }


def pack(lengths: np.ndarray, capacity: int, order: np.ndarray) -> list[list[int]]:
    """Best-fit decreasing: longest sample first, each into the fullest bin it still fits.

    `order` breaks ties between equal lengths, so a fresh shuffle packs differently each epoch.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), ascending
    for index in sorted(order.tolist(), key=lambda i: -lengths[i]):
        length = int(lengths[index])
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            room, fullest = free.pop(slot)
            bins[fullest].append(index)
            bisect.insort(free, (room - length, fullest))
    return bins


def train_batches(samples: TokenizedSplit, data: DataConfig, micro_batch_size: int, pad_id: int, seed: int):
    """Endless micro-batches with a fresh seeded shuffle each epoch.

    Unpacked: micro_batch_size samples padded to the longest. Packed: one row of up to
    micro_batch_size * max_seq_len tokens, as many samples as fit.
    """
    rng = np.random.default_rng(seed)
    lengths = samples.lengths()
    while True:
        order = rng.permutation(len(samples))
        if data.packing:
            groups = pack(lengths, micro_batch_size * data.max_seq_len, order)
            for group in (groups[i] for i in rng.permutation(len(groups))):
                yield collate_packed(samples.rows(group))
        else:
            for start in range(0, len(order), micro_batch_size):
                yield collate(samples.rows(order[start:start + micro_batch_size].tolist()), pad_id)


def eval_batches(samples, micro_batch_size: int, pad_id: int):
    for start in range(0, len(samples), micro_batch_size):
        yield collate(samples[start:start + micro_batch_size], pad_id)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, packed_boundaries: bool) -> dict:
    """The batch as keyword arguments for a causal LM's forward, on `device`.

    `packed_boundaries`: the model takes `cu_seqlens` and hands the boundaries straight to a varlen
    attention kernel (`TrainableModel.takes_packed_boundaries`); transformers' models derive them
    from position_ids and take no such argument.
    """
    inputs = {key: value.to(device, non_blocking=True) for key, value in batch.items() if key != "cu_seqlens"}
    if packed_boundaries and "cu_seqlens" in batch:
        # Left in host memory: the model reads the longest sample's length there without waiting
        # on the GPU, then moves the boundaries itself.
        inputs["cu_seqlens"] = batch["cu_seqlens"]
    # Without this, transformers' models keep a KV cache even while training (unless activation
    # checkpointing is on), and with a cache they no longer read position ids as packed samples.
    inputs["use_cache"] = False
    return inputs


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the model computes on, padding excluded (KTO batches: their KL rows too)."""

    def tokens(prefix: str) -> int:  # a padded batch masks its padding; a packed one has none
        mask = batch.get(f"{prefix}attention_mask")
        return int(mask.sum()) if mask is not None else batch[f"{prefix}input_ids"].numel()

    return tokens("") + (tokens("kl_") if "kl_input_ids" in batch else 0)
