"""QLoRA fine-tuning, top to bottom: set up, evaluate, train, evaluate, save.

`run(cfg)` is the whole job as a sequence of named phases; train.py only composes the config and
calls it. Each phase is a function (or a method of `Training`, the state they share once the
model, data and optimizer exist) that can be called alone.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from finetune import data as data_lib
from finetune.adapter_format import QuantRecord, read_config
from finetune.config import ConfigError, ModelImpl, ObjectiveName, RunConfig
from finetune.errors import TrainingStopped
from finetune.evaluate import evaluate_loss, evaluate_objective, exact_match, format_metrics, preference_wins
from finetune.generation import chat_replies, pad_id
from finetune.hub_code import keep_hub_code_out
from finetune.io import IfExists, atomic_dir
from finetune.models import (LoadedModel, MemoryLayout, Placement, build_model, choose_impl, load_adapter_weights,
                              load_tokenizer)
from finetune.models.source import ModelSource, resolve_source
from finetune.plan import memory, perf
from finetune.sampling import Sampling
from finetune.tracking import Trackers, open_trackers
from finetune.training.checkpoint import (TrainerState, gather_trainable_state, optimizer_state_on_cpu,
                                          restore_rng_states, rng_states, save_adapter, save_checkpoint,
                                          saved_optimizer_state)
from finetune.training import reference_cache
from finetune.training.objective import Objective, Reference, build_objective
from finetune.training.optim import build_optimizer, build_scheduler
from finetune.training.processes import (Processes, check_model_path, memory_line, peak_memory_gib,
                                         reset_peak_memory, start_processes, synchronize, wrap_for_processes)
from finetune.training.run_dir import RunDir, logged_evals, plan_run_dir, start_run_dir
from finetune.training.signals import StopRequests
from finetune.training.step import StepResult, steady_heap, train_step


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path | None  # None when data.preview stopped the run before training
    metrics: dict = field(default_factory=dict)  # final eval metrics, plus summary figures


def run(cfg: RunConfig) -> RunResult:
    cfg.validate()
    if cfg.train.dry_run:
        return dry_run(cfg)
    run_dir = plan_run_dir(cfg)  # refuses unsafe output_dirs, finds the checkpoint to resume; writes nothing
    seed_everything(cfg.train.seed)
    processes = start_processes(cfg, run_dir.resumed_state)
    started = time.perf_counter()
    model_plan = plan_model(cfg, processes)
    tokenizer = load_tokenizer(cfg, model_plan.source)
    # Before the weights load (minutes for a large base): a mistake in the data stops the run at once.
    data = load_data(cfg, tokenizer, processes)
    if "vocab_size" in model_plan.source.config:
        data_lib.check_vocabulary({"train": data.train_samples, "eval": data.eval_samples},
                                  model_plan.source.config["vocab_size"])
    if cfg.data.preview:
        processes.say(data_lib.preview(data.train_samples[: cfg.data.preview], tokenizer, color=sys.stdout.isatty()))
        return RunResult(run_dir.path, adapter_dir=None)
    loaded = load_model(cfg, processes, model_plan, tokenizer)
    training = Training.set_up(cfg, run_dir, processes, loaded, data, started)
    if training is None:
        return RunResult(run_dir.path, run_dir.path / "adapter")
    if run_dir.checkpoint is None:
        training.evaluate_before()
    stopped_at = training.loop()
    if stopped_at is not None:
        return RunResult(run_dir.path, None, {"stopped_at_step": stopped_at})
    return training.finish()


def dry_run(cfg: RunConfig) -> RunResult:
    """The memory plan alone: no weights loaded, nothing written."""
    plan = memory.plan_offline(cfg)
    print(memory.format_plan(plan))
    return RunResult(Path(cfg.output_dir).expanduser(), None, plan.figures())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class ModelPlan:
    """How the model will load, settled from its config before any weight is read."""

    source: ModelSource
    impl: ModelImpl
    layout: MemoryLayout
    placement: Placement


def plan_model(cfg: RunConfig, processes: Processes) -> ModelPlan:
    """The checkpoint found and checked against the run, the model path `choose_impl` picks, and the
    memory layout; the choices said as notes."""
    with processes.accelerator.main_process_first():  # the first fills the shared caches (demo base, hub files)
        source = resolve_source(cfg.model, cfg.cache_dir)
    source.check_sequence_length(cfg.data.max_seq_len)
    impl, why = choose_impl(cfg, source)
    check_model_path(cfg, processes.fsdp, impl)
    notices = [f"model.impl=auto: the {impl.value} model path ({why.removeprefix('model.impl=auto: ')})."] \
        if cfg.model.impl is ModelImpl.auto else []
    layout = memory.decide_memory_layout(cfg, source, impl, why, processes.device, notices)
    for notice in notices:
        processes.say(f"note: {notice}")
    # FSDP with fsdp_cpu_ram_efficient_loading (as the shipped configs): the first process loads the
    # base into host memory, the others build it empty; FSDP moves each unit to the GPU, broadcasts
    # the first process's values (sync_module_states) and shards it. No GPU ever holds the whole base.
    first_loads = processes.fsdp and processes.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    placement = Placement.device if not first_loads else Placement.host if processes.is_main else Placement.empty
    return ModelPlan(source, impl, layout, placement)


def load_model(cfg: RunConfig, processes: Processes, plan: ModelPlan | None = None, tokenizer=None) -> LoadedModel:
    """The frozen 4-bit base with LoRA attached, as `plan` (plan_model's, made here if not given) says."""
    plan = plan or plan_model(cfg, processes)
    keep_hub_code_out()  # the first import of bitsandbytes: train.py's CLI leaves it to here
    loaded = build_model(cfg, processes.device, plan.placement, plan.layout, plan.source, plan.impl, tokenizer)
    for notice in loaded.notices:
        processes.say(f"note: {notice}")
    if cfg.model.adapter:
        start_from_adapter(cfg, loaded, processes)
    model = loaded.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.param_count()
    processes.say(f"model: {loaded.model_dir} on {processes.device} ({loaded.compute_dtype}), trainable "
                  f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%), "
                  f"{memory_line(model, processes.device)}")
    return loaded


