"""What the pipeline produces: tokenized samples with their labels, stored in Arrow."""

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


def numeric_column(dataset, name: str) -> np.ndarray:
    # One Arrow read; `dataset[name]` is a lazy column that converts element by element when indexed.
    return dataset.select_columns([name]).with_format("numpy")[:][name]
