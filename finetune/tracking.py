"""Experiment tracking behind one small interface; metrics.jsonl is always written."""

from __future__ import annotations

import json
import math
from pathlib import Path


class JsonlTracker:
    """One JSON object per line, flushed at once so a crashed run keeps everything it logged."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict) -> None:
        # JSON has no NaN/Infinity; null keeps the file readable by every JSON parser.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_trackers(output_dir: Path) -> JsonlTracker:
    return JsonlTracker(output_dir / "metrics.jsonl")
