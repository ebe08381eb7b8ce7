"""Several processes: DDP through accelerate (and torchrun) on the CPU over gloo, for the generic and
the native model; FSDP's sharding of NF4 storage and LoRA on the CPU through torch's FSDP; and both
through accelerate on two GPUs.

The yardstick everywhere is one process with the same global batch: micro-batch M and accumulation
2A in one process train the same samples as micro-batch M and accumulation A in each of two, so
the per-step losses must agree (float32 compute; the gradient sums only change order).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from finetune.errors import UserError

from runner import REPO

FAST = ["train.eval_generate=0", "train.sample_prompts=[]", "train.eval_every=0", "train.log_every=1"]
FP32 = ["quant.bnb_4bit_compute_dtype=float32", "quant.torch_dtype=float32"]
# Every layer recomputed (the native path's own checkpointing runs its backward nested in the step's,
# which each process's DDP hooks and FSDP's units must see through).
STEPS = ["train.max_steps=3", "train.micro_batch_size=4", "model.gradient_checkpointing=true",
         "model.checkpoint_layers=all"]
ONE = [*FAST, *FP32, *STEPS, "train.gradient_accumulation_steps=2"]  # one process
TWO = [*FAST, *FP32, *STEPS, "train.gradient_accumulation_steps=1"]  # each of two processes
TOLERANCE = 1e-5



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def accelerate_launch(config: str, *overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    return launch(sys.executable, "-m", "accelerate.commands.launch",
                  "--config_file", str(REPO / "recipes" / "accelerate" / config), "--num_processes", str(processes),
                  "--main_process_port", str(free_port()), str(REPO / "train.py"), *overrides)


def torchrun(script: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                  f"--master_port={free_port()}", str(script), *args, cwd=cwd)


def steps(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def evals(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def assert_same_steps(ours: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in reference] == [1, 2, 3]
    for a, b in zip(ours, reference):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=TOLERANCE), (a, b)


def assert_same_adapter(adapter_dir: Path, reference_dir: Path) -> None:
    ours = load_file(adapter_dir / "adapter_model.safetensors")
    reference = load_file(reference_dir / "adapter_model.safetensors")
    assert ours.keys() == reference.keys() and ours
    assert all(torch.allclose(ours[k], reference[k], atol=TOLERANCE, rtol=0) for k in ours)


def assert_loads_with_peft(adapter_dir: Path, reference_dir: Path) -> None:
    import peft

    model, _ = finetune.load(adapter_dir, impl="hf")  # peft reads the files, whichever path trained them
    assert isinstance(model, peft.PeftModel)
    loaded = peft.get_peft_model_state_dict(model)
    reference = load_file(reference_dir / "adapter_model.safetensors")
    assert loaded.keys() == reference.keys()
    assert all(torch.allclose(loaded[k].cpu(), reference[k], atol=TOLERANCE, rtol=0) for k in loaded)


def assert_written_once(output_dir: Path, stdout: str) -> None:
    """What only the first process writes: one copy of each file, one line per step, one console."""
    assert {p.name for p in output_dir.iterdir()} == {"adapter", "checkpoints", "config.yaml", "metrics.jsonl"}
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step-3"]
    assert not [p for p in output_dir.rglob(".*")]  # no staging directory left behind
    logged = [r["step"] for r in steps(output_dir)]
    assert logged == sorted(set(logged))
    assert stdout.count("adapter saved to") == 1 and stdout.count("global batch:") == 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference run of a model path (model.impl): one process, trained once per module."""
    runs = {}

    def run(impl: str) -> Path:
        if impl not in runs:
            runs[impl] = tmp_path_factory.mktemp(f"one-{impl}") / "run"
            finetune.train("demo", [f"output_dir={runs[impl]}", f"model.impl={impl}", *ONE])
        return runs[impl]

    return run


