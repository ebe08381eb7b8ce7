"""The Python API: train through the same config path as the CLI, load back, generate; sweeps."""

import json

import pytest
import torch

import finetune
from finetune.api import adapter_run_config
from finetune.config import ModelImpl
from finetune.plan.memory import decide_memory_layout
from finetune.errors import UserError
from finetune.evaluate import generate_answer

from runner import run_train


@pytest.mark.slow
def test_train_then_load_round_trip(tmp_path, cache_dir):
    result = finetune.train("demo", [f"output_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}",
                                     "train.max_steps=3", "train.eval_generate=0"])
    assert result.adapter_dir == tmp_path / "run" / "adapter" and result.adapter_dir.is_dir()
    assert {"final_eval_loss", "best_eval_loss", "time_s"} <= result.metrics.keys()
    model, tokenizer = finetune.load(result.adapter_dir)
    answer = generate_answer(model, tokenizer, [{"role": "user", "content": "Where does the frog live?"}], 4)
    assert isinstance(answer, str)
    # On a GPU, load plans the memory layout from the saved adapter's settings (only CUDA plans):
    # its target_modules, our layers' full names, once stopped every GPU load there.
    cfg, source = adapter_run_config(result.adapter_dir, ModelImpl.auto)
    layout = decide_memory_layout(cfg, source, ModelImpl.native, "finetune.load", torch.device("cuda"), [])
    assert not layout.stream_weights and not layout.park_checkpoints  # the demo fits any card


def test_api_rejects_unknown_keys_naming_them():
    with pytest.raises(UserError, match="lora.rnk"):
        finetune.train("demo", ["lora.rnk=3"])


def test_load_refuses_a_non_adapter_directory(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        finetune.load(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path / 'missing'} does not exist: pass a run's adapter directory"):
        finetune.load(tmp_path / "missing")


@pytest.mark.slow
def test_sweep_runs_every_combination_into_its_own_dir(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_train("-m", f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}", "train.max_steps=2",
                       "train.eval_generate=0", "lora.r=4,8", "optim.lr=1e-4,2e-4", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(runs) == 4
    for run in runs:
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    ranks = sorted(json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] for run in runs)
    assert ranks == [4, 4, 8, 8]
    summary = [json.loads(line) for line in (sweep_dir / "summary.jsonl").read_text().splitlines()]
    assert len(summary) == 4 and all(row["status"] == "ok" for row in summary)
    assert "sweep summary (4 runs" in result.stdout
