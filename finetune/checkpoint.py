"""Atomic writes of adapters: a directory appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_adapter(model, tokenizer, target: Path, quantization: dict) -> Path:
    """Write a PEFT adapter (+ tokenizer + the quantization it was trained against) to `target`.

    It is written beside the target under a temporary name, synced, then renamed into place,
    so a crash mid-save leaves either the previous adapter or the new one, never a mix.
    """
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Merging needs the exact storage the adapter was trained against (dequant(NF4(W)), not W).
    (staging / "finetune_quantization.json").write_text(json.dumps(quantization, indent=2) + "\n")
    _fsync_tree(staging)
    if target.exists():
        retired = target.with_name(target.name + ".old")
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
    return target
