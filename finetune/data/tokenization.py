"""A source's rows -> token ids and labels, computed in parallel once and cached on disk.

The cache key covers everything the tokens depend on: the tokenizer's full serialization, the
chat template, format, column names, masking and length settings, and the source's identity
(a local file's size and modification time, a hub dataset's name, subset and split). A re-run
with the same key memory-maps the stored Arrow files and never touches the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import DataFormat, LossOn
from finetune.data.formats import Rendered, render_row
from finetune.data.samples import IGNORE_INDEX, numeric_column
from finetune.data.sources import Source
from finetune.io import IfExists, atomic_dir

# Bump when the stored columns or the way labels are computed change, so old caches are not reused.
PIPELINE_VERSION = 1
# Below this many rows per process, starting worker processes costs more than it saves.
ROWS_PER_PROCESS = 2000


@dataclass
class TokenSettings:
    """Everything besides the source and the tokenizer that decides the stored tokens."""

    data_format: DataFormat
    loss_on: LossOn
    max_seq_len: int
    template: str  # the chat template rendered with; "" for the templateless formats


@dataclass
class TokenizedSource:
    source: Source
    dataset: object  # datasets.Dataset: input_ids, labels, messages, length, full_length, trainable
    from_cache: bool
    seconds: float

    def column(self, name: str) -> np.ndarray:
        return numeric_column(self.dataset, name)


def tokenize_source(source: Source, tokenizer, settings: TokenSettings, tokenizer_id: str, cache_dir: Path,
                    num_proc: int) -> TokenizedSource:
    from datasets import load_from_disk

    started = time.perf_counter()
    directory = cache_dir / "tokenized" / cache_key(source, settings, tokenizer_id)
    from_cache = (directory / "state.json").exists()
    if not from_cache:
        _tokenize_into(directory, source, tokenizer, settings, cache_dir, num_proc)
    return TokenizedSource(source, load_from_disk(str(directory)), from_cache, time.perf_counter() - started)


def cache_key(source: Source, settings: TokenSettings, tokenizer_id: str) -> str:
    fields = {
        "version": PIPELINE_VERSION,
        "source": source.identity(),
        "columns": sorted(source.columns.items()),
        "format": settings.data_format.value,
        "loss_on": settings.loss_on.value,
        "max_seq_len": settings.max_seq_len,
        "template": settings.template,
        "tokenizer": tokenizer_id,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer does: its full serialization (vocab, merges, normalizer, BOS rules)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((body + special).encode()).hexdigest()


def _tokenize_into(directory: Path, source: Source, tokenizer, settings: TokenSettings, cache_dir: Path,
                   num_proc: int) -> None:
    from datasets import Features, List, Value

    raw = source.load(cache_dir)
    features = Features({
        "input_ids": List(Value("int32")), "labels": List(Value("int32")), "messages": Value("string"),
        "length": Value("int32"), "full_length": Value("int32"), "trainable": Value("int32"),
    })
    workers = min(num_proc, len(raw) // ROWS_PER_PROCESS)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Published whole, so an interrupted run never leaves a half-written cache that a later run
    # would trust; a concurrent run tokenizing the same source publishes the same data, and the
    # first one wins. map's own cache files stay outside it, in `scratch`.
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.map-") as scratch, \
            atomic_dir(directory, IfExists.keep) as staging:
        tokenized = raw.map(
            functools.partial(tokenize_rows, tokenizer=tokenizer, settings=settings, source_name=source.name),
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=features,
            num_proc=workers if workers > 1 else None,
            cache_file_name=str(Path(scratch) / "tokens.arrow"),
            new_fingerprint=directory.name,
            desc=f"tokenizing {source.name}",
        )
        tokenized.save_to_disk(str(staging))


def tokenize_rows(batch: dict, indices: list[int], tokenizer, settings: TokenSettings, source_name: str) -> dict:
    """A batch of rows -> token columns; `datasets.map` runs it in worker processes."""
    rows = [{column: values[k] for column, values in batch.items()} for k in range(len(indices))]
    rendered, conversations = zip(*(
        render_row(row, settings.data_format, settings.loss_on, tokenizer, settings.template,
                   where=f"{source_name}: row {index + 1}")
        for row, index in zip(rows, indices)
    ))
    plain = settings.data_format in (DataFormat.prompt_completion, DataFormat.text)
    encoding = tokenizer([r.text for r in rendered], add_special_tokens=plain, return_offsets_mapping=True)
    columns = {"input_ids": [], "labels": [], "messages": [], "length": [], "full_length": [], "trainable": []}
    for ids, offsets, item, conversation in zip(encoding["input_ids"], encoding["offset_mapping"], rendered,
                                                conversations):
        ids = np.asarray(ids, dtype=np.int64)
        labels = label_tokens(ids, offsets, item, tokenizer.eos_token_id)
        if item.plain and tokenizer.eos_token_id is not None:
            ids, labels = np.append(ids, tokenizer.eos_token_id), np.append(labels, tokenizer.eos_token_id)
        kept_labels = labels[: settings.max_seq_len]
        columns["input_ids"].append(ids[: settings.max_seq_len])
        columns["labels"].append(kept_labels)
        columns["messages"].append(json.dumps(conversation, ensure_ascii=False))
        columns["length"].append(len(kept_labels))
        columns["full_length"].append(len(ids))
        columns["trainable"].append(int((kept_labels != IGNORE_INDEX).sum()))
    return columns


def label_tokens(ids: np.ndarray, offsets: list[tuple[int, int]], rendered: Rendered,
                 eos_id: int | None) -> np.ndarray:
    """Each token's label: its own id where it lies wholly inside a trained span, else IGNORE_INDEX.

    Only whole tokens count, so a token that merges the end of a prompt with the start of an
    answer is never trained on. Tokens the tokenizer adds itself (BOS) have empty offsets.
    """
    starts, ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).T
    positions = np.arange(len(ids))
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in rendered.spans:
        inside = (starts >= start) & (ends <= end) & (ends > starts)
        if rendered.stop_at_eos and eos_id is not None:
            eos_positions = np.flatnonzero(inside & (ids == eos_id))
            if eos_positions.size:
                inside &= positions <= eos_positions[-1]
        trained |= inside
    return np.where(trained, ids, IGNORE_INDEX)
