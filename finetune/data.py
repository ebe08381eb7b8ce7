"""Chat data -> tokenized samples with loss masks -> padded micro-batches.

Trainable spans are found from character offsets of the rendered conversation, never by
searching for strings: each assistant turn's span is the text its rendering adds after the
generation prompt, and tokens are marked trainable when their offsets fall inside a span.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import DataConfig
from finetune.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(UserError):
    """Unusable training data; the message names the file and line and says how to fix it."""


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    messages: list[dict]


@dataclass
class DataReport:
    samples: int
    dropped_no_trainable: int
    truncated: int
    tokens: int
    trainable_tokens: int

    def line(self, split: str) -> str:
        share = self.trainable_tokens / max(self.tokens, 1)
        return (f"{split}: {self.samples} samples, {self.tokens} tokens ({share:.0%} trained), "
                f"{self.truncated} truncated, {self.dropped_no_trainable} dropped (no trainable tokens)")


def read_chat_jsonl(path: Path) -> list[list[dict]]:
    """Read one {"messages": [...]} object per line, checking structure as we go."""
    if not path.is_file():
        raise DataError(f"{path}: no such file. Pass data.path=/path/to/train.jsonl.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text ({error.reason}). Re-encode the file as UTF-8.") from None
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno}).") from None
        conversations.append(_checked_messages(row, f"{path}:{number}"))
    if not conversations:
        raise DataError(f"{path}: the file holds no samples. Each line must be a JSON object with a 'messages' list.")
    return conversations


def _checked_messages(row: object, where: str) -> list[dict]:
    if not isinstance(row, dict) or "messages" not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: expected an object with a 'messages' column, found {found}.")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {index} must be an object with a string 'content'.")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: message {index} has unknown role {message.get('role')!r}; expected one of {ROLES}.")
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return the character spans of its assistant turns.

    A span starts where the generation prompt for that turn ends, and ends where the rendering
    of the conversation through that turn ends: the answer, its end-of-turn token, and whatever
    the template appends after it.
    """
    text = _render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if not (text.startswith(prompt) and text.startswith(through) and through.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not render conversations incrementally (a prefix of the "
                "conversation renders to text that is not a prefix of the whole), so assistant turns cannot be "
                "located. Use a tokenizer whose chat template appends turns."
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[Sample, bool]:
    """Tokenize with a loss mask on assistant turns; returns the sample and whether it was truncated."""
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    eos_id = tokenizer.eos_token_id
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a >= start and b <= end and b > a]
        # Train through the end-of-turn token; what a template adds after it (a newline) is not
        # something the model must learn to emit.
        last_eos = max((i for i in inside if input_ids[i] == eos_id), default=None)
        for i in inside:
            if last_eos is None or i <= last_eos:
                labels[i] = input_ids[i]
    truncated = len(input_ids) > max_seq_len
    return Sample(input_ids[:max_seq_len], labels[:max_seq_len], messages), truncated


def build_samples(conversations: list[list[dict]], tokenizer, max_seq_len: int) -> tuple[list[Sample], DataReport]:
    samples, truncated, dropped = [], 0, 0
    for messages in conversations:
        sample, was_truncated = tokenize_conversation(tokenizer, messages, max_seq_len)
        truncated += was_truncated
        if all(label == IGNORE_INDEX for label in sample.labels):
            dropped += 1
            continue
        samples.append(sample)
    if dropped:
        warnings.warn(f"{dropped} of {len(conversations)} samples have no trainable tokens "
                      f"(no assistant turn within data.max_seq_len={max_seq_len}) and were dropped.")
    report = DataReport(
        samples=len(samples),
        dropped_no_trainable=dropped,
        truncated=truncated,
        tokens=sum(len(s.input_ids) for s in samples),
        trainable_tokens=sum(sum(label != IGNORE_INDEX for label in s.labels) for s in samples),
    )
    return samples, report


def load_splits(data: DataConfig, tokenizer, seed: int, cache_dir: str) -> tuple[list[Sample], list[Sample], list[str]]:
    """Train and eval samples plus one report line per split."""
    train_path, eval_path = _resolve_paths(data, cache_dir)
    conversations = read_chat_jsonl(train_path)
    if eval_path is not None:
        eval_conversations = read_chat_jsonl(eval_path)
    else:
        order = list(range(len(conversations)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(conversations) * data.eval_fraction))
        if n_eval >= len(conversations):
            raise DataError(f"{train_path}: {len(conversations)} samples are too few to hold out an eval split; "
                            "add samples or pass data.eval_path.")
        eval_conversations = [conversations[i] for i in order[:n_eval]]
        conversations = [conversations[i] for i in order[n_eval:]]
    train, train_report = build_samples(conversations, tokenizer, data.max_seq_len)
    if not train:
        raise DataError(f"{train_path}: every sample was dropped because none has a trainable (assistant) token "
                        f"within data.max_seq_len={data.max_seq_len}.")
    evaluation, eval_report = build_samples(eval_conversations, tokenizer, data.max_seq_len)
    if not evaluation:
        raise DataError(f"{eval_path or train_path}: no eval sample has a trainable (assistant) token.")
    return train, evaluation, [train_report.line("train"), eval_report.line("eval")]


def _resolve_paths(data: DataConfig, cache_dir: str) -> tuple[Path, Path | None]:
    if data.path == "demo":
        from finetune.demo import write_demo_data

        return write_demo_data(Path(cache_dir).expanduser() / "demo-data")
    return Path(data.path).expanduser(), Path(data.eval_path).expanduser() if data.eval_path else None


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


def train_batches(samples: list[Sample], micro_batch_size: int, pad_id: int, seed: int):
    """Endless micro-batches: a fresh seeded shuffle each epoch, the last short batch kept."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(order), micro_batch_size):
            yield collate([samples[i] for i in order[start:start + micro_batch_size]], pad_id)


def eval_batches(samples: list[Sample], micro_batch_size: int, pad_id: int):
    for start in range(0, len(samples), micro_batch_size):
        yield collate(samples[start:start + micro_batch_size], pad_id)
