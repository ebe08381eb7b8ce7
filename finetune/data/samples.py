"""What the pipeline produces, stored in Arrow: tokenized samples with their labels, and tokenized
preference pairs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from finetune.errors import UserError

IGNORE_INDEX = -100


class DataError(UserError):
    """Unusable training data; the message names the file (and line or row) and says how to fix it."""


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    messages: list[dict]  # the conversation, for generation-based evaluation; empty for plain text


class TokenizedSplit(Sequence):
    """A split's samples, read lazily from a memory-mapped Arrow dataset.

    A list of Python ints costs ~36 bytes a token; a large dataset only fits as Arrow columns.
    """

    def __init__(self, dataset):
        self.dataset = dataset  # datasets.Dataset with input_ids, labels, messages, length columns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        positions = range(len(self))[index]  # normalizes negative indices and slices
        return self.rows(positions) if isinstance(index, slice) else self.rows([positions])[0]

    def rows(self, indices) -> list[Sample]:
        """Samples at `indices`, read in one Arrow call (much faster than one by one)."""
        columns = self.dataset[list(indices)]
        return [Sample(ids, labels, json.loads(messages))
                for ids, labels, messages in zip(columns["input_ids"], columns["labels"], columns["messages"])]

    def lengths(self) -> np.ndarray:
        return numeric_column(self.dataset, "length")


@dataclass
class PreferencePair:
    """One tokenized pair; for KTO, one completion (in chosen_ids) with its label."""

    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only (what follows the prompt), end-of-turn included
    rejected_ids: list[int]  # [] for KTO rows
    label: bool | None  # KTO: is the completion desirable; None for pairs
    messages: list[dict]  # the prompt conversation, for generation-based evaluation
    index: int  # position in its split: the key of the on-disk reference log-prob cache


class PreferenceSplit(Sequence):
    """A split's preference pairs (or KTO rows), read lazily from a memory-mapped Arrow dataset."""

    def __init__(self, dataset, kto: bool, max_seq_len: int):
        self.dataset = dataset  # prompt_ids, chosen_ids, rejected_ids, label, messages, length columns
        self.kto = kto
        self.max_seq_len = max_seq_len  # KTO's mismatched KL rows are cut to it

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        positions = range(len(self))[index]
        return self.rows(positions) if isinstance(index, slice) else self.rows([positions])[0]

    def rows(self, indices) -> list[PreferencePair]:
        indices = [int(index) for index in indices]
        columns = self.dataset[indices]
        return [PreferencePair(prompt, chosen, rejected, label, json.loads(messages), index)
                for prompt, chosen, rejected, label, messages, index in zip(
                    columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], columns["label"],
                    columns["messages"], indices)]

    def lengths(self) -> np.ndarray:
        """Tokens of each pair's longer sequence (prompt + the longer response)."""
        return numeric_column(self.dataset, "length")


def numeric_column(dataset, name: str) -> np.ndarray:
    # One Arrow read; `dataset[name]` is a lazy column that converts element by element when indexed.
    return dataset.select_columns([name]).with_format("numpy")[:][name]


def check_vocabulary(splits: dict[str, TokenizedSplit | PreferenceSplit], vocab_size: int) -> None:
    """Refuse a token id the model has no embedding for, naming the first sample that holds one:
    the tokenizer is then not the model's. (On a GPU torch's embedding would stop the run with a
    device-side assert; with model.host_embeddings such a row would read as zeros.)"""
    import pyarrow.compute as pc

    for name, split in splits.items():
        id_columns = ("input_ids",) if isinstance(split, TokenizedSplit) \
            else ("prompt_ids", "chosen_ids", "rejected_ids")
        for column in id_columns:
            # The stored table first (memory-mapped, no copy), which may hold rows the split left out;
            # only if it holds an id too large are the split's rows gathered to find the sample.
            stored = pc.max(pc.list_flatten(split.dataset.data.column(column))).as_py()
            if stored is None or stored < vocab_size:
                continue
            ids = split.dataset.select_columns([column]).with_format("arrow")[:][column]
            flat = pc.list_flatten(ids)
            if not len(flat) or pc.max(flat).as_py() < vocab_size:
                continue
            outside = pc.greater_equal(flat, vocab_size)
            position = pc.index(outside, True).as_py()
            row = pc.list_parent_indices(ids)[position].as_py()
            raise DataError(f"{name} sample {row + 1} ({column}) holds token id {flat[position].as_py():,}, but the "
                            f"model's vocabulary has {vocab_size:,} entries: the tokenizer is not the model's. Use "
                            "the tokenizer that comes with model.name_or_path (tokens added to it need embeddings, "
                            "which LoRA does not train).")
