"""What the user sees of the data before training: per-split statistics and a preview of samples
with the trained tokens marked (of preference pairs: prompt, chosen and rejected marked)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.data.samples import IGNORE_INDEX, PreferencePair, Sample

GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


@dataclass
class SplitReport:
    samples: int
    tokens: int
    trainable_tokens: int
    truncated: int
    dropped_too_long: int
    dropped_no_trainable: int
    lengths: np.ndarray  # tokens per kept sample

    def line(self, split: str) -> str:
        share = self.trainable_tokens / max(self.tokens, 1)
        p50, p90, p99 = np.percentile(self.lengths, [50, 90, 99]).round().astype(int)
        dropped = f"{self.dropped_no_trainable} dropped (no trainable tokens)"
        if self.dropped_too_long:
            dropped += f", {self.dropped_too_long} dropped (too long)"
        return (f"{split}: {self.samples} samples, {self.tokens} tokens ({share:.0%} trained), "
                f"{self.truncated} truncated, {dropped}; tokens per sample p50 {p50}, p90 {p90}, p99 {p99}, "
                f"max {self.lengths.max()}")


@dataclass
class PairReport:
    pairs: int  # KTO: rows
    tokens: int  # every sequence's tokens: the prompt once per response
    truncated: int
    dropped: dict[str, int]  # reason -> pairs
    lengths: np.ndarray  # tokens of each kept pair's longer sequence
    desirable: int | None  # KTO rows labelled true; None for pairs

    def line(self, split: str) -> str:
        p50, p90, p99 = np.percentile(self.lengths, [50, 90, 99]).round().astype(int)
        what = (f"{self.pairs} pairs" if self.desirable is None else
                f"{self.pairs} rows ({self.desirable} desirable, {self.pairs - self.desirable} undesirable)")
        dropped = ", ".join(f"{count} dropped ({reason})" for reason, count in self.dropped.items()) or "0 dropped"
        return (f"{split}: {what}, {self.tokens} tokens, {self.truncated} truncated, {dropped}; tokens per "
                f"{'pair' if self.desirable is None else 'row'} (longer sequence) p50 {p50}, p90 {p90}, p99 {p99}, "
                f"max {self.lengths.max()}")


def preview(samples: list[Sample] | list[PreferencePair], tokenizer, color: bool) -> str:
    """Samples as text, trained tokens in green (color) or wrapped in [[...]]; preference pairs with
    their prompt, chosen and rejected responses marked."""
    if samples and isinstance(samples[0], PreferencePair):
        return _preview_pairs(samples, tokenizer, color)
    blocks = []
    for number, sample in enumerate(samples, start=1):
        trained = np.asarray(sample.labels) != IGNORE_INDEX
        header = f"--- sample {number}: {len(sample.input_ids)} tokens, {int(trained.sum())} trained ---"
        blocks.append(header + "\n" + _marked_text(sample.input_ids, trained, tokenizer, color))
    return "\n".join(blocks)


def _marked_text(input_ids: list[int], trained: np.ndarray, tokenizer, color: bool) -> str:
    # Decode whole runs rather than single tokens, so multi-byte characters split across byte-level
    # tokens come out whole.
    run_starts = [0, *(np.flatnonzero(np.diff(trained.astype(np.int8))) + 1), len(input_ids)]
    pieces = []
    for start, end in zip(run_starts, run_starts[1:]):
        text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
        if trained[start]:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        pieces.append(text)
    return "".join(pieces)


def _preview_pairs(pairs: list[PreferencePair], tokenizer, color: bool) -> str:
    """Each pair as its prompt, then each response: chosen in green, rejected in red (color), or
    wrapped in [[chosen: ...]] and [[rejected: ...]]. KTO rows show their completion and label."""
    blocks = []
    for number, pair in enumerate(pairs, start=1):
        if pair.label is None:
            header = (f"--- pair {number}: prompt {len(pair.prompt_ids)} tokens, chosen {len(pair.chosen_ids)}, "
                      f"rejected {len(pair.rejected_ids)} ---")
            responses = [("chosen", pair.chosen_ids, GREEN), ("rejected", pair.rejected_ids, RED)]
        else:
            kind = "desirable" if pair.label else "undesirable"
            header = (f"--- row {number}: prompt {len(pair.prompt_ids)} tokens, {kind} completion "
                      f"{len(pair.chosen_ids)} ---")
            responses = [(kind, pair.chosen_ids, GREEN if pair.label else RED)]
        lines = [header, "prompt:", tokenizer.decode(pair.prompt_ids, skip_special_tokens=False)]
        for name, ids, colour in responses:
            text = tokenizer.decode(ids, skip_special_tokens=False)
            lines += [f"{name}:", f"{colour}{text}{RESET}" if color else f"[[{name}: {text}]]"]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
