"""QLoRA fine-tuning, top to bottom: set up, evaluate, train, evaluate, save.

`run(cfg)` is the whole job; train.py only composes the config and calls it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object
from omegaconf import OmegaConf
from tqdm import tqdm

from finetune import data as data_lib
from finetune import memory
from finetune.checkpoint import (TrainerState, config_hash, gather_trainable_state, load_latest_checkpoint,
                                 optimizer_state_on_cpu, restore_rng_states, rng_states, save_adapter, save_checkpoint,
                                 saved_optimizer_state)
from finetune.config import ConfigError, ModelImpl, Resume, RunConfig
from finetune.errors import TrainingStopped
from finetune.models import Placement, build_model, load_adapter_weights
from finetune.models.native import materialize_empty
from finetune.models.source import resolve_model_dir
from finetune.signals import StopRequests
from finetune.optim import build_optimizer, build_scheduler, check_optimizer_device
from finetune.tracking import Trackers, open_trackers


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path | None  # None when data.preview stopped the run before training
    metrics: dict = field(default_factory=dict)  # final eval metrics, plus summary figures


def run(cfg: RunConfig) -> RunResult:
    cfg.validate()
    if cfg.train.dry_run:
        # The memory plan alone: no weights loaded, nothing written.
        plan = memory.plan_for_run(cfg)
        print(memory.format_plan(plan))
        return RunResult(Path(cfg.output_dir).expanduser(), None, plan.figures())
    output_dir = Path(cfg.output_dir).expanduser()
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    fingerprint = config_hash(resolved)
    resume_from = plan_output_dir(output_dir, cfg, fingerprint)  # refuses unsafe output_dirs; writes nothing
    seed_everything(cfg.train.seed)
    # ---- processes: this one alone, or one of several started by `accelerate launch` / torchrun ----
    accelerator, device = start_processes(cfg.train.device)
    check_optimizer_device(cfg.optim, device)  # a rule of this machine: known before any loading
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    fsdp = world > 1 and accelerator.distributed_type is DistributedType.FSDP
    check_processes(cfg, accelerator, fsdp, resume_from)
    say = accelerator.print  # one console: the first process speaks for all
    started = time.perf_counter()

    # ---- model: frozen 4-bit base + LoRA ----
    with accelerator.main_process_first():  # the first process fills the shared caches (demo base, hub files)
        resolve_model_dir(cfg.model.name_or_path, cfg.cache_dir, cfg.model.revision)
    # FSDP with fsdp_cpu_ram_efficient_loading (as the shipped configs): the first process loads the
    # base into host memory, the others build it empty; FSDP moves each unit to the GPU, broadcasts
    # the first process's values (sync_module_states) and shards it. No GPU ever holds the whole base.
    first_loads = fsdp and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    placement = Placement.device if not first_loads else Placement.host if is_main else Placement.empty
    loaded = build_model(cfg, device, placement)
    model, tokenizer = loaded.model, loaded.tokenizer
    for notice in loaded.notices:
        say(f"note: {notice}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = _count_base_weights(model)
    say(f"model: {loaded.model_dir} on {device} ({loaded.compute_dtype}), trainable {trainable:,} of "
        f"{total:,} parameters ({100 * trainable / total:.3f}%), {_memory_line(model, device)}")
    quantization = _quantization_record(cfg, loaded.compute_dtype)
    # MFU needs the card's own matmul rate, measured once here (a fraction of a second).
    if device.type == "cuda":
        architecture = json.loads((loaded.model_dir / "config.json").read_text())
        flops_per_token = memory.useful_flops_per_token(architecture, cfg.data.max_seq_len)
        peak_flops = memory.matmul_peak_flops(device)
    max_positions = json.loads((loaded.model_dir / "config.json").read_text()).get("max_position_embeddings")
    if max_positions and cfg.data.max_seq_len > max_positions:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} exceeds the model's maximum sequence length "
                          f"({max_positions}, max_position_embeddings in {loaded.model_dir / 'config.json'}); "
                          f"pass data.max_seq_len={max_positions} or less.")

    # ---- data ----
    data_lib.use_data_chat_template(tokenizer, cfg.data)
    with accelerator.main_process_first():  # tokenized once, by the first process; the others read its cache
        train_samples, eval_samples, report = data_lib.load_splits(cfg.data, tokenizer, cfg.train.seed, cfg.cache_dir)
    for line in report:
        say(f"data {line}")
    if cfg.data.preview:
        say(data_lib.preview(train_samples[: cfg.data.preview], tokenizer, color=sys.stdout.isatty()))
        return RunResult(output_dir, adapter_dir=None)
    pad_id = _pad_id(tokenizer)
    batches = data_lib.train_batches(train_samples, cfg.data, cfg.train.micro_batch_size, pad_id, cfg.train.seed)

    # ---- optimizer and schedule, restored from a checkpoint when resuming ----
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    state = TrainerState(step=0, micro_batches_consumed=0, config_hash=fingerprint, tracker_run_id=None,
                         world_size=world, fsdp=fsdp)
    if resume_from is not None:
        checkpoint_dir, state, saved = resume_from
        # Before FSDP shards the model, while each process holds it whole (or empty: FSDP then
        # broadcasts the first process's weights, these among them).
        load_adapter_weights(model, checkpoint_dir)
        scheduler.load_state_dict(saved["scheduler"])
        # Replaying the batch stream puts the data position exactly where the checkpoint left it.
        for _ in range(state.micro_batches_consumed):
            next(batches)
        restore_rng_states(saved["rng_by_rank"][rank])
        cfg.tracker.run_id = cfg.tracker.run_id or state.tracker_run_id
        say(f"resuming from {checkpoint_dir} (step {state.step})")
    if state.step >= cfg.train.max_steps:
        say(f"nothing to do: {output_dir} already finished {state.step} of train.max_steps={cfg.train.max_steps} steps.")
        return RunResult(output_dir, output_dir / "adapter")

    # ---- several processes: accelerate wraps the model in DDP (each process holds the whole 4-bit
    # base) or FSDP (each holds a shard), as `accelerate launch` was configured; either averages the
    # LoRA gradients across processes in backward. One process trains the model as built. ----
    if world > 1:
        if fsdp and hasattr(model, "prepare_for_fsdp"):
            # The native model makes its 4-bit codes shardable and names its own units.
            accelerator.state.fsdp_plugin.auto_wrap_policy = model.prepare_for_fsdp()
            # accelerate's own param_init_fn would replace the parameters the optimizer holds.
            accelerator.state.fsdp_plugin.param_init_fn = partial(materialize_empty, device=device)
        elif fsdp:
            from peft.utils.other import fsdp_auto_wrap_policy

            check_fsdp_quant_storage(cfg)  # again: model.impl=auto may have chosen this path
            # peft's policy gives every LoRA layer its own FSDP unit: a unit flattens one dtype, and
            # LoRA weights are float32 beside a bfloat16 base.
            accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        if fsdp and device.type == "cuda":  # every process takes part: the peak is the largest process's
            loading_peak = _peak_memory_gib(device, accelerator)  # before training resets the counter
            say(f"sharded by FSDP: {_memory_line(model, device)}, peak while loading and sharding "
                f"{loading_peak:.2f} GiB")
    if resume_from is not None:  # after FSDP sharded the model: each process takes its own shard's state
        optimizer.load_state_dict(saved_optimizer_state(resume_from[2], rank))
    raw_model = accelerator.unwrap_model(model)  # for generation, saving, and its forward's signature
    micro, accumulation = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    per_step = (f"{accumulation * world} packed rows of up to {micro * cfg.data.max_seq_len} tokens"
                if cfg.data.packing else f"{micro * accumulation * world} samples")
    engine = "FSDP" if fsdp else "DDP" if world > 1 else "one process"
    say(f"global batch: micro-batch {micro} x accumulation {accumulation} x {world} "
        f"process{'es' if world > 1 else ''} = {per_step} per optimizer step, {engine}")

    # ---- output dir, resolved config, trackers: created only now, so a run that fails while
    # loading leaves nothing behind. Only the first process writes: main_process_first above let it
    # through only once the others were done reading output_dir (in plan_output_dir) ----
    if is_main:
        start_output_dir(output_dir, cfg.train.overwrite and resume_from is None, keep_metrics_through=state.step)
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    tracker = open_trackers(cfg.tracker, output_dir, output_dir.name, resolved) if is_main else Trackers([])
    state.tracker_run_id = tracker.run_id
    checkpoints = output_dir / "checkpoints"

    def checkpoint(step: int, adapter_state: dict | None = None) -> Path:
        # Every process takes part (each hands over its RNG state, and under FSDP its shard's
        # optimizer state, and FSDP gathers the adapter from every shard unless `adapter_state`
        # holds it already), the first one writes, and none runs ahead, or exits, before the
        # checkpoint is complete.
        if fsdp and adapter_state is None:
            adapter_state = gather_trainable_state(model)
        optimizer_by_rank = gather_object([optimizer_state_on_cpu(optimizer)]) if fsdp else None
        rng_by_rank = gather_object([rng_states()])
        if is_main:
            save_checkpoint(checkpoints, step, raw_model, tokenizer, quantization, optimizer, scheduler, state,
                            cfg.train.keep_last, rng_by_rank, adapter_state, optimizer_by_rank)
        accelerator.wait_for_everyone()
        return checkpoints / f"step-{step}"

    # Exact match needs a reference answer: a conversation that ends with an assistant turn.
    answerable = list(itertools.islice(
        (s for s in eval_samples if s.messages and s.messages[-1]["role"] == "assistant"), cfg.train.eval_generate))
    if cfg.train.eval_generate and not answerable:
        say("note: train.eval_generate skipped: no eval sample ends with an assistant turn to compare against.")

    def evaluate(step: int) -> dict:
        # Every process evaluates all of it and gets the same numbers: no process waits on another
        # (FSDP's gathers line up), and the first one logs them.
        metrics = evaluate_loss(model, eval_samples, cfg.train.micro_batch_size, pad_id, device)
        if answerable:
            metrics["exact_match"] = exact_match(raw_model, tokenizer, answerable, cfg.train.max_new_tokens, device)
        tracker.log(metrics, step)
        if cfg.train.sample_prompts:
            rows = [[step, prompt, generate_answer(raw_model, tokenizer, [{"role": "user", "content": prompt}],
                                                   cfg.train.max_new_tokens, device)]
                    for prompt in cfg.train.sample_prompts]
            tracker.log_table("samples", ["step", "prompt", "completion"], rows, step)
            for _, prompt, completion in rows:
                if is_main:
                    tqdm.write(f"  sample: {prompt!r} -> {completion!r}")
        return metrics

    evals = _logged_evals(output_dir)
    if resume_from is None:
        tracker.log({"trainable_params": trainable, "total_params": total}, step=0)
        evals.append(evaluate(step=0))
        say(f"eval before training: {_format(evals[0])}")

    # ---- training loop ----
    model.train()
    _reset_peak_memory(device)
    # A bar redraws with carriage returns: in a log file (no terminal) the note lines alone say how it goes.
    progress = tqdm(range(state.step + 1, cfg.train.max_steps + 1), desc="train", unit="step", dynamic_ncols=True,
                    initial=state.step, total=cfg.train.max_steps, disable=not (is_main and sys.stderr.isatty()))

    def note(line: str) -> None:  # a line above the progress bar, from the first process
        if is_main:
            progress.write(line)

    window_tokens, window_start, total_tokens, nonfinite_in_row = 0, time.perf_counter(), 0, 0
    with StopRequests() as stop:
        for step in progress:
            # Every process draws the same seeded stream and trains micro-batches rank, rank + W,
            # rank + 2W, ... of the step's W * A: W processes with accumulation A train on exactly the
            # samples one process trains on with accumulation W * A.
            step_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps * world)]
            state.micro_batches_consumed += len(step_batches)
            # Normalize by the trainable tokens of the whole optimizer step (all processes), so
            # accumulation and data parallelism give the same gradient as one big batch however the
            # tokens fall across micro-batches.
            step_targets = sum(int((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for mb in step_batches)
            micro_batches = step_batches[rank::world]
            # Summed on the device: a .item() per micro-batch would stall the GPU queue each time.
            step_loss, step_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
            for i, mb in enumerate(micro_batches):
                # Gradients are averaged across processes once a step, in the last micro-batch's backward.
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss = model(**data_lib.model_inputs(mb, raw_model, device), num_items_in_batch=step_targets).loss
                    # DDP and FSDP average the processes' gradients, each the gradient of a share of the
                    # step's summed loss: scaling by W makes that average the sum's gradient.
                    (loss * world).backward()
                step_loss += loss.detach().double()
                step_tokens += data_lib.count_tokens(mb)
            # The step's loss and tokens over all processes. With the gradient norm (the same everywhere
            # once gradients are averaged) every process takes the same branch below.
            step_loss, step_tokens = accelerator.reduce(
                torch.stack([step_loss, torch.tensor(step_tokens, dtype=torch.float64, device=device)])).tolist()
            window_tokens += int(step_tokens)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            state.step = step
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                nonfinite_in_row = 0
                optimizer.step()
            else:
                # A NaN/Inf update would poison every LoRA weight; skip it and keep the last good state.
                nonfinite_in_row += 1
                state.skipped_nonfinite += 1
                tracker.log({"nonfinite_skipped": state.skipped_nonfinite}, step)
                note(f"step {step}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); "
                     f"update skipped ({nonfinite_in_row} in a row)")
                if nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                    optimizer.zero_grad(set_to_none=True)
                    saved_at = checkpoint(step)
                    tracker.close()
                    raise TrainingStopped(
                        f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient norm (through step "
                        f"{step}); the last good state is saved in {saved_at}. Lower optim.lr, check the data, or "
                        "use bfloat16 compute; resume with train.resume=auto.")
            scheduler.step()
            # Flush the gradients as soon as we can, no need for this memory anymore.
            optimizer.zero_grad(set_to_none=True)

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                _sync(device)
                elapsed = time.perf_counter() - window_start
                steps_in_window = step % cfg.train.log_every or cfg.train.log_every
                lr = scheduler.get_last_lr()[0]
                metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": window_tokens / elapsed, "step_time_s": elapsed / steps_in_window,
                           "peak_memory_gib": _peak_memory_gib(device, accelerator)}
                if device.type == "cuda":
                    metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / peak_flops
                tracker.log(metrics, step)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
                note(f"step {step:>6}  loss {step_loss:.4f}  lr {lr:.2e}  grad norm {grad_norm:.3f}  "
                     f"{metrics['tokens_per_s']:,.0f} tok/s  peak {metrics['peak_memory_gib']:.2f} GiB")
                total_tokens += window_tokens
                window_tokens, window_start = 0, time.perf_counter()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                evals.append(evaluate(step))
                note(f"eval at step {step}: {_format(evals[-1])}")
                model.train()
            if step == cfg.train.max_steps:
                break  # the final checkpoint follows the final evaluation
            # All processes stop after the same step: as soon as any of them was asked to.
            stopping = accelerator.reduce(torch.tensor(float(stop.requested is not None), device=device)).item() > 0
            if stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
                saved_at = checkpoint(step)
            if stopping:
                progress.close()
                tracker.close()
                say(f"stopped by {stop.requested or 'a signal to another process'} after step {step}; checkpoint "
                    f"{saved_at}. Continue with the same command plus train.resume=auto.")
                return RunResult(output_dir, None, {"stopped_at_step": step})
    progress.close()

    # ---- final evaluation, the adapter, and a summary ----
    after = evaluate(step=cfg.train.max_steps)
    evals.append(after)
    adapter_dir = output_dir / "adapter"
    adapter_state = gather_trainable_state(model) if fsdp else None  # FSDP: gathered from every shard
    if is_main:
        save_adapter(raw_model, tokenizer, adapter_dir, quantization, adapter_state)
    checkpoint(cfg.train.max_steps, adapter_state)  # marks the run finished for a later train.resume=auto
    summary = {
        "time_s": time.perf_counter() - started,
        "train_tokens": total_tokens,
        "best_eval_loss": min(e["eval_loss"] for e in evals),
        "peak_memory_gib": _peak_memory_gib(device, accelerator),
        "nonfinite_skipped": state.skipped_nonfinite,
        **{f"final_{k}": v for k, v in after.items()},
    }
    tracker.log(summary, cfg.train.max_steps)
    tracker.close()
    say(f"eval after training:  {_format(after, before=evals[0] if resume_from is None else None)}")
    say(f"done in {summary['time_s']:.0f} s: {total_tokens:,} tokens, best eval loss {summary['best_eval_loss']:.4f}, "
        f"peak memory {summary['peak_memory_gib']:.2f} GiB")
    say(f"adapter saved to {adapter_dir}")
    return RunResult(output_dir, adapter_dir, summary)


RUN_FILES = ("adapter", "checkpoints", "config.yaml", "metrics.jsonl", "tensorboard", "wandb")


def plan_output_dir(output_dir: Path, cfg: RunConfig, fingerprint: str):
    """Decide, before anything is written, whether output_dir is fresh, resumed, or refused.

    Returns the checkpoint to resume from, or None to start fresh.
    """
    existing = next(parent for parent in (output_dir, *output_dir.parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"output_dir={output_dir} cannot be written: {existing} is not writable. "
                          "Pass a directory you can write to.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir={output_dir} is a file; pass a directory.")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return None
    holds_run = (output_dir / "config.yaml").is_file()
    if cfg.train.resume is Resume.auto and holds_run:
        latest = load_latest_checkpoint(output_dir / "checkpoints")
        if latest is not None:
            if latest[1].config_hash != fingerprint:
                raise ConfigError(
                    f"output_dir={output_dir} holds a run with different training settings than this command "
                    f"(its checkpoint {latest[0].name} has config hash {latest[1].config_hash}, this run {fingerprint}). "
                    "Resume with the settings in its config.yaml, or pass train.overwrite=true to start over.")
            return latest
        if not cfg.train.overwrite:
            raise ConfigError(f"output_dir={output_dir} holds a run but no complete checkpoint to resume from; "
                              "pass train.overwrite=true to start over there.")
        return None
    if cfg.train.overwrite and holds_run:
        return None
    if holds_run:
        raise ConfigError(f"output_dir={output_dir} already holds a run; pass train.resume=auto to continue it, "
                          "train.overwrite=true to start over, or a new output_dir.")
    raise ConfigError(f"output_dir={output_dir} already exists and is not empty (and holds no run of ours); "
                      "pass a new output_dir.")


def start_output_dir(output_dir: Path, overwrite: bool, keep_metrics_through: int) -> None:
    """Create output_dir; on overwrite remove the earlier run's files; on resume drop metrics logged after the checkpoint."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    metrics = output_dir / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_metrics_through]
        tmp = metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(metrics)