def start_from_adapter(cfg: RunConfig, loaded: LoadedModel, processes: Processes) -> None:
    """model.adapter: its weights into the trainable adapter, which trains on from there."""
    adapter_dir = demo_adapter(cfg.cache_dir, processes) if cfg.model.adapter == "demo" \
        else Path(cfg.model.adapter).expanduser()
    saved = read_config(adapter_dir)
    for key in ("r", "lora_alpha", "use_rslora"):
        ours = getattr(cfg.lora, key)
        if key in saved and saved[key] != ours:
            raise ConfigError(f"model.adapter={adapter_dir} has {key}={saved[key]}, this run lora.{key}={ours}: "
                              f"pass lora.{key}={saved[key]} to train on from it.")
    load_adapter_weights(loaded.model, adapter_dir)
    processes.say(f"model.adapter: starting from {adapter_dir}")


# model.adapter=demo: the demo recipe's adapter after this many steps (short of its 300, so that
# preference tuning has something left to improve: it answers about 39% of held-out questions).
DEMO_SFT_STEPS = 150


def demo_adapter(cache_dir: str, processes: Processes) -> Path:
    """The demo recipe's adapter after DEMO_SFT_STEPS, trained on first use and kept in cache_dir."""
    from finetune.compose import compose
    from finetune.demo import DEMO_VERSION

    target = Path(cache_dir).expanduser() / f"demo-sft-v{DEMO_VERSION}-{DEMO_SFT_STEPS}steps"
    if (target / "adapter" / "adapter_config.json").is_file():
        return target / "adapter"
    if processes.world > 1:
        raise ConfigError("model.adapter=demo trains the demo adapter first, in one process: run "
                          "`python train.py recipe=demo_dpo train.max_steps=1` once, then launch.")
    processes.say(f"model.adapter=demo: training the demo recipe's adapter first ({DEMO_SFT_STEPS} steps), "
                  f"kept in {target}")
    overrides = ["recipe=demo", f"train.max_steps={DEMO_SFT_STEPS}", "train.eval_every=0", "train.eval_generate=0",
                 "train.sample_prompts=[]", "tracker=none", f"cache_dir='{cache_dir}'"]
    # Its own random streams: the run that asked for it draws the same numbers whether it was cached or not.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(), atomic_dir(target, IfExists.keep) as staging:
        run(compose([*overrides, f"output_dir='{staging}'"]))
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return target / "adapter"


