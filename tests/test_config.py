"""Every recipe composes against the schemas; bad keys, types and values fail clearly."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from finetune.compose import RECIPES_DIR, to_run_config
from finetune.config import ConfigError, Optimizer, RunConfig, register_configs
from finetune.errors import UserError

RECIPES = sorted(p.stem for p in (RECIPES_DIR / "recipe").rglob("*.yaml"))


def compose_run(*overrides: str):
    # Registered here rather than left to whichever import did it first: under Hydra 1.4.0rc3
    # this file failed to find the group schemas without it.
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_recipe_glob_finds_every_recipe():
    # Recursive glob, and an exact count: a recipe added or lost must be noticed here.
    assert RECIPES == ["demo", "demo_dpo", "llama3_8b_dpo", "llama3_8b_qlora", "llama70b_dpo", "llama70b_qlora",
                       "mistral7b_qlora", "qwen2_5_7b_qlora"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose_run(f"recipe={recipe}", "data.path=train.jsonl", "output_dir=/tmp/x")
    run = to_run_config(cfg)
    assert isinstance(run, RunConfig)
    assert run.name == recipe
    run.validate()
    assert run.quant.bnb_4bit_quant_type.value == "nf4" and run.quant.bnb_4bit_use_double_quant
    assert run.lora.target_modules == "all-linear"


def test_demo_is_the_default_recipe():
    assert to_run_config(compose_run()).name == "demo"


def test_real_recipes_use_practitioner_settings():
    big = to_run_config(compose_run("recipe=llama70b_qlora", "data.path=x"))
    small = to_run_config(compose_run("recipe=llama3_8b_qlora", "data.path=x"))
    assert big.optim.name is Optimizer.paged_adamw_8bit
    assert big.optim.lr < small.optim.lr
    assert big.train.micro_batch_size * big.train.gradient_accumulation_steps >= 8


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.startswith("demo")])
def test_a_group_chosen_on_the_command_line_beats_the_recipes_choice(recipe):
    # The real recipes pick paged 8-bit AdamW; optim=adamw must still give AdamW, with the
    # recipe's own learning rate and schedule.
    recipe_only = to_run_config(compose_run(f"recipe={recipe}", "data.path=x"))
    chosen = to_run_config(compose_run(f"recipe={recipe}", "optim=adamw", "data.path=x"))
    assert recipe_only.optim.name is Optimizer.paged_adamw_8bit and chosen.optim.name is Optimizer.adamw
    assert chosen.optim.lr == recipe_only.optim.lr and chosen.optim.warmup_steps == recipe_only.optim.warmup_steps


def test_unknown_key_fails_at_compose_naming_it():
    with pytest.raises(ConfigCompositionException, match="lora.rank"):
        compose_run("lora.rank=8")


def test_wrong_type_fails_at_compose_naming_it():
    with pytest.raises(ConfigCompositionException, match="lora.r"):
        compose_run("lora.r=big")


def test_value_outside_choices_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="optim.scheduler"):
        compose_run("optim.scheduler=exponential")


def test_missing_required_value_names_the_key():
    with pytest.raises(UserError, match="data.path"):
        to_run_config(compose_run("recipe=llama3_8b_qlora")).validate()


@pytest.mark.parametrize(
    "override, key",
    [("optim.lr=-1e-4", "optim.lr"), ("lora.r=0", "lora.r"), ("train.micro_batch_size=0", "train.micro_batch_size"),
     ("lora.lora_dropout=1.5", "lora.lora_dropout"), ("data.max_seq_len=2", "data.max_seq_len")],
)
def test_range_checks_name_the_key(override, key):
    run = to_run_config(compose_run(override))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run.validate()


def test_resolved_config_round_trips(tmp_path: Path):
    run = to_run_config(compose_run("lora.r=8"))
    OmegaConf.save(OmegaConf.structured(run), tmp_path / "config.yaml")
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(tmp_path / "config.yaml")))
    assert again == run


@pytest.mark.parametrize("objective", ["sft", "dpo", "ipo", "orpo", "simpo", "kto"])
def test_every_objective_composes_with_its_data_format(objective):
    data_format = {"sft": "messages", "kto": "kto"}.get(objective, "preference")
    run = to_run_config(compose_run(f"objective={objective}", f"data.format={data_format}", "data.path=x"))
    run.validate()
    assert run.objective.name.value == objective