def _logged_evals(output_dir: Path) -> list[dict]:
    metrics = output_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_loss" in r]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_processes(device_name: str) -> tuple[Accelerator, torch.device]:
    """This process's accelerator, and the device it trains on.

    Started alone, it trains on train.device, and the accelerator only answers for one process
    (the main one; nothing to wait for or reduce). Started by `accelerate launch` or torchrun as one
    of several, it trains on the device accelerate gives its rank: cuda:LOCAL_RANK over NCCL, or
    the CPU over gloo when train.device picks the CPU.
    """
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Accelerator(device_placement=False), device
    if device.type == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # Before the Accelerator: its FSDP plugin fails on a machine without GPUs, and where it
        # does start, accelerate quietly trains CPU processes under DDP instead.
        raise ConfigError("the accelerate config asks for FSDP, which accelerate runs on GPUs only, and these "
                          "processes train on the CPU: launch with recipes/accelerate/cpu.yaml (DDP) there.")
    # Every process loads the same frozen weights, so DDP need not broadcast buffers before each
    # forward (the native model keeps its 4-bit weights in buffers).
    unsynced_buffers = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False, kwargs_handlers=[unsynced_buffers])
    return accelerator, accelerator.device


def check_processes(cfg: RunConfig, accelerator: Accelerator, fsdp: bool, resume_from) -> None:
    """Refuse, before anything loads, what these processes cannot run."""
    world = accelerator.num_processes
    if resume_from is not None:
        checkpoint_dir, state, _ = resume_from
        if state.world_size != world:
            n = state.world_size
            raise ConfigError(f"{checkpoint_dir} was trained by {n} process(es), this run has {world}: every "
                              "process's random state and share of each step are in the checkpoint, so resume with "
                              f"{n} (e.g. accelerate launch --num_processes {n} ...), or pass train.overwrite=true to "
                              "start over.")
        if state.fsdp != fsdp:
            trained, now = ("under FSDP", "without it") if state.fsdp else ("without FSDP", "under FSDP")
            raise ConfigError(f"{checkpoint_dir} was trained {trained}, and this run is {now}: its optimizer state "
                              "is kept in that form, so resume with the accelerate config it was trained with "
                              "(e.g. accelerate launch --config_file recipes/accelerate/fsdp.yaml ...), or pass "
                              "train.overwrite=true to start over.")
    if world == 1:
        return
    if accelerator.mixed_precision != "no":
        raise ConfigError(f"the accelerate config sets mixed_precision: {accelerator.mixed_precision}, but QLoRA "
                          "computes in quant.bnb_4bit_compute_dtype; set mixed_precision: 'no' (as "
                          "recipes/accelerate/*.yaml do).")
    if not fsdp:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 1 or not plugin.use_orig_params:
        raise ConfigError("FSDP here is FSDP1 with use_orig_params (the optimizer holds the original LoRA "
                          "parameters): set fsdp_version: 1 and fsdp_use_orig_params: true, as "
                          "recipes/accelerate/fsdp.yaml does.")
    if cfg.lora.use_dora:
        raise ConfigError("lora.use_dora=true is not supported under FSDP (its adapter files are not written "
                          "in peft's format yet): use DDP, or plain LoRA.")
    if cfg.model.impl is ModelImpl.hf:
        check_fsdp_quant_storage(cfg)
    if cfg.train.eval_generate or cfg.train.sample_prompts:
        raise ConfigError("generating text (train.eval_generate, train.sample_prompts) is not supported under FSDP "
                          "yet: pass train.eval_generate=0 'train.sample_prompts=[]'.")


