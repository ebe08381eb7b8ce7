"""The run's output directory: refused when unsafe, the checkpoint to resume from found, created
only once loading has succeeded, and what an earlier run logged."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from finetune.config import ConfigError, Resume, RunConfig
from finetune.io import atomic_write_text
from finetune.training.checkpoint import TrainerState, config_hash, load_latest_checkpoint

RUN_FILES = ("adapter", "checkpoints", "config.yaml", "metrics.jsonl", "reference_logps", "tensorboard", "wandb")


@dataclass
class RunDir:
    path: Path
    resolved_config: dict  # the config as config.yaml records it
    fingerprint: str  # its hash: a resumed run must have the same
    checkpoint: Path | None = None  # the checkpoint to resume from
    resumed_state: TrainerState | None = None
    saved: dict | None = None  # the checkpoint's tensors: scheduler, RNG and optimizer states

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def plan_run_dir(cfg: RunConfig) -> RunDir:
    """Where the run writes, refusing output_dirs it must not touch; writes nothing."""
    output_dir = Path(cfg.output_dir).expanduser()
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    run_dir = RunDir(output_dir, resolved, config_hash(resolved))
    existing = next(parent for parent in (output_dir, *output_dir.parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"output_dir={output_dir} cannot be written: {existing} is not writable. "
                          "Pass a directory you can write to.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir={output_dir} is a file; pass a directory.")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return run_dir
    holds_run = (output_dir / "config.yaml").is_file()
    if cfg.train.resume is Resume.auto and holds_run:
        latest = load_latest_checkpoint(run_dir.checkpoints)
        if latest is not None:
            checkpoint, state, saved = latest
            if state.config_hash != run_dir.fingerprint:
                raise ConfigError(
                    f"output_dir={output_dir} holds a run with different training settings than this command "
                    f"(its checkpoint {checkpoint.name} has config hash {state.config_hash}, this run "
                    f"{run_dir.fingerprint}). Resume with the settings in its config.yaml, or pass "
                    "train.overwrite=true to start over.")
            run_dir.checkpoint, run_dir.resumed_state, run_dir.saved = checkpoint, state, saved
            return run_dir
        if not cfg.train.overwrite:
            raise ConfigError(f"output_dir={output_dir} holds a run but no complete checkpoint to resume from; "
                              "pass train.overwrite=true to start over there.")
        return run_dir
    if cfg.train.overwrite and holds_run:
        return run_dir
    if holds_run:
        raise ConfigError(f"output_dir={output_dir} already holds a run; pass train.resume=auto to continue it, "
                          "train.overwrite=true to start over, or a new output_dir.")
    raise ConfigError(f"output_dir={output_dir} already exists and is not empty (and holds no run of ours); "
                      "pass a new output_dir.")


def start_run_dir(run_dir: RunDir, overwrite: bool, keep_metrics_through: int) -> None:
    """Create the directory and its config.yaml; on overwrite remove the earlier run's files; on
    resume drop metrics logged after the checkpoint."""
    output_dir = run_dir.path
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    metrics = output_dir / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_metrics_through]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    OmegaConf.save(OmegaConf.create(run_dir.resolved_config), output_dir / "config.yaml")


def logged_evals(output_dir: Path) -> list[dict]:
    metrics = output_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_loss" in r]
