"""Adapters cross between the paths: native-trained ones load in peft and peft-trained ones load natively."""

import json

import pytest
import torch

from finetune.adapter_format import load_qlora_adapter
from finetune.config import ConfigError
from test_native import (checkpoints, generic_model, native_model, quantized_base, random_ids,  # noqa: F401
                         randomize_lora_B, relative_error, run_config)


def test_native_adapter_loads_in_peft_and_reproduces_its_logits(checkpoints, tmp_path):
    import peft

    model_dir = checkpoints("qwen3")
    model = native_model(model_dir, run_config(model_dir, target_modules=["q_proj", "v_proj", "down_proj"],
                                               use_rslora=True)).eval()
    randomize_lora_B(model, seed=0)
    ids = random_ids(2, 18, seed=6)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(quantized_base(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert relative_error(reloaded(input_ids=ids).logits, expected) <= 1e-3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    assert len(config["target_modules"]) == 6 and all(
        name.endswith(("q_proj", "v_proj", "down_proj")) for name in config["target_modules"])
    assert config["task_type"] == "CAUSAL_LM" and config["use_rslora"] and config["r"] == 8


def test_peft_adapter_loads_natively_and_reproduces_peft_logits(checkpoints, tmp_path):
    model_dir = checkpoints("llama")
    generic = generic_model(model_dir, run_config(model_dir, impl="hf", target_modules=["k_proj", "o_proj", "up_proj"]))
    randomize_lora_B(generic, seed=1)
    generic.save_pretrained(tmp_path / "adapter")
    ids = random_ids(2, 18, seed=7)
    with torch.no_grad():
        expected = generic.eval()(input_ids=ids).logits
    model = native_model(model_dir).eval()  # starts with all-linear adapters; loading replaces them
    load_qlora_adapter(model, tmp_path / "adapter")
    adapted = sorted({name.rsplit(".", 2)[-2] for name, p in model.named_parameters() if "lora_A" in name})
    assert adapted == ["k_proj", "o_proj", "up_proj"]
    with torch.no_grad():
        assert relative_error(model(input_ids=ids).logits, expected) <= 1e-3


def test_native_adapter_files_are_written_like_peft_writes_them(checkpoints, tmp_path):
    from safetensors import safe_open

    model_dir = checkpoints("mistral")
    native_model(model_dir).save_pretrained(tmp_path / "native")
    generic_model(model_dir, run_config(model_dir, impl="hf")).save_pretrained(tmp_path / "peft")
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("native", "peft")]
    assert configs[0].keys() == configs[1].keys()
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "task_type", "peft_type", "use_rslora", "use_dora",
                "inference_mode", "base_model_name_or_path"):
        assert configs[0][key] == configs[1][key], key
    assert sorted(configs[0]["target_modules"]) == sorted(configs[1]["target_modules"])  # peft's "all-linear"
    shapes = []
    for d in ("native", "peft"):
        with safe_open(str(tmp_path / d / "adapter_model.safetensors"), "pt") as f:
            shapes.append({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
            assert f.metadata() == {"format": "pt"}
    assert shapes[0] == shapes[1]


def test_adapters_the_native_path_cannot_run_are_refused(checkpoints, tmp_path):
    model_dir = checkpoints("llama")
    model = native_model(model_dir)
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        load_qlora_adapter(model, tmp_path / "adapter")


def test_resuming_copies_saved_adapters_into_the_same_parameters(checkpoints, tmp_path):
    from finetune.models import load_adapter_weights

    model_dir = checkpoints("qwen2")
    trained = native_model(model_dir)
    randomize_lora_B(trained, seed=2)
    trained.save_pretrained(tmp_path / "checkpoint")
    torch.manual_seed(5)  # a different fresh init, as in a new process
    resumed = native_model(model_dir)
    before = {name: p for name, p in resumed.named_parameters() if p.requires_grad}
    load_adapter_weights(resumed, tmp_path / "checkpoint")
    after = {name: p for name, p in resumed.named_parameters() if p.requires_grad}
    assert all(after[name] is param for name, param in before.items())  # the optimizer's objects
    for name, param in trained.named_parameters():
        if param.requires_grad:
            assert torch.equal(after[name], param), name