def check_fsdp_quant_storage(cfg: RunConfig) -> None:
    """The generic path under FSDP: its 4-bit weights must be stored in the dtype of the rest."""
    if cfg.quant.bnb_4bit_quant_storage.value != cfg.quant.torch_dtype.value:
        raise ConfigError("FSDP flattens each layer's weights into one tensor of one dtype: pass "
                          f"quant.bnb_4bit_quant_storage={cfg.quant.torch_dtype.value} to store the 4-bit weights "
                          f"like the rest (quant.torch_dtype), not as {cfg.quant.bnb_4bit_quant_storage.value}.")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible. Use train.device=auto or cpu.")
    return device


@torch.no_grad()
def evaluate_loss(model, samples, micro_batch_size: int, pad_id: int, device: torch.device) -> dict:
    """Token-averaged loss over every trainable token of the eval set, and its perplexity."""
    model.eval()
    total_loss, total_targets = 0.0, 0
    for batch in data_lib.eval_batches(samples, micro_batch_size, pad_id):
        targets = int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())
        batch = {k: v.to(device) for k, v in batch.items()}
        # num_items_in_batch=1 makes the model return the summed (not averaged) token loss.
        total_loss += model(**batch, num_items_in_batch=1).loss.item()
        total_targets += targets
    eval_loss = total_loss / total_targets
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}


