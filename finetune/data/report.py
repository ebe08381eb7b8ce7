"""What the user sees of the data before training: per-split statistics and a preview of samples
with the trained tokens marked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.data.samples import IGNORE_INDEX, Sample

GREEN, RESET = "\033[32m", "\033[0m"


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


def preview(samples: list[Sample], tokenizer, color: bool) -> str:
    """Samples as text, trained tokens in green (color) or wrapped in [[...]]."""
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
