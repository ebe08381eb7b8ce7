"""Exact resume, crash-safe checkpoints, graceful signals and the non-finite guard."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import finetune
import finetune.recipe
from finetune.errors import TrainingStopped, UserError
from finetune.training.checkpoint import complete_checkpoints, load_latest_checkpoint

from runner import REPO, run_train

FAST = ["train.eval_generate=0", "train.sample_prompts=[]", "train.log_every=1", "train.eval_every=0"]


def losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def sigterm_after_optimizer_steps(monkeypatch, count: int):
    """Deliver SIGTERM to ourselves right after the `count`-th optimizer step, as a pre-emption would."""
    real_build = finetune.recipe.build_optimizer

    def build(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        calls = []

        def after_step(optimizer, args, kwargs):
            calls.append(1)
            if len(calls) == count:
                os.kill(os.getpid(), signal.SIGTERM)

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(finetune.recipe, "build_optimizer", build)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    # Dropout exercises the RNG state in the checkpoint; accumulation exercises the data position.
    settings = [*FAST, "train.max_steps=6", "lora.lora_dropout=0.1", "train.gradient_accumulation_steps=2",
                "train.micro_batch_size=8", "train.seed=3"]
    whole = finetune.train("demo", [f"output_dir={tmp_path / 'whole'}", *settings])

    sigterm_after_optimizer_steps(monkeypatch, 3)
    stopped = finetune.train("demo", [f"output_dir={tmp_path / 'split'}", *settings])
    assert stopped.metrics == {"stopped_at_step": 3}
    monkeypatch.undo()
    resumed = finetune.train("demo", [f"output_dir={tmp_path / 'split'}", *settings, "train.resume=auto"])

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 6
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"output_dir={out}", "train.max_steps=100000",
                                *FAST], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM: finishing this step" in stderr and "train.resume=auto" in stdout
    latest = load_latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest[1].step >= 1


# Loads once, then forks a writer per trial: the writer is what gets `kill -9`ed, and each trial no
# longer pays ~9 s of imports and model building (10 trials took 89 s of the suite).
WRITERS = r"""
import os, sys, torch
torch.set_num_threads(1)  # no OpenMP pool for a forked child to inherit mid-work
from pathlib import Path
from finetune.adapter_format import QuantRecord
from finetune.api import compose_config
from finetune.models import build_model
from finetune.training.checkpoint import TrainerState, save_checkpoint
from finetune.training.optim import build_optimizer, build_scheduler
cfg = compose_config("demo", [])
loaded = build_model(cfg, torch.device("cpu"))
params = [p for p in loaded.model.parameters() if p.requires_grad]
optimizer = build_optimizer(params, cfg.optim, torch.device("cpu"))
scheduler = build_scheduler(optimizer, cfg.optim, 1000)
print("ready", flush=True)
for line in sys.stdin:  # one line per trial: the step to go on from
    step = int(line)
    writer = os.fork()
    if writer == 0:
        try:
            while True:
                step += 1
                for p in params:
                    p.grad = torch.randn_like(p)
                optimizer.step()
                save_checkpoint(Path(sys.argv[1]), step, loaded.model, loaded.tokenizer, QuantRecord(), optimizer,
                                scheduler, TrainerState(step, step, "h", None), keep_last=2)
        finally:
            os._exit(1)
    print(writer, flush=True)
    os.waitpid(writer, 0)
    print("dead", flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_loses_the_latest_valid_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    rng = random.Random(0)
    trials, step = 10, 0
    writers = subprocess.Popen([sys.executable, "-c", WRITERS, str(directory)], cwd=REPO, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writers.stdout.readline().strip() == "ready", writers.stderr.read()[-2000:]
        for trial in range(trials):
            writers.stdin.write(f"{step}\n")
            writers.stdin.flush()
            writer = int(writers.stdout.readline())
            time.sleep(rng.uniform(0.05, 1.5))  # somewhere inside a save, most of the time
            os.kill(writer, signal.SIGKILL)
            assert writers.stdout.readline().strip() == "dead"
            latest = load_latest_checkpoint(directory)
            if trial > 0 or latest is not None:
                assert latest is not None, f"trial {trial}: no readable checkpoint left"
                path, state, tensors = latest
                assert state.step >= step and "optimizer" in tensors
                assert load_file(path / "adapter_model.safetensors")
                step = state.step
            assert len(complete_checkpoints(directory)) <= 3  # keep_last=2, plus one published before pruning
    finally:
        writers.kill()
        writers.wait()
    assert step > 0


def poison_training_losses(monkeypatch, from_call: int, until_call: int):
    """Make the training forward return a NaN loss on some calls, as an overflow would."""
    real_build = finetune.recipe.build_model

    def build(*args, **kwargs):
        loaded = real_build(*args, **kwargs)
        model, real_forward, calls = loaded.model, loaded.model.forward, []

        def forward(*a, **k):
            out = real_forward(*a, **k)
            if model.training:
                calls.append(1)
                if from_call <= len(calls) <= until_call:
                    out.loss = out.loss * float("nan")
            return out

        model.forward = forward
        return loaded

    monkeypatch.setattr(finetune.recipe, "build_model", build)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    poison_training_losses(monkeypatch, from_call=2, until_call=3)
    result = finetune.train("demo", [f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=5"])
    assert result.metrics["nonfinite_skipped"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows if "nonfinite_skipped" in r and "final_eval_loss" not in r] == [1, 2]
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path, monkeypatch):
    poison_training_losses(monkeypatch, from_call=3, until_call=10**9)
    with pytest.raises(TrainingStopped, match="non-finite") as error:
        finetune.train("demo", [f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=50",
                                "train.max_nonfinite_steps=3"])
    latest = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest[1].step == 5 and str(latest[0]) in str(error.value)
    weights = load_file(latest[0] / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    # The first run in this process (a CLI run costs ~8 s of imports more); the refusals are the CLI's.
    finetune.train("demo", [f"output_dir={out}", *FAST, "train.max_steps=2"])
    result = run_train(f"output_dir={out}", *FAST, "train.max_steps=4", "train.resume=auto", "lora.r=4")
    assert result.returncode == 2 and "different training settings" in result.stderr
    again = run_train(f"output_dir={out}", *FAST, "train.max_steps=2")
    assert again.returncode == 2 and "train.resume=auto" in again.stderr


def test_finished_run_resumes_to_nothing(tmp_path):
    out = tmp_path / "run"
    finetune.train("demo", [f"output_dir={out}", *FAST, "train.max_steps=1"])
    before = (out / "metrics.jsonl").read_text()
    result = finetune.train("demo", [f"output_dir={out}", *FAST, "train.max_steps=1", "train.resume=auto"])
    assert result.adapter_dir == out / "adapter" and (out / "metrics.jsonl").read_text() == before


def test_overwrite_replaces_run_files_only(tmp_path):
    out = tmp_path / "run"
    finetune.train("demo", [f"output_dir={out}", *FAST, "train.max_steps=1"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run"):
        finetune.train("demo", [f"output_dir={out}", *FAST, "train.max_steps=1"])
    finetune.train("demo", [f"output_dir={out}", *FAST, "train.max_steps=2", "train.overwrite=true"])
    assert (out / "notes.txt").read_text() == "mine"
    assert [s for s, _ in losses(out)] == [1, 2]