@dataclass
class Data:
    train_samples: object  # SFT samples, or preference pairs (KTO rows)
    eval_samples: object
    pad_id: int
    batches: object  # the seeded, endless stream of training micro-batches
    preference: bool = False


def load_data(cfg: RunConfig, tokenizer, processes: Processes) -> Data:
    data_lib.use_data_chat_template(tokenizer, cfg.data)
    preference = cfg.objective.name is not ObjectiveName.sft
    load = data_lib.load_preference_splits if preference else data_lib.load_splits
    with processes.accelerator.main_process_first():  # tokenized once, by the first process; the others read its cache
        train_samples, eval_samples, report = load(cfg.data, tokenizer, cfg.train.seed, cfg.cache_dir)
    for line in report:
        processes.say(f"data {line}")
    pad = pad_id(tokenizer)
    stream = data_lib.preference_batches if preference else data_lib.train_batches
    batches = stream(train_samples, cfg.data, cfg.train.micro_batch_size, pad, cfg.train.seed)
    return Data(train_samples, eval_samples, pad, batches, preference)


@dataclass
class Training:
    """What the loop, evaluation and checkpoints share once the model, data and optimizer exist."""

    cfg: RunConfig
    run_dir: RunDir
    processes: Processes
    model: torch.nn.Module  # as wrapped for the processes (DDP, FSDP), or the model itself
    loaded: LoadedModel  # the model as built: generation, saving
    data: Data
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainerState
    tracker: Trackers
    quantization: QuantRecord
    objective: Objective
    eval_objective: Objective  # the same, with its reference computed in the step (a table holds training pairs)
    reference: Reference  # under FSDP a starting adapter's shards go into every checkpoint
    started: float
    answerable: list = field(default_factory=list)  # eval samples with a reference answer, for exact match
    evals: list = field(default_factory=list)
    mfu: tuple | None = None  # (useful FLOPs per token, the card's matmul FLOP/s) on CUDA
    meter: Throughput = field(default_factory=lambda: Throughput())
    nonfinite_in_row: int = 0

    @classmethod
    def set_up(cls, cfg: RunConfig, run_dir: RunDir, processes: Processes, loaded: LoadedModel, data: Data,
               started: float) -> Training | None:
        """Optimizer and schedule, resumed state, the processes' wrapping, the output dir and trackers.

        None when a resumed run has nothing left to do.
        """
        model = loaded.model
        # The reference is the adapter the run started from, as it was then. One process and DDP hold
        # it whole: taken now, before a resume moves it on. Under FSDP, once the model is sharded (below).
        starts_reference = bool(cfg.model.adapter) and cfg.objective.needs_reference
        reference = Reference.starting_from(model) if starts_reference and not processes.fsdp else Reference()
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, processes.device)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        state = resume(cfg, run_dir, loaded, scheduler, data, processes)
        if state.step >= cfg.train.max_steps:
            processes.say(f"nothing to do: {run_dir.path} already finished {state.step} of "
                          f"train.max_steps={cfg.train.max_steps} steps.")
            return None
        wrapped, optimizer = wrap_for_processes(processes, model, optimizer)
        if processes.fsdp and processes.device.type == "cuda":  # every process takes part in the gather
            processes.say(f"sharded by FSDP: {memory_line(model, processes.device)}, peak while loading and "
                          f"sharding {peak_memory_gib(processes):.2f} GiB")
        if starts_reference and processes.fsdp:
            reference = sharded_reference(run_dir, processes, wrapped)
        if run_dir.checkpoint is not None:  # after FSDP sharded the model: each process takes its own shard's
            optimizer.load_state_dict(saved_optimizer_state(run_dir.saved, processes.rank))
        say_global_batch(cfg, processes)
        # Created only now, so a run that fails while loading leaves nothing behind. Only the first
        # process writes: main_process_first above let it through only once the others were done
        # reading output_dir (in plan_run_dir).
        if processes.is_main:
            start_run_dir(run_dir, cfg.train.overwrite and run_dir.checkpoint is None, keep_metrics_through=state.step)
        tracker = (open_trackers(cfg.tracker, run_dir.path, run_dir.path.name, run_dir.resolved_config)
                   if processes.is_main else Trackers([]))
        state.tracker_run_id = tracker.run_id
        # Every process evaluates every eval micro-batch itself, so evaluation sums nothing across them.
        eval_objective = build_objective(cfg.objective, reference)
        if cfg.objective.precompute_reference:
            reference = precomputed_reference(cfg, run_dir, processes, wrapped, loaded, data, reference)
        objective = build_objective(cfg.objective, reference,
                                    processes.accelerator.reduce if processes.world > 1 else None)
        training = cls(cfg, run_dir, processes, wrapped, loaded, data, optimizer, scheduler, state, tracker,
                       QuantRecord.from_config(cfg.quant, loaded.compute_dtype), objective, eval_objective, reference,
                       started, evals=logged_evals(run_dir.path))
        training.find_answerable()
        if processes.device.type == "cuda":  # the card's own matmul rate, measured once (a fraction of a second)
            training.mfu = (memory.useful_flops_per_token(loaded.source.config, cfg.data.max_seq_len),
                            perf.matmul_peak_flops(processes.device))
        return training

    def find_answerable(self) -> None:
        # Exact match needs a reference answer: a conversation that ends with an assistant turn. For
        # preference pairs, a prompt conversation whose answer is compared with chosen and rejected.
        if self.data.preference:
            answerable = (p for p in self.data.eval_samples if p.messages and p.rejected_ids)
        else:
            answerable = (s for s in self.data.eval_samples if s.messages and s.messages[-1]["role"] == "assistant")
        self.answerable = list(itertools.islice(answerable, self.cfg.train.eval_generate))
        if self.cfg.train.eval_generate and not self.answerable:
            self.processes.say("note: train.eval_generate skipped: no eval sample ends with an assistant turn to "
                               "compare against.")

    def evaluate(self, step: int) -> dict:
        """Eval loss (and exact match, samples) at `step`, logged to the trackers.

        Every process evaluates all of it and gets the same numbers: no process waits on another
        (FSDP's gathers line up), and the first one logs them.
        """
        cfg, device, model = self.cfg, self.processes.device, self.loaded.model
        if self.data.preference:
            metrics = evaluate_objective(self.model, self.eval_objective, data_lib.eval_preference_batches(
                self.data.eval_samples, cfg.train.micro_batch_size, self.data.pad_id), device,
                model.takes_packed_boundaries)
            if self.answerable:
                metrics.update(preference_wins(model, self.loaded.tokenizer, self.answerable,
                                               cfg.train.max_new_tokens, cfg.train.micro_batch_size))
        else:
            metrics = evaluate_loss(self.model, self.data.eval_samples, cfg.train.micro_batch_size, self.data.pad_id,
                                    device)
            if self.answerable:
                metrics["exact_match"] = exact_match(model, self.loaded.tokenizer, self.answerable,
                                                     cfg.train.max_new_tokens, cfg.train.micro_batch_size)
        self.tracker.log(metrics, step)
        if cfg.train.sample_prompts:
            completions = chat_replies(model, self.loaded.tokenizer,
                                       [[{"role": "user", "content": prompt}] for prompt in cfg.train.sample_prompts],
                                       Sampling(max_new_tokens=cfg.train.max_new_tokens), cfg.train.micro_batch_size)
            rows = [[step, prompt, completion] for prompt, completion in zip(cfg.train.sample_prompts, completions)]
            self.tracker.log_table("samples", ["step", "prompt", "completion"], rows, step)
            for _, prompt, completion in rows:
                self.note(f"  sample: {prompt!r} -> {completion!r}")
        self.evals.append(metrics)
        return metrics

    def evaluate_before(self) -> None:
        trainable = sum(p.numel() for p in self.loaded.model.parameters() if p.requires_grad)
        self.tracker.log({"trainable_params": trainable, "total_params": self.loaded.model.param_count()}, 0)
        self.processes.say(f"eval before training: {format_metrics(self.evaluate(step=0))}")

    def save_checkpoint(self, step: int, adapter_state: dict | None = None) -> Path:
        """Every process takes part (each hands over its RNG state, and under FSDP its shard's
        optimizer state and starting adapter, and FSDP gathers the adapter from every shard unless
        `adapter_state` holds it already), the first one writes, and none runs ahead, or exits,
        before it is complete."""
        processes, starting = self.processes, self.reference.starting_adapter
        if processes.fsdp and adapter_state is None:
            adapter_state = gather_trainable_state(self.model)
        optimizer_by_rank = gather_object([optimizer_state_on_cpu(self.optimizer)]) if processes.fsdp else None
        reference_by_rank = every_process_shards(starting) if processes.fsdp and starting is not None else None
        rng_by_rank = gather_object([rng_states()])
        if processes.is_main:
            save_checkpoint(self.run_dir.checkpoints, step, self.loaded.model, self.loaded.tokenizer,
                            self.quantization, self.optimizer, self.scheduler, self.state, self.cfg.train.keep_last,
                            rng_by_rank, adapter_state, optimizer_by_rank, reference_by_rank)
        processes.accelerator.wait_for_everyone()
        return self.run_dir.checkpoints / f"step-{step}"

    def note(self, line: str) -> None:
        """A line for the console from the first process, above the progress bar when there is one."""
        if self.processes.is_main:
            tqdm.write(line)

    def loop(self) -> int | None:
        """Train to train.max_steps; the step a stop request ended the run at, or None."""
        cfg, processes = self.cfg, self.processes
        self.model.train()
        reset_peak_memory(processes.device)
        # A bar redraws with carriage returns: in a log file (no terminal) the note lines alone say how it goes.
        progress = tqdm(range(self.state.step + 1, cfg.train.max_steps + 1), desc="train", unit="step",
                        dynamic_ncols=True, initial=self.state.step, total=cfg.train.max_steps,
                        disable=not (processes.is_main and sys.stderr.isatty()))
        with StopRequests() as stop, progress, steady_heap():
            for step in progress:
                step_batches = [next(self.data.batches)
                                for _ in range(cfg.train.gradient_accumulation_steps * processes.world)]
                self.state.micro_batches_consumed += len(step_batches)
                result = train_step(self.model, self.optimizer, self.scheduler, self.objective, step_batches,
                                    processes, self.loaded.model.takes_packed_boundaries, cfg.optim.max_grad_norm)
                self.state.step = step
                self.meter.tokens += result.tokens
                self.guard_nonfinite(step, result)
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    self.log_step(step, result, progress)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                    self.note(f"eval at step {step}: {format_metrics(self.evaluate(step))}")
                    self.model.train()
                if step == cfg.train.max_steps:
                    return None  # the final checkpoint follows the final evaluation
                # All processes stop after the same step: as soon as any of them was asked to.
                stopping = processes.accelerator.reduce(
                    torch.tensor(float(stop.requested is not None), device=processes.device)).item() > 0
                if stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
                    saved_at = self.save_checkpoint(step)
                if stopping:
                    self.tracker.close()
                    processes.say(f"stopped by {stop.requested or 'a signal to another process'} after step {step}; "
                                  f"checkpoint {saved_at}. Continue with the same command plus train.resume=auto.")
                    return step
        return None

    def guard_nonfinite(self, step: int, result: StepResult) -> None:
        """Count skipped non-finite steps; a streak of train.max_nonfinite_steps saves and stops the run."""
        if result.applied:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        self.state.skipped_nonfinite += 1
        self.tracker.log({"nonfinite_skipped": self.state.skipped_nonfinite}, step)
        self.note(f"step {step}: non-finite loss ({result.loss}) or gradient norm ({result.grad_norm}); "
                  f"update skipped ({self.nonfinite_in_row} in a row)")
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            saved_at = self.save_checkpoint(step)
            self.tracker.close()
            raise TrainingStopped(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient norm (through step "
                f"{step}); the last good state is saved in {saved_at}. Lower optim.lr, check the data, or "
                "use bfloat16 compute; resume with train.resume=auto.")

    def log_step(self, step: int, result: StepResult, progress) -> None:
        synchronize(self.processes.device)
        steps_in_window = step % self.cfg.train.log_every or self.cfg.train.log_every
        tokens_per_s, step_time = self.meter.close_window(steps_in_window)
        lr = self.scheduler.get_last_lr()[0]
        metrics = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                   "step_time_s": step_time, "peak_memory_gib": peak_memory_gib(self.processes), **result.metrics}
        if self.mfu is not None:
            flops_per_token, peak_flops = self.mfu
            metrics["mfu"] = flops_per_token * tokens_per_s / peak_flops
        self.tracker.log(metrics, step)
        progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        rewards = "".join(f"  {label} {result.metrics[key]:{style}}" for label, key, style in
                          (("reward acc", "rewards/accuracy", ".2f"), ("margin", "rewards/margins", ".3f"))
                          if key in result.metrics)
        self.note(f"step {step:>6}  loss {result.loss:.4f}{rewards}  lr {lr:.2e}  grad norm {result.grad_norm:.3f}  "
                  f"{tokens_per_s:,.0f} tok/s  peak {metrics['peak_memory_gib']:.2f} GiB")

    def finish(self) -> RunResult:
        """The final evaluation, the adapter, the final checkpoint, and a summary."""
        cfg, processes = self.cfg, self.processes
        first = self.evals[0] if self.run_dir.checkpoint is None and self.evals else None
        after = self.evaluate(step=cfg.train.max_steps)
        adapter_dir = self.run_dir.path / "adapter"
        adapter_state = gather_trainable_state(self.model) if processes.fsdp else None  # FSDP: from every shard
        if processes.is_main:
            save_adapter(self.loaded.model, self.loaded.tokenizer, adapter_dir, self.quantization, adapter_state)
        self.save_checkpoint(cfg.train.max_steps, adapter_state)  # marks the run finished for train.resume=auto
        summary = {
            "time_s": time.perf_counter() - self.started,
            "train_tokens": self.meter.total,
            "best_eval_loss": min(e["eval_loss"] for e in self.evals),
            "peak_memory_gib": peak_memory_gib(processes),
            "nonfinite_skipped": self.state.skipped_nonfinite,
            **{f"final_{k}": v for k, v in after.items()},
        }
        self.tracker.log(summary, cfg.train.max_steps)
        self.tracker.close()
        processes.say(f"eval after training:  {format_metrics(after, before=first)}")
        processes.say(f"done in {summary['time_s']:.0f} s: {summary['train_tokens']:,} tokens, best eval loss "
                      f"{summary['best_eval_loss']:.4f}, peak memory {summary['peak_memory_gib']:.2f} GiB")
        processes.say(f"adapter saved to {adapter_dir}")
        return RunResult(self.run_dir.path, adapter_dir, summary)