@pytest.fixture(scope="module", params=["hf", "native"])
def two_processes(request, tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
    impl, out = request.param, tmp_path_factory.mktemp(f"two-{request.param}") / "run"
    result = accelerate_launch("cpu.yaml", f"output_dir={out}", "train.device=cpu", f"model.impl={impl}", *TWO)
    assert result.returncode == 0, result.stderr[-3000:]
    return impl, out, result


@pytest.mark.slow
def test_ddp_trains_like_one_process_with_the_same_global_batch(one_process, two_processes):
    impl, out, result = two_processes
    assert "global batch: micro-batch 4 x accumulation 1 x 2 processes = 8 samples per optimizer step, DDP" \
        in result.stdout
    reference = one_process(impl)
    assert_same_steps(steps(out), steps(reference))
    assert evals(out) == pytest.approx(evals(reference), abs=TOLERANCE)
    assert_same_adapter(out / "adapter", reference / "adapter")


@pytest.mark.slow
def test_ddp_files_come_from_the_first_process_only(two_processes):
    _, out, result = two_processes
    assert_written_once(out, result.stdout)
    state = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["micro_batches_consumed"] == 6
    tensors = torch.load(out / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=True)
    assert len(tensors["rng_by_rank"]) == 2


@pytest.mark.slow
def test_ddp_adapter_loads_with_peft(one_process, two_processes):
    impl, out, _ = two_processes
    assert_loads_with_peft(out / "adapter", one_process(impl) / "adapter")


@pytest.mark.slow
def test_resume_needs_as_many_processes(two_processes):
    impl, out, _ = two_processes
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="trained by 2 process.*resume with 2"):
        finetune.train("demo", [f"output_dir={out}", "train.device=cpu", f"model.impl={impl}",
                                *[o for o in TWO if "max_steps" not in o], "train.max_steps=4", "train.resume=auto"])
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_ddp_resumes_exactly_under_torchrun(tmp_path):
    # Dropout draws from each process's random stream, which the checkpoint keeps per process. (On
    # the CPU the streams stay alike, as dropout takes one seed per call there; on GPUs they part.)
    # Packed rows of unequal length also exercise the data position of the global stream.
    settings = [*TWO, "lora.lora_dropout=0.1", "data.packing=true", "train.save_every=2", "train.device=cpu",
                "model.impl=hf"]
    whole = torchrun(REPO / "train.py", f"output_dir={tmp_path / 'whole'}", *settings)
    assert whole.returncode == 0, whole.stderr[-3000:]
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", split)
    shutil.rmtree(split / "checkpoints" / "step-3")  # as if stopped after step 2
    shutil.rmtree(split / "adapter")
    resumed = torchrun(REPO / "train.py", f"output_dir={split}", *settings, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 2)" in resumed.stdout
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in steps(split)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in steps(tmp_path / "whole")]
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(split / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_config_on_the_cpu_is_refused(tmp_path):
    # accelerate runs FSDP on GPUs only: on the CPU it would quietly fall back to DDP.
    result = accelerate_launch("fsdp.yaml", f"output_dir={tmp_path / 'run'}", "train.device=cpu", *TWO,
                               "quant.bnb_4bit_quant_storage=float32")
    assert result.returncode != 0 and "GPUs only" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("impl, storage, loading", [("hf", ["quant.bnb_4bit_quant_storage=float32"], "every"),
                                                    ("native", [], "first"), ("native", [], "every")])
def test_fsdp_shards_nf4_and_lora_and_trains_like_one_process(one_process, tmp_path, monkeypatch, impl, storage,
                                                             loading):
    # Run from a copy outside tests/: the script's folder goes on sys.path, where no test folder may
    # be (tests/kernels would pass for PyPI's `kernels` package, which bitsandbytes probes for).
    worker = shutil.copy(REPO / "tests" / "training" / "fsdp_cpu_worker.py", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # First, so that the demo base is built once, not by both workers at the same time.
    reference = one_process(impl)  # uint8 storage: the float32 view of the same bytes computes the same
    monkeypatch.setenv("WORKER_LOADING", loading)
    result = torchrun(Path(worker), str(out), *TWO, f"model.impl={impl}", *storage, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = json.loads((out / "shards.json").read_text())
    # "first": the second process never held a weight before FSDP filled its shard from the first.
    assert shards["built_empty"] == [False, loading == "first"]
    assert sum(shards["held"]) == shards["whole"] and max(shards["held"]) <= 0.51 * shards["whole"]
    # Gradients only for the LoRA weights, sharded too: a unit mixing frozen 4-bit codes with LoRA
    # would carry float32 gradients over the codes as well.
    assert max(shards["gradients"]) <= 0.51 * shards["trainable"]
    assert shards["gathered"] == shards["trainable"]  # saving gathers the LoRA weights, not the 4-bit base
    losses = json.loads((out / "losses.json").read_text())
    assert_same_steps(losses, steps(reference))
    assert_same_adapter(out / "adapter", reference / "adapter")
    assert_loads_with_peft(out / "adapter", reference / "adapter")
    # Resumed after step 1 from the gathered checkpoint, re-sharded: steps 2 and 3 again, exactly.
    # Step 2's loss checks the adapter, data position and RNG; step 3's, step 2's update, which
    # without the optimizer state (Adam's moments and step count) would differ.
    resumed = json.loads((out / "resumed.json").read_text())
    assert [r["step"] for r in resumed] == [2, 3]
    assert resumed == losses[1:]


@pytest.mark.slow
def test_fsdp_resumes_bitsandbytes_8bit_optimizer_states(one_process, tmp_path, monkeypatch):
    # The 70B recipe's paged_adamw_8bit keeps 8-bit states, which bitsandbytes nests inside its
    # state dict. torch's gathered FSDP optimizer state compared those nests across processes and
    # failed where a parameter straddles two shards; each process's own state has no such step.
    worker = shutil.copy(REPO / "tests" / "training" / "fsdp_cpu_worker.py", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    one_process("native")  # builds the demo base once, before both workers look for it
    monkeypatch.setenv("WORKER_OPTIMIZER", "adamw8bit")
    result = torchrun(Path(worker), str(out), *TWO, "model.impl=native", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=True)
    assert all("__bnb_optimizer_quant_state__" in s for rank in state["optimizer_by_rank"]
               for s in rank["state"].values())
    resumed = json.loads((out / "resumed.json").read_text())
    assert resumed == json.loads((out / "losses.json").read_text())[1:]


FSDP_READY = ["model.impl=hf", "quant.bnb_4bit_quant_storage=bfloat16", *FAST]


@pytest.mark.parametrize("overrides, error", [
    ([*FSDP_READY], None),
    ([*FSDP_READY, "quant.bnb_4bit_quant_storage=uint8"], "quant.bnb_4bit_quant_storage=bfloat16"),
    ([*FSDP_READY, "model.impl=native"], None),
    ([*FSDP_READY, "train.eval_generate=4"], "train.eval_generate=0"),
    ([*FSDP_READY, "lora.use_dora=true"], "use_dora"),
])
def test_fsdp_refuses_what_it_cannot_run(overrides, error):
    # What accelerate would hand two processes under recipes/accelerate/fsdp.yaml (it builds that only
    # on GPUs): the checks that run before anything loads.
    from types import SimpleNamespace

    from finetune.api import compose_config
    from finetune.training.processes import check_model_path, check_processes

    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=True)
    accelerator = SimpleNamespace(num_processes=2, mixed_precision="no", state=SimpleNamespace(fsdp_plugin=plugin))
    cfg = compose_config("demo", overrides)

    def check():
        check_processes(cfg, accelerator, True, None)
        check_model_path(cfg, True, cfg.model.impl)  # the generic path here: model.impl=hf

    if error is None:
        check()
    else:
        with pytest.raises(UserError, match=error):
            check()


@pytest.mark.parametrize("trained_fsdp, run_fsdp, error", [
    (True, False, "trained under FSDP, and this run is without it"),
    (False, True, "trained without FSDP, and this run is under FSDP"),
    (True, True, None),
])
def test_resume_needs_the_same_engine(tmp_path, trained_fsdp, run_fsdp, error):
    # An FSDP checkpoint's optimizer state is keyed by parameter name, DDP's by position.
    from types import SimpleNamespace

    from finetune.api import compose_config
    from finetune.training.checkpoint import TrainerState
    from finetune.training.processes import check_processes

    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=True)
    accelerator = SimpleNamespace(num_processes=2, mixed_precision="no", state=SimpleNamespace(fsdp_plugin=plugin))
    state = TrainerState(step=1, micro_batches_consumed=2, config_hash="", tracker_run_id=None, world_size=2,
                         fsdp=trained_fsdp)
    cfg = compose_config("demo", FSDP_READY)
    if error is None:
        check_processes(cfg, accelerator, run_fsdp, state)
    else:
        with pytest.raises(UserError, match=error):
            check_processes(cfg, accelerator, run_fsdp, state)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def one_gpu(*overrides: str) -> subprocess.CompletedProcess:
    return launch(sys.executable, str(REPO / "train.py"), *overrides)


def two_gpus_train_like_one(tmp_path, accelerate_config: str, *settings: str):
    """One GPU with accumulation 2A against two GPUs with A: same steps, one writer, same adapter."""
    one = one_gpu(f"output_dir={tmp_path / 'one'}", *ONE, *settings)
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(accelerate_config, f"output_dir={tmp_path / 'two'}", *TWO, *settings)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_steps(steps(tmp_path / "two"), steps(tmp_path / "one"))
    assert_written_once(tmp_path / "two", two.stdout)
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter")
    assert_loads_with_peft(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter")
    return two


@pytest.mark.slow
@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("impl", ["hf", "native"])
def test_ddp_on_two_gpus_trains_like_one_gpu(tmp_path, impl):
    two_gpus_train_like_one(tmp_path, "ddp.yaml", f"model.impl={impl}")


@pytest.mark.slow
@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("impl, storage", [("hf", ["quant.bnb_4bit_quant_storage=float32"]), ("native", [])])
def test_fsdp_on_two_gpus_trains_like_one_gpu(tmp_path, impl, storage):
    two = two_gpus_train_like_one(tmp_path, "fsdp.yaml", f"model.impl={impl}", *storage)
    assert "FSDP" in two.stdout


@pytest.mark.slow
@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("impl, storage", [("hf", ["quant.bnb_4bit_quant_storage=bfloat16"]), ("native", [])])
def test_fsdp_on_two_gpus_in_bfloat16(tmp_path, impl, storage):
    # The setting FSDP is for: bfloat16 compute and storage, float32 LoRA in units of their own.
    settings = [*FAST, *STEPS, f"model.impl={impl}", *storage]
    one = one_gpu(f"output_dir={tmp_path / 'one'}", *settings, "train.gradient_accumulation_steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch("fsdp.yaml", f"output_dir={tmp_path / 'two'}", *settings,
                            "train.gradient_accumulation_steps=1")
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(steps(tmp_path / "two"), steps(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)
    finetune.load(tmp_path / "two" / "adapter", impl="hf")  # loads with peft
    weights = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors").keys()
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("impl, storage", [("hf", ["quant.bnb_4bit_quant_storage=float32"]), ("native", [])])
def test_fsdp_on_two_gpus_resumes(tmp_path, impl, storage):
    # Stopped after step 1 and resumed through the recipe under FSDP: the same steps as the run
    # that never stopped (step 3's loss needs step 2's update, so the optimizer state too).
    settings = [*TWO, "train.save_every=1", "train.keep_last=3", f"model.impl={impl}", *storage]
    whole = accelerate_launch("fsdp.yaml", f"output_dir={tmp_path / 'whole'}", *settings)
    assert whole.returncode == 0, whole.stderr[-3000:]
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", split)
    for name in ("checkpoints/step-2", "checkpoints/step-3", "adapter"):
        shutil.rmtree(split / name)
    resumed = accelerate_launch("fsdp.yaml", f"output_dir={split}", *settings, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 1)" in resumed.stdout
    assert_same_steps(steps(split), steps(tmp_path / "whole"))
    assert_same_adapter(split / "adapter", tmp_path / "whole" / "adapter")
