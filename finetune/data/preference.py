"""Preference data: pairs {prompt, chosen, rejected} for DPO-style objectives, and KTO's rows
{prompt, completion, label}, as splits and padded micro-batches.

The sources, train/eval split, mixing, rendering (formats.py) and cache (tokenization.py) are
SFT's. A micro-batch of B pairs runs chosen and rejected in one forward:

    input_ids       (2B, T)  rows 0..B-1 prompt + chosen of pairs 0..B-1, rows B..2B-1 prompt +
                             rejected of the same pairs in the same order; right-padded with pad_id
    attention_mask  (2B, T)  1 on tokens, 0 on padding
    labels          (2B, T)  the token id on response tokens, IGNORE_INDEX on prompt and padding
                             (not shifted: the model shifts, as for SFT)
    pair_index      (B,)     each pair's index in its split (the reference log-prob cache's key)

With data.packing=true the same 2B sequences share one row instead, with no padding, in SFT's
packed layout (batches.collate_packed: input_ids, labels, position_ids restarting at each
sequence, cu_seqlens), ordered chosen 0..B-1 then rejected 0..B-1, plus pair_index; attention
never crosses sequences. A micro-batch holds micro_batch_size pairs either way.

A KTO micro-batch of B rows holds input_ids, attention_mask, labels (B, T) of prompt + completion,
kto_label (B,) bool, pair_index (B,), and, when B > 1, the mismatched rows of the KTO paper's KL
estimate: kl_input_ids, kl_attention_mask, kl_labels (B, T') where row i is prompt i followed by
completion (i + 1) mod B, its end cut to max_seq_len. Packed, the B sequences share one row and
the B KL sequences another (kl_input_ids, kl_labels, kl_position_ids, kl_cu_seqlens), each in
SFT's packed layout: the KL rows run in a forward of their own, without gradients.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from finetune.config import DataConfig, DataFormat, Truncation
from finetune.data.batches import collate_packed
from finetune.data.formats import chat_template_for
from finetune.data.report import PairReport
from finetune.data.samples import IGNORE_INDEX, DataError, PreferencePair, PreferenceSplit, Sample
from finetune.data.sources import mixture
from finetune.data.tokenization import Selection, tokenize_splits

__all__ = [
    "PreferencePair", "PreferenceSplit", "collate_kto", "collate_kto_packed", "collate_pairs", "collate_pairs_packed",
    "eval_preference_batches", "load_preference_splits", "preference_batches",
]


def load_preference_splits(data: DataConfig, tokenizer, seed: int,
                           cache_dir: str) -> tuple[PreferenceSplit, PreferenceSplit, list[str]]:
    """Train and eval pairs, plus report lines (one per source, then one per split), by the rules of
    SFT's load_splits: sources, mixing weights, eval_path or eval_fraction."""
    if data.format not in (DataFormat.preference, DataFormat.kto):
        raise DataError(f"data.format={data.format.value} holds SFT samples; preference objectives read "
                        "data.format=preference (or kto for objective=kto).")
    template = chat_template_for(tokenizer, data.chat_template)
    train_selection, eval_selection, lines = tokenize_splits(data, tokenizer, seed, Path(cache_dir).expanduser(),
                                                             template)
    train, train_report = _assemble(train_selection, data, seed, "train", weighted=True)
    evaluation, eval_report = _assemble(eval_selection, data, seed, "eval", weighted=False)
    return train, evaluation, lines + [train_report.line("train"), eval_report.line("eval")]


def _assemble(parts: list[Selection], data: DataConfig, seed: int, split: str,
              weighted: bool) -> tuple[PreferenceSplit, PairReport]:
    """Drop unusable pairs, mix the sources by weight (train only), and report on the result."""
    from datasets import concatenate_datasets

    kto = data.format is DataFormat.kto
    noun = "rows" if kto else "pairs"
    kept, truncated, dropped = [], 0, {}
    for part, rows in parts:
        usable, part_truncated, part_dropped = _usable_rows(part, rows, data)
        if not len(usable) and weighted:
            raise DataError(f"{part.source.name}: all {len(rows)} {split} {noun} were dropped: "
                            f"{_drop_reasons(part_dropped, data)}.")
        kept.append(usable)
        truncated += part_truncated
        for reason, count in part_dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    total_dropped = sum(dropped.values())
    if not sum(len(rows) for rows in kept):
        raise DataError(f"all {total_dropped} {split} {noun} were dropped: {_drop_reasons(dropped, data)}.")
    if total_dropped:
        warnings.warn(f"{total_dropped} {split} {noun} were dropped: {_drop_reasons(dropped, data)}.",
                      stacklevel=3)
    if weighted and len(parts) > 1:
        kept = mixture(kept, [part.source.weight for part, _ in parts], seed)
    dataset = concatenate_datasets([part.dataset.select(rows) for (part, _), rows in zip(parts, kept)])
    lengths = np.concatenate([part.column("length")[rows] for (part, _), rows in zip(parts, kept)])
    tokens = sum(int(part.column("tokens")[rows].sum()) for (part, _), rows in zip(parts, kept))
    desirable = (sum(int(part.column("label")[rows].sum()) for (part, _), rows in zip(parts, kept))
                 if kto else None)
    report = PairReport(len(dataset), tokens, truncated, {_SHORT[reason]: count for reason, count in dropped.items()},
                        lengths, desirable)
    return PreferenceSplit(dataset, kto, data.max_seq_len), report


