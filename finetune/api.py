"""The Python API: the same runs as the CLI, and trained adapters back as ready-to-generate models."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.compose import compose
from finetune.errors import UserError
from finetune.hub_code import keep_hub_code_out


def compose_config(recipe: str = "demo", overrides: list[str] | tuple[str, ...] = ()):
    """The run config `python train.py recipe=<recipe> <overrides>` would use, validated against the schemas."""
    return compose([f"recipe={recipe}", *overrides])


def train(recipe: str = "demo", overrides: list[str] | tuple[str, ...] = ()):
    """Run a recipe exactly as the CLI would; returns a RunResult (output_dir, adapter_dir, metrics)."""
    keep_hub_code_out()
    # Only now: the recipe imports bitsandbytes, which must not fetch hub kernels.
    from finetune.cli import quiet_libraries
    from finetune.recipe import run

    quiet_libraries()
    return run(compose_config(recipe, overrides))


def load(adapter_dir: str | Path, device: str = "auto"):
    """Load a trained adapter onto its base, quantized exactly as in training; returns (model, tokenizer).

    The base is the adapter's `base_model_name_or_path`; the 4-bit settings come from the
    adapter's finetune_quantization.json, so the model computes what was trained.
    """
    keep_hub_code_out()
    # Only now: peft and the model path import bitsandbytes, which must not fetch hub kernels.
    import peft
    from transformers import AutoTokenizer

    from finetune.adapter_format import QuantRecord, read_config
    from finetune.config import ModelConfig, QuantConfig
    from finetune.models.hf import load_quantized_base
    from finetune.models.source import ModelSource
    from finetune.training.processes import pick_device

    adapter_dir = Path(adapter_dir).expanduser()
    base_dir = Path(read_config(adapter_dir)["base_model_name_or_path"])
    if not (base_dir / "config.json").is_file():
        raise UserError(f"the adapter's base model {base_dir} is not a local model directory; "
                        "pass the adapter of a run whose base is still on this machine.")
    record = QuantRecord.read(adapter_dir)
    quant = QuantConfig(
        bnb_4bit_quant_type=record.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=record.bnb_4bit_use_double_quant,
        torch_dtype=record.torch_dtype,
    )
    compute_dtype = getattr(torch, record.bnb_4bit_compute_dtype.value)
    base = load_quantized_base(ModelSource.from_directory(base_dir), ModelConfig(name_or_path=str(base_dir)), quant,
                               compute_dtype, pick_device(device))
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return model, tokenizer


def generate(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 64) -> str:
    """Greedy reply to a user message (or a whole conversation), rendered with the chat template."""
    from finetune.evaluate import generate_answer

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return generate_answer(model, tokenizer, messages, max_new_tokens, next(model.parameters()).device)
