"""A source's rows -> token ids and labels (or preference pairs' prompt and response ids),
computed in parallel once and cached on disk.

The cache key covers everything the tokens depend on: the tokenizer's full serialization, the
chat template, format, column names, masking and length settings, and the source's identity
(a local file's size and modification time, a hub dataset's name, subset and split). A re-run
with the same key memory-maps the stored Arrow files and never touches the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import PREFERENCE_DATA_FORMATS, DataConfig, DataFormat, LossOn
from finetune.data.formats import CHAT_FORMATS, Rendered, render_preference_row, render_row
from finetune.data.samples import IGNORE_INDEX, numeric_column
from finetune.data.sources import Source, held_out_split, resolve_sources
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
    # datasets.Dataset: input_ids, labels, messages, length, full_length, trainable; for preference
    # formats prompt_ids, chosen_ids, rejected_ids, label, messages, length, full_length, tokens, identical
    dataset: object
    from_cache: bool
    seconds: float

    def column(self, name: str) -> np.ndarray:
        return numeric_column(self.dataset, name)


Selection = tuple[TokenizedSource, np.ndarray]  # a tokenized source and the rows of it a split takes


def tokenize_splits(data: DataConfig, tokenizer, seed: int, cache_root: Path,
                    template: str) -> tuple[list[Selection], list[Selection], list[str]]:
    """Every source tokenized; the rows of each that train and that evaluate; one report line per source."""
    train_sources, eval_source = resolve_sources(data, cache_root)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    num_proc = data.num_proc or min(os.cpu_count() or 1, 8)

    def tokenized(source: Source) -> TokenizedSource:
        settings = TokenSettings(source.data_format, data.loss_on, data.max_seq_len,
                                 template if source.data_format in CHAT_FORMATS else "")
        return tokenize_source(source, tokenizer, settings, tokenizer_id, cache_root, num_proc)

    train_parts = [tokenized(source) for source in train_sources]
    if eval_source is None:
        # Split rows before dropping any, so the eval set does not change with length settings.
        splits = [held_out_split(len(part.dataset), data.eval_fraction, seed, part.source.name)
                  for part in train_parts]
        train_selection = [(part, train_rows) for part, (train_rows, _) in zip(train_parts, splits)]
        eval_selection = [(part, eval_rows) for part, (_, eval_rows) in zip(train_parts, splits)]
        lines = [_source_line("source", part) for part in train_parts]
    else:
        held_out = tokenized(eval_source)
        train_selection = [(part, np.arange(len(part.dataset))) for part in train_parts]
        eval_selection = [(held_out, np.arange(len(held_out.dataset)))]
        lines = [*(_source_line("source", part) for part in train_parts), _source_line("eval source", held_out)]
    return train_selection, eval_selection, lines


def _source_line(kind: str, part: TokenizedSource) -> str:
    how = "read from cache" if part.from_cache else "tokenized"
    return f"{kind} {part.source.name}: {len(part.dataset)} rows, {how} in {part.seconds:.1f} s"


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
    if settings.data_format in PREFERENCE_DATA_FORMATS:
        tokenize = tokenize_pair_rows
        features = Features({
            "prompt_ids": List(Value("int32")), "chosen_ids": List(Value("int32")),
            "rejected_ids": List(Value("int32")), "label": Value("bool"), "messages": Value("string"),
            "length": Value("int32"), "full_length": Value("int32"), "tokens": Value("int32"),
            "identical": Value("bool"),
        })
    else:
        tokenize = tokenize_rows
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
            functools.partial(tokenize, tokenizer=tokenizer, settings=settings, source_name=source.name),
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


def tokenize_pair_rows(batch: dict, indices: list[int], tokenizer, settings: TokenSettings, source_name: str) -> dict:
    """A batch of preference (or KTO) rows -> prompt and response ids, cut to max_seq_len."""
    rows = [{column: values[k] for column, values in batch.items()} for k in range(len(indices))]
    rendered = [render_preference_row(row, settings.data_format, tokenizer, settings.template,
                                      where=f"{source_name}: row {index + 1}")
                for row, index in zip(rows, indices)]
    prompts = _ids([r.prompt for r in rendered], tokenizer)
    chosen = _response_ids(prompts, [r.prompt for r in rendered], [r.chosen for r in rendered], tokenizer)
    kto = settings.data_format is DataFormat.kto
    rejected = ([[] for _ in rendered] if kto else
                _response_ids(prompts, [r.prompt for r in rendered], [r.rejected for r in rendered], tokenizer))
    columns = {name: [] for name in ("prompt_ids", "chosen_ids", "rejected_ids", "label", "messages", "length",
                                     "full_length", "tokens", "identical")}
    for prompt, responses, item in zip(prompts, zip(chosen, rejected), rendered):
        responses = responses[:1] if kto else responses
        full_length = len(prompt) + max(len(response) for response in responses)
        prompt, responses = fit_pair(prompt, responses, settings.max_seq_len)
        columns["prompt_ids"].append(prompt)
        columns["chosen_ids"].append(responses[0])
        columns["rejected_ids"].append([] if kto else responses[1])
        columns["label"].append(item.label)
        columns["messages"].append(json.dumps(item.messages, ensure_ascii=False))
        columns["length"].append(len(prompt) + max(len(response) for response in responses))
        columns["full_length"].append(full_length)
        columns["tokens"].append(len(prompt) * len(responses) + sum(len(response) for response in responses))
        columns["identical"].append(not kto and responses[0] == responses[1])
    return columns


def _ids(texts: list[str], tokenizer) -> list[list[int]]:
    # Chat renderings carry their own special tokens (BOS in the template), as in SFT's chat formats.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _response_ids(prompts: list[list[int]], prompt_texts: list[str], responses: list[str],
                  tokenizer) -> list[list[int]]:
    """Each response's tokens after its prompt's, through the response's last EOS.

    Where the prompt's tokens start the tokenization of prompt + response (the usual case: the
    generation prompt ends in a special token or a newline), the response is tokenized as the whole
    sequence tokenizes, as SFT trains it; where a token would straddle the boundary, the response is
    tokenized on its own, which is what the model continues a prompt with at generation. What a
    template adds after the end-of-turn token (a newline) is left out, as in SFT's trained spans.
    """
    wholes = _ids([prompt + response for prompt, response in zip(prompt_texts, responses)], tokenizer)
    alone = _ids(responses, tokenizer)
    result = []
    for prompt, whole, own in zip(prompts, wholes, alone):
        ids = whole[len(prompt):] if whole[:len(prompt)] == prompt else own
        eos = [position for position, token in enumerate(ids) if token == tokenizer.eos_token_id]
        result.append(ids[: eos[-1] + 1] if eos else ids)
    return result


def fit_pair(prompt: list[int], responses: list[list[int]], max_seq_len: int) -> tuple[list[int], list[list[int]]]:
    """Cut a pair so that the prompt with each response fits max_seq_len (see DataConfig.truncation).

    The prompt keeps its last tokens, as many as the longest response leaves room for but at least
    max_seq_len // 2 (or all of a shorter prompt), since the end of a prompt is what the answer
    responds to; the responses keep their starts.
    """
    longest = max(len(response) for response in responses)
    if len(prompt) + longest <= max_seq_len:
        return prompt, responses
    kept = min(len(prompt), max(max_seq_len // 2, max_seq_len - longest))
    room = max_seq_len - kept
    return prompt[len(prompt) - kept:], [response[:room] for response in responses]


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
