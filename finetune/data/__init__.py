"""Datasets -> tokenized, loss-masked samples -> padded or packed micro-batches.

    sources.py       local files and hub datasets, checked; train/eval split; weighted mixture
    formats.py       each row rendered to text + the character spans to train on
    tokenization.py  spans -> per-token labels, in parallel, cached on disk
    batches.py       padded or packed micro-batches, and the model's keyword arguments
    report.py        statistics and the preview the user sees before training
    preference.py    preference pairs and KTO rows: splits, drops, and chosen + rejected micro-batches
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from finetune.config import PREFERENCE_DATA_FORMATS, DataConfig, Truncation
from finetune.data.batches import collate, collate_packed, count_tokens, eval_batches, model_inputs, train_batches
from finetune.data.formats import chat_template_for, uses_chat
from finetune.data.preference import (collate_kto, collate_kto_packed, collate_pairs, collate_pairs_packed,
                                      eval_preference_batches, load_preference_splits, preference_batches)
from finetune.data.report import SplitReport, preview
from finetune.data.samples import (IGNORE_INDEX, DataError, PreferencePair, PreferenceSplit, Sample, TokenizedSplit,
                                   check_vocabulary)
from finetune.data.sources import mixture
from finetune.data.tokenization import TokenizedSource, tokenize_splits

__all__ = [
    "IGNORE_INDEX", "DataError", "PreferencePair", "PreferenceSplit", "Sample", "TokenizedSplit", "check_vocabulary",
    "collate", "collate_kto", "collate_kto_packed", "collate_packed", "collate_pairs", "collate_pairs_packed",
    "count_tokens", "eval_batches", "eval_preference_batches", "load_preference_splits", "load_splits", "model_inputs",
    "preference_batches", "preview", "train_batches", "use_data_chat_template",
]


def use_data_chat_template(tokenizer, data: DataConfig) -> None:
    """Set the chat template the data is rendered with on the tokenizer, so that generation during
    evaluation and the tokenizer saved with the adapter use it too."""
    if uses_chat(data):
        tokenizer.chat_template = chat_template_for(tokenizer, data.chat_template)


def load_splits(data: DataConfig, tokenizer, seed: int,
                cache_dir: str) -> tuple[TokenizedSplit, TokenizedSplit, list[str]]:
    """Train and eval samples, plus report lines: one per source, then one per split."""
    if data.format in PREFERENCE_DATA_FORMATS:
        raise DataError(f"data.format={data.format.value} holds preference data, which trains with a preference "
                        "objective (objective=dpo, ipo, orpo or simpo; kto for data.format=kto), not as SFT samples.")
    cache_root = Path(cache_dir).expanduser()
    template = chat_template_for(tokenizer, data.chat_template) if uses_chat(data) else ""
    train_selection, eval_selection, lines = tokenize_splits(data, tokenizer, seed, cache_root, template)
    train, train_report = _assemble(train_selection, data, seed, "train", weighted=True)
    evaluation, eval_report = _assemble(eval_selection, data, seed, "eval", weighted=False)
    return train, evaluation, lines + [train_report.line("train"), eval_report.line("eval")]


def _assemble(parts: list[tuple[TokenizedSource, np.ndarray]], data: DataConfig, seed: int, split: str,
              weighted: bool) -> tuple[TokenizedSplit, SplitReport]:
    """Drop unusable rows, mix the sources by weight (train only), and report on the result."""
    from datasets import concatenate_datasets

    kept, counts = [], np.zeros(3, dtype=np.int64)  # truncated, dropped too long, dropped no trainable
    for part, rows in parts:
        usable, part_counts = _usable_rows(part, rows, data)
        # A mixture needs every source; an eval set only needs some sample.
        if not len(usable) and weighted:
            raise DataError(f"{part.source.name}: all {len(rows)} {split} samples were dropped: "
                            f"{_drop_reasons(part_counts[1], part_counts[2], data)}.")
        kept.append(usable)
        counts += part_counts
    truncated, too_long, no_trainable = (int(count) for count in counts)
    if not sum(len(rows) for rows in kept):
        raise DataError(f"all {too_long + no_trainable} {split} samples were dropped: "
                        f"{_drop_reasons(too_long, no_trainable, data)}.")
    if too_long or no_trainable:
        warnings.warn(f"{too_long + no_trainable} {split} samples were dropped: "
                      f"{_drop_reasons(too_long, no_trainable, data)}.", stacklevel=3)
    if weighted and len(parts) > 1:
        kept = mixture(kept, [part.source.weight for part, _ in parts], seed)
    dataset = concatenate_datasets([part.dataset.select(rows) for (part, _), rows in zip(parts, kept)])
    lengths = np.concatenate([part.column("length")[rows] for (part, _), rows in zip(parts, kept)])
    trainable = sum(int(part.column("trainable")[rows].sum()) for (part, _), rows in zip(parts, kept))
    report = SplitReport(len(dataset), int(lengths.sum()), trainable, truncated, too_long, no_trainable, lengths)
    return TokenizedSplit(dataset), report


def _usable_rows(part: TokenizedSource, rows: np.ndarray, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rows worth training on, and (truncated, dropped too long, dropped no trainable) counts."""
    full_length, length, trainable = (part.column(name)[rows] for name in ("full_length", "length", "trainable"))
    too_long = (full_length > data.max_seq_len) & (data.truncation is Truncation.drop)
    no_trainable = (trainable == 0) & ~too_long
    usable = ~too_long & ~no_trainable
    truncated = (full_length > length) & usable
    return rows[usable], np.array([truncated.sum(), too_long.sum(), no_trainable.sum()])


def _drop_reasons(too_long: int, no_trainable: int, data: DataConfig) -> str:
    reasons = []
    if no_trainable:
        reasons.append(f"{no_trainable} have no token to train on (data.loss_on={data.loss_on.value}) "
                       f"within data.max_seq_len={data.max_seq_len}")
    if too_long:
        reasons.append(f"{too_long} are longer than data.max_seq_len={data.max_seq_len} (data.truncation=drop)")
    return "; ".join(reasons)
