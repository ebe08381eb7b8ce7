"""Crash-safe checkpoints: a directory appears complete or not at all, and resumes exactly.

A checkpoint `checkpoints/step-N/` holds the PEFT adapter (+ tokenizer + the quantization it was
trained against) and `trainer_state.pt` (optimizer, scheduler, every process's RNG states:
tensors and plain values only, so it loads with `torch.load(weights_only=True)`) plus
`trainer_state.json` (step, data position, tracker run id, config hash, number of processes).
Under FSDP `trainer_state.pt` also holds every process's optimizer state for its shard and, when a
starting adapter is the preference objectives' reference, every process's shard of that adapter.
It is written under a temporary name, every file fsync'ed, then renamed into place and the
parent directory fsync'ed (finetune.io.atomic_dir): after a crash at any moment the newest
complete checkpoint is still readable. With several processes, the first one writes it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.adapter_format import WEIGHTS_FILE, QuantRecord
from finetune.errors import UserError
from finetune.io import IfExists, atomic_dir
from finetune.lora import FSDP_WRAPPED

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
COMPLETE_MARKER = "COMPLETE"


def _write_adapter(model, tokenizer, directory: Path, quantization: QuantRecord, gathered_state: dict | None) -> None:
    model.save_adapter(directory, gathered_state)
    tokenizer.save_pretrained(directory)
    # Merging needs the exact storage the adapter was trained against (dequant(NF4(W)), not W).
    quantization.write(directory)


class _SaveErrors:
    """Turn an OS failure while saving (disk full, quota, permissions) into one clear user-facing line."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, OSError):
            raise UserError(f"could not save {self.target}: {error.strerror or error}. Free space or fix permissions "
                            "under output_dir, then resume with train.resume=auto.") from None
        return False


def save_adapter(model, tokenizer, target: Path, quantization: QuantRecord,
                 state_dict: dict | None = None) -> Path:
    """Write a PEFT adapter (+ tokenizer + quantization record) to `target`, atomically, replacing an older one."""
    with _SaveErrors(target), atomic_dir(target, IfExists.replace) as staging:
        _write_adapter(model, tokenizer, staging, quantization, state_dict)
    return target