@dataclass
class Throughput:
    """Tokens trained since the last log line, and when that window began."""

    tokens: int = 0
    total: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    def close_window(self, steps: int) -> tuple[float, float]:
        """(tokens/s, seconds per step) over the window, and a new window begins."""
        elapsed = time.perf_counter() - self.window_start
        rate = self.tokens / elapsed
        self.total += self.tokens
        self.tokens, self.window_start = 0, time.perf_counter()
        return rate, elapsed / steps


def resume(cfg: RunConfig, run_dir: RunDir, loaded: LoadedModel, scheduler, data: Data,
           processes: Processes) -> TrainerState:
    """The trainer state to continue from: a fresh one, or the checkpoint's with the model, schedule,
    data position and RNG put back where it left off. (The optimizer's state goes back after the
    processes' wrapping: under FSDP each process takes its own shard's.)"""
    state = TrainerState(step=0, micro_batches_consumed=0, config_hash=run_dir.fingerprint, tracker_run_id=None,
                         world_size=processes.world, fsdp=processes.fsdp)
    if run_dir.checkpoint is None:
        return state
    state = run_dir.resumed_state
    # Before FSDP shards the model, while each process holds it whole (or empty: FSDP then
    # broadcasts the first process's weights, these among them).
    load_adapter_weights(loaded.model, run_dir.checkpoint)
    scheduler.load_state_dict(run_dir.saved["scheduler"])
    # Replaying the batch stream puts the data position exactly where the checkpoint left it.
    for _ in range(state.micro_batches_consumed):
        next(data.batches)
    restore_rng_states(run_dir.saved["rng_by_rank"][processes.rank])
    cfg.tracker.run_id = cfg.tracker.run_id or state.tracker_run_id
    processes.say(f"resuming from {run_dir.checkpoint} (step {state.step})")
    return state


