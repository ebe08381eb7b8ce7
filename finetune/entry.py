"""What every command does first, whether the project is installed or run from a checkout."""

from __future__ import annotations

import importlib.util
import sys

from finetune.hub_code import keep_hub_code_out

# Import names of the dependencies every command needs, checked before the first import (gguf,
# wandb and tensorboard are imported only by the export and the trackers that use them).
REQUIRED = ("torch", "bitsandbytes", "peft", "transformers", "accelerate", "datasets", "hydra", "omegaconf",
            "safetensors")


def start(command: str) -> None:
    """Stop with one line when the environment lacks the dependencies; then keep hub code out."""
    check_dependencies(command)
    keep_hub_code_out()


def check_dependencies(command: str) -> None:
    """Stop with one line when the environment lacks the dependencies."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not installed in {sys.executable}. Run `scripts/venv-run "
                 f"{command}` (it creates .venv from requirements/cpu.lock; FINETUNE_LOCK=cuda on a GPU box), "
                 f"or `pip install -r requirements/cpu.lock -e .` in your environment.")
