"""The Python API: the same runs as the CLI, and trained adapters back as ready-to-generate models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.hub_code import keep_hub_code_out


def compose_config(recipe: str = "demo", overrides: list[str] | tuple[str, ...] = ()):
    """The run config `python train.py recipe=<recipe> <overrides>` would use, validated against the schemas."""
    from hydra import compose, initialize_config_dir

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.cli import RECIPES_DIR, explain_compose_error, to_run_config

    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"recipe={recipe}", *overrides])
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(explain_compose_error(error)) from None
    return to_run_config(cfg)


def train(recipe: str = "demo", overrides: list[str] | tuple[str, ...] = ()):
    """Run a recipe exactly as the CLI would; returns a RunResult (output_dir, adapter_dir, metrics)."""
    from finetune.cli import quiet_libraries
    from finetune.recipe import run

    keep_hub_code_out()
    quiet_libraries()
    return run(compose_config(recipe, overrides))


def load(adapter_dir: str | Path, device: str = "auto"):
    """Load a trained adapter onto its base, quantized exactly as in training; returns (model, tokenizer).

    The base is the adapter's `base_model_name_or_path`; the 4-bit settings come from the
    adapter's finetune_quantization.json, so the model computes what was trained.
    """
    keep_hub_code_out()
    import peft
    from transformers import AutoTokenizer

    from finetune.config import Dtype, ModelConfig, QuantConfig, QuantType
    from finetune.models.hf import load_quantized_base
    from finetune.recipe import pick_device

    adapter_dir = Path(adapter_dir).expanduser()
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir} is not an adapter directory (no adapter_config.json).")
    base_dir = Path(json.loads(config_file.read_text())["base_model_name_or_path"])
    if not (base_dir / "config.json").is_file():
        raise UserError(f"the adapter's base model {base_dir} is not a local model directory; "
                        "pass the adapter of a run whose base is still on this machine.")
    quant_file = adapter_dir / "finetune_quantization.json"
    record = json.loads(quant_file.read_text()) if quant_file.is_file() else {}
    quant = QuantConfig(
        bnb_4bit_quant_type=QuantType(record.get("bnb_4bit_quant_type", "nf4")),
        bnb_4bit_use_double_quant=record.get("bnb_4bit_use_double_quant", True),
        torch_dtype=Dtype(record.get("torch_dtype", "bfloat16")),
    )
    compute_dtype = getattr(torch, record.get("bnb_4bit_compute_dtype", "bfloat16"))
    base = load_quantized_base(base_dir, ModelConfig(name_or_path=str(base_dir)), quant, compute_dtype,
                               pick_device(device))
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return model, tokenizer


def generate(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 64) -> str:
    """Greedy reply to a user message (or a whole conversation), rendered with the chat template."""
    from finetune.recipe import generate_answer

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return generate_answer(model, tokenizer, messages, max_new_tokens, next(model.parameters()).device)
