"""Preference training end to end: the demo_dpo recipe through the CLI, the objectives on both
model paths, exact resume with precomputed reference log-probs, DDP on the CPU, and FSDP on the
CPU with a starting adapter as the reference.

These read preference data through pref-data's finetune.data.preference (issue #18's data side).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from test_distributed import accelerate_launch, assert_same_adapter, assert_same_steps, evals, torchrun
from test_reliability import sigterm_after_optimizer_steps

from runner import REPO, run_train

FAST = ["train.eval_generate=0", "train.sample_prompts=[]", "train.eval_every=0", "train.log_every=1"]
FP32 = ["quant.bnb_4bit_compute_dtype=float32", "quant.torch_dtype=float32"]
# The demo's pairs from the demo base, without the SFT phase (model.adapter=demo has tests of its own).
PAIRS = ["model.adapter=null", "train.micro_batch_size=4", "train.seed=5"]


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(output_dir) -> list[dict]:
    return [row for row in metrics(output_dir) if "loss" in row]


@pytest.mark.slow
def test_demo_dpo_recipe_raises_reward_accuracy_margins_and_chosen_answers(tmp_path):
    out = tmp_path / "run"
    result = run_train("recipe=demo_dpo", f"output_dir={out}", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.adapter=demo: training the demo recipe's adapter first" in result.stdout or \
        "model.adapter: starting from" in result.stdout
    rows = train_rows(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= rows[-1].keys()
    early, late = rows[:2], rows[-2:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(late, "rewards/accuracy") > mean(early, "rewards/accuracy")
    assert mean(late, "rewards/margins") > mean(early, "rewards/margins") + 0.1
    evals = [row for row in metrics(out) if "eval_loss" in row]
    first, final = evals[0], evals[-1]
    assert final["eval_rewards/accuracy"] > first["eval_rewards/accuracy"]
    assert final["eval_rewards/margins"] > first["eval_rewards/margins"]
    assert final["chosen_wins"] > first["chosen_wins"]
    assert "chosen answers" in result.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["native", "hf"])
@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_every_objective_trains_on_both_model_paths(impl, objective, tmp_path):
    out = tmp_path / "run"
    data_format = "kto" if objective == "kto" else "preference"
    result = finetune.train("demo_dpo", [f"output_dir={out}", f"objective={objective}", f"data.format={data_format}",
                                         f"model.impl={impl}", "train.max_steps=3", *FAST, *FP32, *PAIRS])
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "rewards/chosen" in rows[-1] and "final_eval_rewards/chosen" in result.metrics
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_packed_kto_through_the_cli_trains_like_padded_kto(tmp_path):
    # A learning rate that moves the policy far enough in two steps for the KL estimate to leave 0.
    settings = ["objective=kto", "data.format=kto", "train.max_steps=3", "optim.lr=0.01", "optim.warmup_steps=0",
                *FAST, *FP32, *PAIRS]
    packed = run_train("recipe=demo_dpo", f"output_dir={tmp_path / 'packed'}", "data.packing=true", *settings)
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "= 4 completions per optimizer step" in packed.stdout
    finetune.train("demo_dpo", [f"output_dir={tmp_path / 'padded'}", "data.packing=false", *settings])
    rows, padded = train_rows(tmp_path / "packed"), train_rows(tmp_path / "padded")
    assert [r["step"] for r in rows] == [r["step"] for r in padded] == [1, 2, 3]
    assert rows[-1]["kl"] > 0.1
    for a, b in zip(rows, padded):
        # fp32 sums of ~30 token log-probs each, taken in other orders, two updates on.
        for key in ("loss", "grad_norm", "kl", "rewards/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)


@pytest.mark.slow
def test_precomputed_reference_trains_like_the_in_step_one_and_resumes_exactly(tmp_path, monkeypatch):
    settings = [*FAST, *FP32, *PAIRS, "train.max_steps=4", "lora.lora_dropout=0.1"]
    in_step = finetune.train("demo_dpo", [f"output_dir={tmp_path / 'in-step'}", *settings])
    precomputed = [*settings, "objective.precompute_reference=true"]
    whole = finetune.train("demo_dpo", [f"output_dir={tmp_path / 'whole'}", *precomputed])
    for a, b in zip(train_rows(tmp_path / "whole"), train_rows(tmp_path / "in-step")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert in_step.metrics["final_eval_loss"] == pytest.approx(whole.metrics["final_eval_loss"], abs=1e-6)
    assert (tmp_path / "whole" / "reference_logps" / "logps.safetensors").is_file()

    sigterm_after_optimizer_steps(monkeypatch, 2)
    stopped = finetune.train("demo_dpo", [f"output_dir={tmp_path / 'split'}", *precomputed])
    assert stopped.metrics == {"stopped_at_step": 2}
    monkeypatch.undo()
    resumed = finetune.train("demo_dpo", [f"output_dir={tmp_path / 'split'}", *precomputed, "train.resume=auto"])
    assert [(r["step"], r["loss"]) for r in train_rows(tmp_path / "split")] == \
        [(r["step"], r["loss"]) for r in train_rows(tmp_path / "whole")]
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_reference_cache_is_reused_and_recomputed_when_the_data_changes(tmp_path, capsys):
    settings = [f"output_dir={tmp_path / 'run'}", *FAST, *FP32, *PAIRS, "train.max_steps=1",
                "objective.precompute_reference=true"]
    finetune.train("demo_dpo", settings)
    assert "computed in" in capsys.readouterr().out
    finetune.train("demo_dpo", [*settings, "train.max_steps=2", "train.resume=auto"])
    assert "reference log-probs of 108 training pairs read from" in capsys.readouterr().out
    finetune.train("demo_dpo", [*settings, "data.max_seq_len=24", "train.overwrite=true"])
    assert "computed in" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_dpo_trains_like_one_process_with_the_same_global_batch(tmp_path):
    common = [*FAST, *FP32, *PAIRS, "train.max_steps=3", "train.device=cpu", "model.impl=native"]
    one = tmp_path / "one"
    finetune.train("demo_dpo", [f"output_dir={one}", *common, "train.gradient_accumulation_steps=2"])
    two = tmp_path / "two"
    launched_dpo_like_one_process("cpu.yaml", "DDP", two, one, common)
    for a, b in zip(train_rows(two), train_rows(one)):
        assert a["rewards/accuracy"] == b["rewards/accuracy"]


def launched_dpo_like_one_process(accelerate_config: str, engine: str, two: Path, one: Path, common: list[str]):
    """recipe=demo_dpo on two processes through accelerate (half the accumulation of `one`'s run):
    the same global batch, steps and reward margins as `one`."""
    result = accelerate_launch(accelerate_config, "recipe=demo_dpo", f"output_dir={two}", *common,
                               "train.gradient_accumulation_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"= 8 pairs per optimizer step, {engine}" in result.stdout
    assert_same_steps(train_rows(two), train_rows(one))
    for a, b in zip(train_rows(two), train_rows(one)):
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


# DPO from a starting adapter under FSDP: 3 steps of 8 pairs, the adapter moving from step 1 on.
FROM_ADAPTER = [*FAST, *FP32, "train.micro_batch_size=4", "train.seed=5", "train.max_steps=3", "train.device=cpu",
                "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def starting_adapter(tmp_path_factory):
    """A demo SFT adapter well away from LoRA's zero start, for DPO to start from and compare with."""
    out = tmp_path_factory.mktemp("sft") / "run"
    finetune.train("demo", [f"output_dir={out}", *FAST, *FP32, "train.max_steps=3", "optim.lr=1e-2"])
    return out / "adapter"


def fsdp_dpo(tmp_path, *overrides: str):
    """recipe=demo_dpo under FSDP on two CPU processes: the recipe itself, through fsdp_cpu_recipe.py."""
    # Run from a copy outside tests/: the script's folder goes on sys.path, where no test folder may
    # be (tests/kernels would pass for PyPI's `kernels` package, which bitsandbytes probes for).
    worker = shutil.copy(REPO / "tests" / "training" / "fsdp_cpu_recipe.py", tmp_path)
    result = torchrun(Path(worker), "demo_dpo", *overrides, "train.gradient_accumulation_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "= 8 pairs per optimizer step, FSDP" in result.stdout
    return result


def one_process_dpo(output_dir, *overrides: str):
    return finetune.train("demo_dpo", [f"output_dir={output_dir}", *overrides, "train.gradient_accumulation_steps=2"])


@pytest.mark.slow
def test_fsdp_dpo_from_a_starting_adapter_trains_like_one_process_and_resumes_with_it(tmp_path, starting_adapter):
    # Each process keeps its shard of the starting adapter and swaps it into FSDP's flat parameters
    # for the reference forward. Step 1 starts at the reference (margins 0); steps 2 and 3 and the
    # final evaluation compare the moved-on adapter with it.
    common = [*FROM_ADAPTER, f"model.adapter={starting_adapter}", "model.impl=native", "train.save_every=1",
              "train.keep_last=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    one_process_dpo(one, *common)
    fsdp_dpo(tmp_path, f"output_dir={two}", *common)
    assert_same_steps(train_rows(two), train_rows(one))
    for a, b in zip(train_rows(two), train_rows(one)):
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert abs(train_rows(two)[1]["rewards/margins"]) > 1e-3  # step 2 tells the starting adapter from the trained one
    assert evals(two) == pytest.approx(evals(one), abs=1e-5)
    assert_same_adapter(two / "adapter", one / "adapter")

    # Checkpoints keep every process's shard of the starting adapter: half of it each, its values.
    start = load_file(starting_adapter / "adapter_model.safetensors")
    shards = torch.load(two / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=True)["reference_by_rank"]
    held = [sum(t.numel() for t in rank.values()) for rank in shards]
    assert len(held) == 2 and sum(held) == sum(t.numel() for t in start.values()) and max(held) < sum(held)
    assert sum(float(t.double().sum()) for rank in shards for t in rank.values()) == \
        pytest.approx(sum(float(t.double().sum()) for t in start.values()), rel=1e-9)

    # Resumed after step 1 (the model loads step 1's adapter): the reference is the starting one still.
    split = tmp_path / "split"
    shutil.copytree(two, split)
    for name in ("checkpoints/step-2", "checkpoints/step-3", "adapter"):
        shutil.rmtree(split / name)
    resumed = fsdp_dpo(tmp_path, f"output_dir={split}", *common, "train.resume=auto")
    assert "(step 1)" in resumed.stdout
    keys = ("step", "loss", "grad_norm", "rewards/margins")
    assert [[r[k] for k in keys] for r in train_rows(split)] == [[r[k] for k in keys] for r in train_rows(two)]
    assert_same_adapter(split / "adapter", two / "adapter")


@pytest.mark.slow
@pytest.mark.parametrize("impl, storage", [("native", []), ("hf", ["quant.bnb_4bit_quant_storage=float32"])])
def test_fsdp_precomputes_a_starting_adapters_reference_like_one_process(tmp_path, starting_adapter, impl, storage):
    # The processes compute the table together (each forward gathers from both), the first writes it.
    common = [*FROM_ADAPTER, f"model.adapter={starting_adapter}", f"model.impl={impl}", *storage,
              "objective.precompute_reference=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    one_process_dpo(one, *common)
    result = fsdp_dpo(tmp_path, f"output_dir={two}", *common)
    assert "reference log-probs of 108 training pairs computed in" in result.stdout
    ours, reference = (load_file(run / "reference_logps" / "logps.safetensors") for run in (two, one))
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)
    assert_same_steps(train_rows(two), train_rows(one))
    # Resumed for a step more: the starting adapter's shards from the checkpoint, the table from the file.
    again = fsdp_dpo(tmp_path, f"output_dir={two}", *common, "train.max_steps=4", "train.resume=auto")
    assert "reference log-probs of 108 training pairs read from" in again.stdout
    assert [r["step"] for r in train_rows(two)] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("impl, storage", [("native", []), ("hf", ["quant.bnb_4bit_quant_storage=float32"])])
def test_fsdp_dpo_on_two_gpus_trains_like_one_gpu(tmp_path, starting_adapter, impl, storage):
    # The shipped recipes/accelerate/fsdp.yaml through accelerate, as users launch it (the CPU tests
    # above stand FSDP in through fsdp_cpu_recipe.py): DPO from a starting adapter, fp32.
    common = [*[o for o in FROM_ADAPTER if o != "train.device=cpu"], f"model.adapter={starting_adapter}",
              f"model.impl={impl}", *storage]
    one, two = tmp_path / "one", tmp_path / "two"
    one_process_dpo(one, *common)
    launched_dpo_like_one_process("fsdp.yaml", "FSDP", two, one, common)
    assert_same_adapter(two / "adapter", one / "adapter")
