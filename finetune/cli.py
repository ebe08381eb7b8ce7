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
from finetune.errors import TrainingStopped, UserError
from finetune.hub_code import keep_hub_code_out

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

    # transformers sets its logger's level when its logging module is first imported, so its own
    # switch is what sticks (it also drops the tokenizer's "longer than the maximum sequence length"
    # warning: we truncate and pack after tokenizing, on purpose).
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _keys_outside_schema(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys added with Hydra's `+key=value`: struct mode lets them in, but no schema field reads them."""
    import dataclasses

    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found = []
    for key in node.keys():
        if fields is not None and key not in fields:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(node._get_node(key)):
            found += _keys_outside_schema(node[key], f"{prefix}{key}.")
    return found


def to_run_config(cfg: DictConfig) -> RunConfig:
    import difflib

    extra = _keys_outside_schema(cfg)
    if extra:
        guess = difflib.get_close_matches(extra[0], _known_keys(), n=1)
        hint = f" Did you mean {guess[0]}?" if guess else ""
        raise UserError(f"unknown config key {extra[0]!r}.{hint}")
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise UserError(f"{key} is required but not set: add {key}=... to the command line or the recipe.") from None


def _known_keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted key of the run schema, for "did you mean" suggestions."""
    import dataclasses

    node = node or RunConfig
    keys = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            keys += _known_keys(f.type, key + ".")
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys += _known_keys(f.default_factory, key + ".")
    return keys


def explain_compose_error(error: Exception) -> str:
    """One line for a config that failed to compose: what, which key, and the likely fix."""
    import difflib

    from hydra.errors import MissingConfigException

    cause = error.__cause__
    full_key = getattr(cause, "full_key", None) or ""
    if isinstance(error, MissingConfigException):
        recipes = sorted(p.stem for p in (RECIPES_DIR / "recipe").rglob("*.yaml"))
        return f"{str(error).splitlines()[0]}. Known recipes: {', '.join(recipes)}."
    if type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        guess = difflib.get_close_matches(full_key, _known_keys(), n=1)
        hint = f" Did you mean {guess[0]}?" if guess else ""
        return f"unknown config key {full_key!r}.{hint}"
    if full_key:
        detail = str(cause).splitlines()[0]
        return f"bad value for {full_key}: {detail}"
    return str(error).splitlines()[0]


def check_overrides(overrides: list[str]) -> None:
    """Compose once before Hydra runs, so bad overrides get our one-line message and exit code 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            to_run_config(compose(config_name="train", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(explain_compose_error(error)) from None


register_configs()


@hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="train")
def train_main(cfg: DictConfig) -> dict:
    keep_hub_code_out()
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
