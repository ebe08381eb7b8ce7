"""The one way a run's config is composed: recipes/train.yaml, a recipe, and overrides, checked
against the schemas (unknown keys get "did you mean", wrong types name the key).

`python train.py` (finetune.cli) and the Python API (finetune.api) both call `compose`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from finetune.config import RunConfig, register_configs
from finetune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config `python train.py <overrides>` would use, checked against the schemas.

    Its rules (`RunConfig.validate`) run where the run starts, so that a config can still be
    composed to plan or inspect what a run lacks (data.path, say)."""
    register_configs()
    try:
        with _beside_running_app(), initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = to_run_config(hydra_compose(config_name="train", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(explain_compose_error(error)) from None
    return cfg


@contextlib.contextmanager
def _beside_running_app():
    """Inside `python train.py` the Hydra app holds Hydra's global instance, which composing needs for
    itself: a run that starts another (model.adapter=demo trains the demo recipe first) sets the app's
    aside and puts it back afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def _keys_outside_schema(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys added with Hydra's `+key=value`: struct mode lets them in, but no schema field reads them."""
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