def config_hash(resolved_config: dict) -> str:
    """A hash of the settings that change what training computes (paths and tracker names excluded)."""
    relevant = {k: v for k, v in resolved_config.items() if k not in ("output_dir", "cache_dir", "tracker", "name")}
    train = dict(relevant.get("train", {}))
    for key in ("max_steps", "resume", "overwrite", "save_every", "keep_last", "eval_every", "log_every"):
        train.pop(key, None)
    relevant["train"] = train
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_states() -> dict:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(_as_python_state(states["python"]))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(state):
    # torch.load returns the tuple's inner tuple as a list; random.setstate needs tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _rng_for_saving(states: dict) -> dict:
    """numpy's state tuple becomes plain arrays and numbers so weights_only loading accepts it."""
    kind, keys, pos, has_gauss, cached = states["numpy"]
    saved = dict(states)
    saved["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return saved


def _rng_for_loading(states: dict) -> dict:
    kind, keys, pos, has_gauss, cached = states["numpy"]
    loaded = dict(states)
    loaded["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return loaded


@dataclass
class TrainerState:
    step: int
    micro_batches_consumed: int  # the data position: batches are replayed up to here on resume
    config_hash: str
    tracker_run_id: str | None
    skipped_nonfinite: int = 0
    world_size: int = 1  # processes that trained it: a resume needs as many
    fsdp: bool = False  # its optimizer state is one per process and shard: resumed under FSDP only


def save_checkpoint(directory: Path, step: int, model, tokenizer, quantization: QuantRecord, optimizer,
                    scheduler, state: TrainerState, keep_last: int, rng_by_rank: list[dict] | None = None,
                    adapter_state: dict | None = None, optimizer_by_rank: list[dict] | None = None,
                    reference_by_rank: list[dict] | None = None) -> Path:
    """Write checkpoints/step-N atomically, then keep only the newest `keep_last` complete ones.

    Several processes: one of them writes, given every process's RNG states (`rng_by_rank`) and,
    under FSDP, the adapter weights gathered from every shard (`adapter_state`), every process's
    optimizer state for its shard (`optimizer_by_rank`, see `optimizer_state_on_cpu`) and, when
    the starting adapter is the reference, every process's shard of it (`reference_by_rank`).
    """
    target = directory / f"step-{step}"
    rng_by_rank = rng_by_rank or [rng_states()]
    # Replacing: a run resumed from an older checkpoint (the newest would not load) saves the same step again.
    with _SaveErrors(target), atomic_dir(target, IfExists.replace) as staging:
        _write_adapter(model, tokenizer, staging, quantization, adapter_state)
        optimizer_state = {"optimizer_by_rank": optimizer_by_rank} if optimizer_by_rank is not None \
            else {"optimizer": optimizer.state_dict()}
        reference = {"reference_by_rank": reference_by_rank} if reference_by_rank is not None else {}
        torch.save({**optimizer_state, **reference, "scheduler": scheduler.state_dict(),
                    "rng_by_rank": [_rng_for_saving(rng) for rng in rng_by_rank]}, staging / STATE_TENSORS)
        (staging / STATE_JSON).write_text(json.dumps(state.__dict__, indent=2) + "\n")
        # Written last: a directory without it was never finished.
        (staging / COMPLETE_MARKER).write_text("")
    for old in complete_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def gather_trainable_state(model) -> dict[str, torch.Tensor]:
    """Under FSDP: every trainable (LoRA) weight whole, by name, as CPU copies on every process.

    Gathered one unit at a time, and only the units that own trainable weights: a full state
    dict would gather the frozen 4-bit base too (37 GB for a 70B) to save a few hundred MB of
    adapter. Every process must call this: it gathers.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    state = {}
    for prefix, unit in model.named_modules():
        if not isinstance(unit, FSDP):
            continue
        nested = {id(p) for inner in FSDP.fsdp_modules(unit) if inner is not unit for p in inner.parameters()}
        own = [(name, param) for name, param in unit.named_parameters()
               if param.requires_grad and id(param) not in nested]
        if not own:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for name, param in own:
                full_name = f"{prefix}.{name}" if prefix else name
                state[full_name.replace(FSDP_WRAPPED, "")] = param.detach().cpu().clone()
    return state


def optimizer_state_on_cpu(optimizer) -> dict:
    """This process's optimizer state, its tensors copied to host memory (to be gathered and written).

    Under FSDP with use_orig_params it covers this process's shard of each LoRA parameter: the
    same model, wrapping and number of processes shard it the same way again on resume, so each
    process gets its own state back. (torch's gathered FSDP optimizer state dict was tried: it
    compares non-tensor state across processes, and bitsandbytes' 8-bit optimizers nest their
    states in such values, of different sizes where a parameter straddles two shards.)
    """
    from accelerate.utils import send_to_device

    return send_to_device(optimizer.state_dict(), "cpu")  # nested states (bitsandbytes') included


def saved_optimizer_state(saved: dict, rank: int) -> dict:
    """The optimizer state a checkpoint holds for process `rank`: its own under FSDP, else the one."""
    by_rank = saved.get("optimizer_by_rank")
    return by_rank[rank] if by_rank is not None else saved["optimizer"]


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints with every file in place, oldest first (partial writes are never listed)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-") and _step_of(p) >= 0]
    return sorted((p for p in found if (p / COMPLETE_MARKER).exists()), key=_step_of)


def load_latest_checkpoint(directory: Path):
    """The newest checkpoint that loads, as (path, TrainerState, tensors); unreadable ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(directory)):
        try:
            state = TrainerState(**json.loads((path / STATE_JSON).read_text()))
            tensors = torch.load(path / STATE_TENSORS, weights_only=True, map_location="cpu")
            # Checkpoints from before several processes were supported hold one "rng".
            tensors["rng_by_rank"] = [_rng_for_loading(rng) for rng in tensors.get("rng_by_rank", [tensors.get("rng")])]
            if not (path / WEIGHTS_FILE).is_file():
                raise FileNotFoundError(WEIGHTS_FILE)
            return path, state, tensors
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped, never trusted
            warnings.warn(f"skipping checkpoint {path}: it cannot be read ({type(error).__name__}: {error}).")
    return None
