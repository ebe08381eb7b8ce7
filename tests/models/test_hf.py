"""The generic path: real bitsandbytes NF4 storage, LoRA that starts as a no-op, learns, and reloads in peft."""

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from finetune.adapter_format import QuantRecord
from finetune.compose import compose
from finetune.models import build_model
from finetune.models.hf import load_quantized_base
from finetune.models.source import ModelSource

CPU = torch.device("cpu")


def demo_config(cache_dir, *overrides):
    # This file tests the generic path (transformers + bitsandbytes + peft) itself.
    return compose([f"cache_dir={cache_dir}", "model.impl=hf", *overrides])


@pytest.fixture(scope="module")
def loaded(cache_dir, demo_base):
    torch.manual_seed(0)
    return build_model(demo_config(cache_dir), CPU)


def quantized_linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_every_frozen_linear_is_nf4_with_double_quant(loaded):
    linears = quantized_linears(loaded.model)
    # 4 layers x 7 projections; the LM head stays in high precision as in QLoRA.
    assert len(linears) == 28
    for name, module in linears:
        state = module.weight.quant_state
        assert state.quant_type == "nf4", name
        assert state.blocksize == 64, name
        assert state.nested, name  # double quantization of the absmax constants
        assert module.weight.dtype == torch.uint8 and not module.weight.requires_grad


def test_storage_is_about_half_a_byte_per_weight(loaded):
    for name, module in quantized_linears(loaded.model):
        state = module.weight.quant_state
        weights = int(np.prod(state.shape))
        packed = module.weight.numel() * module.weight.element_size()
        blocks = weights // 64
        assert packed == weights // 2, name  # two 4-bit codes per byte
        # Double quantization: each 64-weight block's absmax is itself quantized to one byte,
        # with one fp32 scale per 256 blocks (plus a fixed 256-entry code book per layer).
        assert state.absmax.dtype == torch.uint8 and state.absmax.numel() == blocks, name
        assert state.state2.absmax.numel() == -(-blocks // 256), name
        per_weight = (packed + state.absmax.numel() + 4 * state.state2.absmax.numel()) / weights
        assert per_weight <= 0.5 + 1 / 64 + 4 / (64 * 256), name


def test_only_lora_parameters_train(loaded):
    trainable = [name for name, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)


def test_lora_b_starts_at_zero_so_step0_logits_equal_the_base(loaded, demo_base, cache_dir):
    assert all(torch.count_nonzero(p) == 0 for n, p in loaded.model.named_parameters() if "lora_B" in n)
    cfg = demo_config(cache_dir)
    base = load_quantized_base(ModelSource.from_directory(demo_base), cfg.model, cfg.quant, loaded.compute_dtype, CPU)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_loss_falls_when_overfitting_a_few_samples(cache_dir, demo_base):
    torch.manual_seed(0)
    model = build_model(demo_config(cache_dir), CPU).model
    ids = torch.randint(0, 400, (4, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_saved_adapter_reloads_in_peft_and_reproduces_logits(cache_dir, demo_base, tmp_path):
    import peft

    from finetune.training.checkpoint import save_adapter

    torch.manual_seed(0)
    cfg = demo_config(cache_dir)
    loaded = build_model(cfg, CPU)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # a non-trivial adapter, as after training
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(3))
    loaded.model.eval()
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
    adapter_dir = save_adapter(loaded.model, loaded.tokenizer, tmp_path / "adapter",
                               QuantRecord.from_config(cfg.quant, loaded.compute_dtype))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter_dir.iterdir()}

    base = load_quantized_base(ModelSource.from_directory(demo_base), cfg.model, cfg.quant, loaded.compute_dtype, CPU)
    reloaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_processes_building_the_demo_base_at_once_all_get_it(tmp_path):
    """A multi-process launch on a cold cache: every process builds the demo base, the first rename wins."""
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from finetune.demo import ensure_demo_base; "
              "print(ensure_demo_base(Path(sys.argv[1])))")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(w.wait(timeout=600), *w.communicate()) for w in workers]
    assert all(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
    model_dir = tmp_path / "demo-base-v3"
    assert {out.strip() for _, out, _ in results} == {str(model_dir)}
    assert (model_dir / "finetune_demo.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-base-v3"]  # no staging left behind
