"""The real CLI trains the demo on the native path and writes an adapter peft can load."""

import json
import os
import subprocess
import sys

import pytest
from runner import REPO


def run_train(*overrides: str) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_demo_trains_natively_end_to_end(tmp_path, cache_dir, demo_base):
    import peft
    import torch

    from finetune.config import ModelConfig, QuantConfig
    from finetune.models import hf
    from finetune.models.source import ModelSource

    out = tmp_path / "run"
    result = run_train("model.impl=native", f"output_dir={out}", f"cache_dir={cache_dir}", "train.max_steps=5",
                       "train.log_every=1", "train.eval_generate=2")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert len(losses) == 5 and all(loss == loss for loss in losses)  # five finite steps
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(demo_base)
    base = hf.load_quantized_base(ModelSource.from_directory(demo_base), ModelConfig(name_or_path=str(demo_base)), QuantConfig(),
                                  torch.float32, torch.device("cpu"))
    peft.PeftModel.from_pretrained(base, out / "adapter")  # loads without missing or unexpected keys