def sharded_reference(run_dir: RunDir, processes: Processes, model) -> Reference:
    """Under FSDP each process keeps its shard of the starting adapter: as FSDP has just sharded it,
    before any step, or, resumed (the model was loaded with the checkpoint's adapter), as the
    checkpoint kept it: the same processes shard the same model the same way again."""
    if run_dir.checkpoint is None:
        return Reference.starting_from(model)
    shards = run_dir.saved["reference_by_rank"][processes.rank]
    return Reference({name: shard.to(processes.device) for name, shard in shards.items()})


def every_process_shards(adapter: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Under FSDP: every process's shards of `adapter`, by rank, as CPU copies on every process (all
    must call this)."""
    return gather_object([{name: shard.cpu() for name, shard in adapter.items()}])


def precomputed_reference(cfg: RunConfig, run_dir: RunDir, processes: Processes, model, loaded: LoadedModel,
                          data: Data, reference: Reference) -> Reference:
    """objective.precompute_reference: every training pair's reference log-probs, from
    OUTPUT_DIR/reference_logps when they still hold for this data, base and adapter, else computed
    now by every process (under FSDP each forward gathers from all of them); the first writes them."""
    pairs = data.train_samples
    starting = reference.starting_adapter
    if processes.fsdp and starting is not None:  # each holds its shards: the fingerprint takes all, alike everywhere
        starting = {f"{name} of process {rank}": shard
                    for rank, shards in enumerate(every_process_shards(starting)) for name, shard in shards.items()}
    key = reference_cache.fingerprint(pairs, cfg.quant, loaded.compute_dtype, loaded.model_dir,
                                      type(loaded.model).__name__, starting)
    started, path = time.perf_counter(), run_dir.path / reference_cache.CACHE_DIR
    table, cached = reference_cache.reference_table(
        path, key, model, reference, data_lib.eval_preference_batches(pairs, cfg.train.micro_batch_size, data.pad_id),
        len(pairs), processes.device, loaded.model.takes_packed_boundaries)
    # Replaced only once every process has read it: till then all of them find the same file, so none
    # reads it half replaced, and under FSDP all take the same branch (their forwards gather together).
    processes.accelerator.wait_for_everyone()
    if processes.is_main and not cached:
        reference_cache.save_table(path, key, table)
    how = "read from" if cached else f"computed in {time.perf_counter() - started:.1f} s, kept in"
    processes.say(f"reference log-probs of {len(pairs)} training pairs {how} {path}")
    return Reference(reference.starting_adapter, table)


def say_global_batch(cfg: RunConfig, processes: Processes) -> None:
    micro, accumulation, world = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, processes.world
    items = {ObjectiveName.sft: "samples", ObjectiveName.kto: "completions"}.get(cfg.objective.name, "pairs")
    # Packed SFT rows fill a token budget; packed preference rows still hold micro_batch_size items.
    per_step = (f"{accumulation * world} packed rows of up to {micro * cfg.data.max_seq_len} tokens"
                if cfg.data.packing and cfg.objective.name is ObjectiveName.sft
                else f"{micro * accumulation * world} {items}")
    processes.say(f"global batch: micro-batch {micro} x accumulation {accumulation} x {world} "
                  f"process{'es' if world > 1 else ''} = {per_step} per optimizer step, {processes.engine}")
