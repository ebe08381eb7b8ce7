"""Where a base model's sizes come from without weights or network (locate_source): the demo, a
local model directory, the Hugging Face cache, the table of known hub ids."""

import json

import pytest

from finetune.compose import compose
from finetune.config import ConfigError
from finetune.models.architectures import ARCHITECTURES
from finetune.models.source import locate_source

LLAMA3_8B = ARCHITECTURES["llama3-8b"]


def config(*overrides):
    """The run config the CLI would build from these overrides."""
    return compose(["data.path=x.jsonl", *overrides])


def sizes(cfg) -> dict:
    """The architecture found offline, as the dry run finds it."""
    return locate_source(cfg.model).config


def test_hub_ids_map_to_table_architectures_offline():
    source = locate_source(config("recipe=llama70b_qlora").model)
    arch = source.config
    assert arch["hidden_size"] == 8192 and arch["num_hidden_layers"] == 80 and "llama3.3-70b" in source.described_by
    assert sizes(config("recipe=qwen2_5_7b_qlora"))["vocab_size"] == 152064
    assert sizes(config("recipe=mistral7b_qlora"))["vocab_size"] == 32768
    assert sizes(config("recipe=llama3_8b_qlora")) == ARCHITECTURES["llama3.1-8b"]


def test_local_directory_and_hf_cache_configs_are_read(tmp_path, monkeypatch):
    from huggingface_hub import constants

    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(dict(LLAMA3_8B, num_hidden_layers=2)))
    assert sizes(config(f"model.name_or_path={local}"))["num_hidden_layers"] == 2

    # The HF cache layout: models--org--name/{refs/main, snapshots/<commit>/config.json}.
    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(dict(LLAMA3_8B, num_hidden_layers=3)))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert sizes(config("model.name_or_path=acme/tiny"))["num_hidden_layers"] == 3


def test_unknown_model_names_what_was_looked_for():
    with pytest.raises(ConfigError, match=r"acme/unknown.*local directory.*Hugging Face cache.*known hub ids"):
        sizes(config("model.name_or_path=acme/unknown"))
    with pytest.raises(ConfigError, match=r"no/such/dir.*no sizes to plan with"):
        sizes(config("model.name_or_path=./no/such/dir"))


def test_demo_sizes_without_weights():
    arch = sizes(config("recipe=demo"))
    assert arch["hidden_size"] == 256 and arch["vocab_size"] == 469