# Drop reasons: their key in the report line, and (in _drop_reasons) the warning's wording.
_SHORT = {"too_long": "too long", "identical": "identical chosen and rejected"}


def _usable_rows(part, rows: np.ndarray, data: DataConfig) -> tuple[np.ndarray, int, dict[str, int]]:
    """The rows worth training on, how many of them were truncated, and the dropped ones by reason."""
    full_length, length, identical = (part.column(name)[rows] for name in ("full_length", "length", "identical"))
    too_long = (full_length > data.max_seq_len) & (data.truncation is Truncation.drop)
    identical = identical.astype(bool) & ~too_long
    usable = ~too_long & ~identical
    dropped = {reason: int(mask.sum()) for reason, mask in (("too_long", too_long), ("identical", identical))
               if mask.any()}
    return rows[usable], int(((full_length > length) & usable).sum()), dropped


def _drop_reasons(dropped: dict[str, int], data: DataConfig) -> str:
    reasons = []
    if dropped.get("identical"):
        reasons.append(f"{dropped['identical']} have identical chosen and rejected tokens within "
                       f"data.max_seq_len={data.max_seq_len}, so there is no preference to learn")
    if dropped.get("too_long"):
        reasons.append(f"{dropped['too_long']} are longer than data.max_seq_len={data.max_seq_len} "
                       "(data.truncation=drop)")
    return "; ".join(reasons)


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one padded batch of 2B rows, chosen first, then rejected (see the module docstring)."""
    batch = _padded(_chosen_then_rejected(pairs), pad_id)
    batch["pair_index"] = torch.tensor([pair.index for pair in pairs], dtype=torch.long)
    return batch


def collate_pairs_packed(pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    """B pairs -> one packed row of 2B sequences, chosen first, then rejected (see the module docstring)."""
    batch = _packed(_chosen_then_rejected(pairs))
    batch["pair_index"] = torch.tensor([pair.index for pair in pairs], dtype=torch.long)
    return batch


def _chosen_then_rejected(pairs: list[PreferencePair]) -> list[tuple[list[int], list[int]]]:
    return [(pair.prompt_ids, pair.chosen_ids) for pair in pairs] + [(pair.prompt_ids, pair.rejected_ids)
                                                                      for pair in pairs]


def collate_kto(rows: list[PreferencePair], pad_id: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """B KTO rows -> their padded batch, with the mismatched KL rows when B > 1 (module docstring)."""
    batch = {**_padded(_completions(rows), pad_id), **_kto_labels(rows)}
    if len(rows) > 1:
        batch.update({f"kl_{key}": value for key, value in _padded(_mismatched(rows, max_seq_len), pad_id).items()})
    return batch


def collate_kto_packed(rows: list[PreferencePair], max_seq_len: int) -> dict[str, torch.Tensor]:
    """B KTO rows -> one packed row of their sequences and, when B > 1, one of the KL rows (module docstring)."""
    batch = {**_packed(_completions(rows)), **_kto_labels(rows)}
    if len(rows) > 1:
        batch.update({f"kl_{key}": value for key, value in _packed(_mismatched(rows, max_seq_len)).items()})
    return batch


def _completions(rows: list[PreferencePair]) -> list[tuple[list[int], list[int]]]:
    return [(row.prompt_ids, row.chosen_ids) for row in rows]


def _mismatched(rows: list[PreferencePair], max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """The KL rows: prompt i, then completion (i + 1) mod B, its end cut so the row fits max_seq_len."""
    return [(row.prompt_ids, rows[(i + 1) % len(rows)].chosen_ids[: max_seq_len - len(row.prompt_ids)])
            for i, row in enumerate(rows)]


def _kto_labels(rows: list[PreferencePair]) -> dict[str, torch.Tensor]:
    return {"kto_label": torch.tensor([row.label for row in rows], dtype=torch.bool),
            "pair_index": torch.tensor([row.index for row in rows], dtype=torch.long)}


def _packed(sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(prompt, response) token lists -> one packed row (batches.collate_packed), labels on the responses."""
    return collate_packed([Sample(prompt + response, [IGNORE_INDEX] * len(prompt) + response, [])
                           for prompt, response in sequences])


def _padded(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt, response) token lists -> right-padded input_ids, attention_mask, and labels on the responses."""
    length = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        start, end = len(prompt), len(prompt) + len(response)
        input_ids[row, :start] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, start:end] = torch.tensor(response, dtype=torch.long)
        labels[row, start:end] = input_ids[row, start:end]
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def preference_batches(split: PreferenceSplit, data: DataConfig, micro_batch_size: int, pad_id: int, seed: int):
    """Endless micro-batches of micro_batch_size pairs (KTO: rows), freshly shuffled (seeded) each epoch;
    packed rows with data.packing=true."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(split))
        for start in range(0, len(order), micro_batch_size):
            yield _collate(split, split.rows(order[start:start + micro_batch_size]), pad_id, data.packing)


def eval_preference_batches(split: PreferenceSplit, micro_batch_size: int, pad_id: int):
    """One pass over the split, in order (padded)."""
    for start in range(0, len(split), micro_batch_size):
        yield _collate(split, split.rows(range(start, min(start + micro_batch_size, len(split)))), pad_id,
                       packed=False)


def _collate(split: PreferenceSplit, pairs: list[PreferencePair], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    if split.kto:
        return collate_kto_packed(pairs, split.max_seq_len) if packed else collate_kto(pairs, pad_id, split.max_seq_len)
    return collate_pairs_packed(pairs) if packed else collate_pairs(pairs, pad_id)
