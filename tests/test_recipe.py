"""Each phase of the recipe alone: processes, model, data, set-up, one step, evaluation, checkpoint,
resume. The whole job, end to end, is tests/test_train_cli.py's."""

import math

import pytest
import torch

from finetune import recipe
from finetune.api import compose_config
from finetune.models import TrainableModel
from finetune.training.objective import SupervisedFineTuning
from finetune.training.processes import start_processes
from finetune.training.run_dir import plan_run_dir
from finetune.training.step import train_step

FAST = ["train.eval_generate=2", "train.sample_prompts=[]", "train.max_steps=4", "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=2"]


def demo(tmp_path, cache_dir, *overrides):
    cfg = compose_config("demo", [f"output_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}", *FAST, *overrides])
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache_dir):
    """The phases up to the loop, on the demo recipe: config, processes, model, data."""
    tmp_path = tmp_path_factory.mktemp("phases")
    cfg = demo(tmp_path, cache_dir)
    processes = start_processes(cfg)
    recipe.seed_everything(cfg.train.seed)
    loaded = recipe.load_model(cfg, processes)
    data = recipe.load_data(cfg, loaded.tokenizer, processes)
    return cfg, processes, loaded, data


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_both_model_paths_meet_the_contract(tmp_path, cache_dir, impl):
    cfg = demo(tmp_path, cache_dir, f"model.impl={impl}")
    loaded = recipe.load_model(cfg, start_processes(cfg))
    model = loaded.model
    assert isinstance(model, TrainableModel)
    state = model.adapter_state()
    assert state and all(key.startswith("base_model.model.") and ".lora_" in key for key in state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == trainable
    # The demo's weights and adapters, 4-bit ones counted unpacked however their codes are stored.
    assert model.param_count() == 3_490_560 and trainable == 299_008
    model.load_adapter_state({key: torch.zeros_like(t) for key, t in state.items()})
    assert all(float(t.detach().abs().sum()) == 0 for t in model.adapter_state().values())
    model.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_data_phase_gives_a_seeded_stream_of_micro_batches(built):
    cfg, _, _, data = built
    batch = next(data.batches)
    assert batch["input_ids"].shape[0] == cfg.train.micro_batch_size
    assert len(data.eval_samples) > 0 and data.pad_id is not None


def test_one_step_is_one_big_batch_and_skips_non_finite_updates(built):
    cfg, processes, loaded, data = built
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [next(data.batches) for _ in range(2)]
    objective = SupervisedFineTuning()

    # The reference: the summed token loss of both micro-batches over all their targets, at once.
    model.train()
    torch.manual_seed(0)
    targets = objective.targets(batches)
    reference = sum(objective.loss(model, b, processes.device, model.takes_packed_boundaries, 1)[0]
                    for b in batches)
    (reference / targets).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            self.seen = [p.grad.clone() for p in params]
            return super().step(closure)

    before = [p.detach().clone() for p in params]
    optimizer = Recording(params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(0)
    result = train_step(model, optimizer, scheduler, objective, batches, processes, model.takes_packed_boundaries,
                        max_grad_norm=0.0)
    assert result.applied and math.isclose(result.loss, float(reference / targets), rel_tol=1e-6)
    for got, want in zip(optimizer.seen, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params)  # flushed after the step

    class Poisoned(SupervisedFineTuning):
        def loss(self, *args):
            loss, metrics = super().loss(*args)
            return loss * float("nan"), metrics

    optimizer.param_groups[0]["lr"] = 1.0
    result = train_step(model, optimizer, scheduler, Poisoned(), batches, processes, model.takes_packed_boundaries,
                        max_grad_norm=1.0)
    assert not result.applied
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the poisoned update never landed


def test_set_up_evaluate_checkpoint_and_resume(tmp_path, cache_dir):
    cfg = demo(tmp_path, cache_dir)
    processes = start_processes(cfg)
    run_dir = plan_run_dir(cfg)
    loaded = recipe.load_model(cfg, processes)
    data = recipe.load_data(cfg, loaded.tokenizer, processes)
    training = recipe.Training.set_up(cfg, run_dir, processes, loaded, data, started=0.0)
    assert (run_dir.path / "config.yaml").is_file()  # created by the set-up, not before
    metrics = training.evaluate(step=0)
    assert metrics["eval_loss"] > 0 and "exact_match" in metrics and len(training.answerable) == 2
    first_batch = next(data.batches)
    training.state.step, training.state.micro_batches_consumed = 1, 1
    saved_at = training.save_checkpoint(1)
    assert (saved_at / "adapter_model.safetensors").is_file()
    adapter = {k: v.detach().clone() for k, v in loaded.model.adapter_state().items()}

    # A second process of the same command, resuming: the state, the adapter and the data position.
    cfg = demo(tmp_path, cache_dir, "train.resume=auto")
    run_dir = plan_run_dir(cfg)
    assert run_dir.checkpoint == saved_at
    resumed = recipe.load_model(cfg, processes)
    resumed_data = recipe.load_data(cfg, resumed.tokenizer, processes)
    optimizer = torch.optim.AdamW([p for p in resumed.model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = recipe.resume(cfg, run_dir, resumed, scheduler, resumed_data, processes)
    assert state.step == 1 and state.micro_batches_consumed == 1
    for key, value in resumed.model.adapter_state().items():
        assert torch.equal(value, adapter[key]), key
    assert not torch.equal(next(resumed_data.batches)["input_ids"], first_batch["input_ids"])


def test_dry_run_phase_plans_without_loading_or_data(tmp_path, cache_dir):
    cfg = compose_config("llama70b_qlora", ["hardware.gpu_memory_gb=24", f"output_dir={tmp_path / 'never'}",
                                             "train.dry_run=true"])
    cfg.validate()  # no data.path: the plan does not need one
    result = recipe.dry_run(cfg)
    assert result.adapter_dir is None and result.metrics["gpu_budget_gib"] == 24
    assert not (tmp_path / "never").exists()


def test_steps_run_with_the_long_lived_heap_frozen_out_of_the_collector(tmp_path, cache_dir, monkeypatch):
    """The loop's steps run under steady_heap: what was alive at the start (model, optimizer, data)
    is out of the cyclic collector's reach, which still collects what a step leaves; after the loop
    the heap is as before."""
    import gc

    from finetune.training.step import steady_heap

    class Cycle:
        def __init__(self):
            self.me = self

    with steady_heap():
        frozen = gc.get_freeze_count()
        garbage = Cycle()
        del garbage
        assert frozen > 1000 and gc.collect() >= 1  # the dropped cycle is still found
    assert gc.get_freeze_count() == 0

    cfg = demo(tmp_path, cache_dir, "train.max_steps=2", "train.eval_every=0")
    processes = start_processes(cfg)
    loaded = recipe.load_model(cfg, processes)
    data = recipe.load_data(cfg, loaded.tokenizer, processes)
    training = recipe.Training.set_up(cfg, plan_run_dir(cfg), processes, loaded, data, started=0.0)
    frozen_during_steps = []

    def step_counting_frozen(*args, **kwargs):
        frozen_during_steps.append(gc.get_freeze_count())
        return train_step(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_step", step_counting_frozen)
    training.loop()
    assert len(frozen_during_steps) == 2 and min(frozen_during_steps) > 1000
    assert gc.get_freeze_count() == 0