@torch.no_grad()
def generate_answer(model, tokenizer, messages: list[dict], max_new_tokens: int, device: torch.device) -> str:
    """Greedy answer to a conversation, rendered with the chat template as in training."""
    model.eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=_pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def exact_match(model, tokenizer, samples, max_new_tokens: int, device: torch.device) -> float:
    """Share of prompts whose greedy answer equals the reference last assistant turn exactly."""
    hits = sum(generate_answer(model, tokenizer, s.messages[:-1], max_new_tokens, device) == s.messages[-1]["content"].strip()
               for s in samples)
    return hits / len(samples)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate


def _count_base_weights(model) -> int:
    """Parameters as the user thinks of them: a 4-bit weight counts its unpacked elements."""
    from finetune.quant import QuantizedWeight

    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit (generic path)
        total += int(np.prod(quant_state.shape)) if quant_state is not None else param.numel()
    # The native path keeps 4-bit weights as buffers of QuantizedWeight modules.
    total += sum(m.shape.numel() for m in model.modules() if isinstance(m, QuantizedWeight))
    return total


def _memory_line(model, device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated on the GPU"
    return f"{model.get_memory_footprint() / 2**20:.1f} MiB of weights in host memory"


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device, accelerator: Accelerator) -> float:
    """GPU: peak allocated by torch since the counter was last reset (training resets it as it
    begins; before that, the loading peak). CPU: the process's peak resident memory.

    With several processes, the largest of theirs: under FSDP the first process is not always the
    fullest. Every process must call this.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    if accelerator.num_processes > 1:
        peak = accelerator.gather(torch.tensor([peak], device=device)).max().item()
    return peak


def _quantization_record(cfg: RunConfig, compute_dtype: torch.dtype) -> dict:
    return {
        "load_in_4bit": cfg.quant.load_in_4bit,
        "bnb_4bit_quant_type": cfg.quant.bnb_4bit_quant_type.value,
        "bnb_4bit_use_double_quant": cfg.quant.bnb_4bit_use_double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": cfg.quant.bnb_4bit_quant_storage.value,
        "blocksize": 64,
        "torch_dtype": cfg.quant.torch_dtype.value,
    }


def _format(metrics: dict, before: dict | None = None) -> str:
    """`loss 1.75, ...`, or with `before` each figure beside where it started: `loss 1.75 (from 6.21), ...`."""
    shown = [("loss", "eval_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
             ("exact match", "exact_match", "{:.1%}")]
    parts = []
    for label, key, style in shown:
        if key in metrics:
            start = f" (from {style.format(before[key])})" if before and key in before else ""
            parts.append(f"{label} {style.format(metrics[key])}{start}")
    return ", ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
