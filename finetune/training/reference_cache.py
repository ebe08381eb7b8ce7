"""objective.precompute_reference: the reference log-probs of every training pair, computed once
before training and kept in OUTPUT_DIR/reference_logps/ (logps.safetensors), keyed by the pair's
index in the training split (the batches' `pair_index`).

The file records a fingerprint of what the log-probs depend on: the pairs' tokens, the base
(its files' names, sizes and modification times, as the NF4 cache identifies a checkpoint), the
quantization and compute dtype, the model path, and the starting adapter's weights (under FSDP,
as every process's shards of them: another number of processes computes them again once). A run
(or a resumed one) whose fingerprint differs computes them again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune.io import IfExists, atomic_dir
from finetune.training.objective import Reference, sequence_inputs

CACHE_DIR = "reference_logps"
CACHE_FILE = "logps.safetensors"
# Pairs read from the split per fingerprint update, and per forward when computing.
READ_BATCH = 256


def fingerprint(pairs, quant, compute_dtype: torch.dtype, model_dir: Path, model_kind: str,
                starting_adapter: dict[str, torch.Tensor] | None) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    base = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest.update(json.dumps({"base": base, "quant": asdict(quant), "compute_dtype": str(compute_dtype),
                              "model": model_kind}, default=str, sort_keys=True).encode())
    for start in range(0, len(pairs), READ_BATCH):
        for pair in pairs.rows(range(start, min(start + READ_BATCH, len(pairs)))):
            for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
                digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    for name, tensor in sorted((starting_adapter or {}).items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def reference_table(path: Path, key: str, model, reference: Reference, batches, num_pairs: int,
                    device: torch.device, packed_boundaries: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """((chosen, rejected) log-probs (num_pairs,) each, on `device`; whether they came from `path`).

    Read from the directory `path` when its fingerprint is `key`, else computed over `batches` (one
    pass over the training pairs, any order); `save_table` keeps them.
    """
    if (path / CACHE_FILE).is_file():
        saved = load_file(path / CACHE_FILE)
        if bytes(saved["fingerprint"].tolist()).decode() == key:
            return (saved["chosen"].to(device), saved["rejected"].to(device)), True
    chosen = torch.full((num_pairs,), float("nan"), dtype=torch.float32)
    rejected = chosen.clone()
    for batch in batches:
        logps = reference.computed(model, sequence_inputs(batch, device, packed_boundaries)).float().cpu()
        B = len(batch["pair_index"])
        chosen[batch["pair_index"]], rejected[batch["pair_index"]] = logps[:B], logps[B:]
    if chosen.isnan().any() or rejected.isnan().any():
        raise RuntimeError("the reference pass missed some training pairs")
    return (chosen.to(device), rejected.to(device)), False


def save_table(path: Path, key: str, table: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The directory `path` holds `table` under fingerprint `key`, replacing what it held."""
    chosen, rejected = table
    with atomic_dir(path, IfExists.replace) as staging:
        save_file({"chosen": chosen.cpu(), "rejected": rejected.cpu(),
                   "fingerprint": torch.tensor(list(key.encode()), dtype=torch.uint8)}, staging / CACHE_FILE)
