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


def load(path: str | Path, device: str = "auto", impl: str = "auto"):
    """Load a trained adapter onto its base, or a merged model, ready to generate; returns (model, tokenizer).

    An adapter directory: the base is the adapter's `base_model_name_or_path`, quantized with the
    settings of the adapter's finetune_quantization.json, so the model computes what was trained;
    `impl` picks the model path as training does (auto: native wherever it applies). A model
    directory without an adapter (a merge's output) loads unquantized through transformers.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        # Before the imports below, which take seconds.
        raise UserError(f"{path} does not exist: pass a run's adapter directory or a merged model's directory")
    keep_hub_code_out()
    from finetune.config import ModelImpl
    from finetune.training.processes import pick_device

    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        return _load_merged(path, pick_device(device))
    try:
        chosen = ModelImpl(impl)
    except ValueError:
        raise UserError(f"impl={impl!r} is not one of {[m.value for m in ModelImpl]}") from None
    return _load_adapter(path, pick_device(device), chosen)


def _load_adapter(adapter_dir: Path, device: torch.device, impl):
    # Only now: peft and the model paths import bitsandbytes, which must not fetch hub kernels.
    import peft
    from transformers import AutoTokenizer

    from finetune.config import ModelImpl
    from finetune.models import build_model, choose_impl, load_adapter_weights
    from finetune.models.native import MemoryLayout
    from finetune.models.hf import load_quantized_base
    from finetune.plan.memory import decide_memory_layout

    cfg, source = adapter_run_config(adapter_dir, impl)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if choose_impl(cfg, source)[0] is ModelImpl.native:
        # The memory plan decides, as for training, whether the 4-bit layers must stream from host
        # memory (a 70B on a 24 GB card); generation then streams them once per step for the batch.
        layout = decide_memory_layout(cfg, source, ModelImpl.native, "finetune.load", device, [])
        model = build_model(cfg, device, layout=MemoryLayout(stream_weights=layout.stream_weights), source=source,
                            impl=ModelImpl.native).model
        load_adapter_weights(model, adapter_dir)
        return model.eval(), tokenizer
    compute_dtype = getattr(torch, cfg.quant.bnb_4bit_compute_dtype.value)
    base = load_quantized_base(source, cfg.model, cfg.quant, compute_dtype, device)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer


def adapter_run_config(adapter_dir: Path, impl):
    """(RunConfig, ModelSource) that rebuild an adapter's model as it was trained: its local base,
    the quantization of its finetune_quantization.json and its LoRA settings."""
    from finetune.adapter_format import QuantRecord, read_config
    from finetune.config import LoraConfig, ModelConfig, ModelImpl, QuantConfig, RunConfig
    from finetune.models.source import ModelSource

    adapter = read_config(adapter_dir)
    base_dir = Path(adapter["base_model_name_or_path"])
    if not (base_dir / "config.json").is_file():
        raise UserError(f"the adapter's base model {base_dir} is not a local model directory; "
                        "pass the adapter of a run whose base is still on this machine.")
    record = QuantRecord.read(adapter_dir)
    quant = QuantConfig(
        bnb_4bit_quant_type=record.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=record.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=record.bnb_4bit_compute_dtype,
        torch_dtype=record.torch_dtype,
    )
    # The native path attaches one rank and scaling to every targeted layer; peft loads anything else.
    uniform = not adapter.get("rank_pattern") and not adapter.get("alpha_pattern")
    cfg = RunConfig(name="load", output_dir="unused", quant=quant,
                    model=ModelConfig(name_or_path=str(base_dir), impl=impl if uniform else ModelImpl.hf,
                                      gradient_checkpointing=False),
                    lora=LoraConfig(r=adapter["r"], lora_alpha=adapter["lora_alpha"],
                                    target_modules=adapter["target_modules"],
                                    use_rslora=bool(adapter.get("use_rslora")), use_dora=bool(adapter.get("use_dora"))))
    return cfg, ModelSource.from_directory(base_dir)


def _load_merged(model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config import Dtype
    from finetune.models import choose_compute_dtype

    # A device without bf16 computes in float32, as training does there.
    dtype, _ = choose_compute_dtype(Dtype.bfloat16, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device})
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def generate(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 64, **sampling) -> str:
    """Reply to a user message (or a whole conversation), rendered with the chat template; greedy
    unless `sampling` says otherwise (finetune.generation.Sampling's fields: temperature, top_p, ...)."""
    from finetune.generation import chat_replies
    from finetune.sampling import Sampling

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return chat_replies(model, tokenizer, [messages], Sampling(max_new_tokens=max_new_tokens, **sampling))[0]
