"""Command-line entry points: compose the Hydra config, run, and turn user errors into one line."""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from finetune.compose import RECIPES_DIR, compose, to_run_config
from finetune.config import register_configs
from finetune.errors import TrainingStopped, UserError
from finetune.hub_code import switch_off_hub_code


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

    # transformers sets its logger's level when its logging module is first imported, so its own
    # switch is what sticks (it also drops the tokenizer's "longer than the maximum sequence length"
    # warning: we truncate and pack after tokenizing, on purpose).
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def check_overrides(overrides: list[str]) -> None:
    """Compose and validate once before Hydra runs, so bad overrides get our one-line message and
    exit code 2, before the recipe's imports (bitsandbytes alone takes seconds) have started."""
    compose(overrides).validate()


register_configs()


@hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="train")
def train_main(cfg: DictConfig) -> dict:
    # bitsandbytes is imported (guarded) by the recipe right before it builds the model, so that
    # the checks before that (paths, devices, the model's config) answer without its 5 s import.
    switch_off_hub_code()
    quiet_libraries()
    from finetune.recipe import run

    try:
        result = run(to_run_config(cfg))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        sys.exit(3)
    return {"output_dir": str(result.output_dir), **result.metrics}


def main() -> None:
    """`python train.py ...` and the `finetune-train` command."""
    args = sys.argv[1:]
    # Sweeps and Hydra's own flags (--help, --cfg, ...) go straight to Hydra.
    if not any(a.startswith("-") for a in args):
        try:
            check_overrides(args)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    train_main()
