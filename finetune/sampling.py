"""How generation picks tokens and when it stops: settings checked where they are given (a CLI's
options, a recipe's sample prompts), without importing torch or the model code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (the most likely token each step)
    top_k: int = 0  # keep only the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the most likely tokens whose probabilities reach top_p (1.0: all)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (transformers' rule)
    seed: int | None = None  # sampling draws from torch's generator seeded so; the caller's RNG is left as it was
    stop: tuple[str, ...] = ()  # stop strings: a row ends once its text contains one, and is cut before it

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
