"""Command-line entry points: compose the Hydra config, run, and turn user errors into one line."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from finetune.config import RunConfig, register_configs
from finetune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def quiet_libraries() -> None:
    """Keep the console to our own lines: the libraries' info chatter and known-harmless warnings go."""
    # bitsandbytes' CPU backend warns on every import that PyPI's optional `kernels` package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("transformers", "peft", "accelerate", "datasets", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def to_run_config(cfg: DictConfig) -> RunConfig:
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise UserError(f"{key} is required but not set: add {key}=... to the command line or the recipe.") from None


register_configs()


@hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="train")
def train_main(cfg: DictConfig) -> dict:
    quiet_libraries()
    from finetune.recipe import run

    try:
        result = run(to_run_config(cfg))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return {"output_dir": str(result.output_dir), **result.metrics}
