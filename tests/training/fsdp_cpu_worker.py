"""One process of test_distributed.py's CPU FSDP check.

    torchrun --nproc_per_node=2 fsdp_cpu_worker.py OUT key=value ...

accelerate runs FSDP on GPUs only (on the CPU its FSDP config falls back to DDP), so on the CPU
this drives torch's FSDP itself, wrapped as recipes/accelerate/fsdp.yaml has accelerate wrap it
(FSDP1, FULL_SHARD, use_orig_params, peft's auto-wrap policy or the native model's own), around
the model build_model makes, and trains the recipe's steps: each process takes micro-batches
rank, rank + W, ... of the global stream, the loss is normalized by the whole step's trainable
tokens and scaled by W, and gradients are reduced only after the last micro-batch. It proves the
sharding of NF4 storage and LoRA weights, not accelerate's plumbing (the GPU tests run that).

Writes OUT/losses.json (per step: loss, grad norm), OUT/shards.json (parameter and gradient
elements held by each process and gathered for the adapter, against the whole model and its
trainable part) and OUT/adapter (gathered from the shards and saved as the recipe saves under
FSDP). It also checkpoints after step 1 as the recipe does under FSDP, then builds and shards the
model afresh, resumes from that checkpoint as the recipe does, trains the remaining steps again
and writes their rows to OUT/resumed.json. WORKER_OPTIMIZER=adamw8bit (env) trains with
bitsandbytes' 8-bit AdamW instead of the recipe's optimizer. The native model loads as under the
shipped configs (only the first process loads, the others start empty and FSDP fills them);
WORKER_LOADING=every has every process load it, as fsdp_cpu_ram_efficient_loading: false does.
"""

import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp import _init_utils as fsdp_init_utils

from finetune import data as data_lib
from finetune.api import compose_config
from finetune.cli import quiet_libraries
from finetune.models import Placement, build_model, load_adapter_weights
from finetune.models.native import materialize_empty
from finetune.adapter_format import QuantRecord
from finetune.generation import pad_id
from finetune.recipe import seed_everything
from finetune.training.checkpoint import (TrainerState, gather_trainable_state, load_latest_checkpoint,
                                          optimizer_state_on_cpu, restore_rng_states, rng_states, save_adapter,
                                          save_checkpoint, saved_optimizer_state)
from finetune.training.optim import build_optimizer, build_scheduler

DEVICE = torch.device("cpu")
FIRST_PROCESS_LOADS = os.environ.get("WORKER_LOADING", "first") == "first"  # "every": each process loads
# torch refuses to broadcast CPU tensors for sync_module_states because NCCL cannot; gloo can, and
# this is the only way to run the first-process loading on the CPU (the GPU tests run it unpatched).
fsdp_init_utils._check_module_states_for_sync_module_states = lambda states: None


def build(cfg, checkpoint=None):
    """The recipe's set-up under FSDP: model, data stream, optimizer, schedule; resumed from `checkpoint`."""
    seed_everything(cfg.train.seed)
    # As the recipe under the shipped configs (fsdp_cpu_ram_efficient_loading): only the first
    # process loads the native base, the others build it empty and FSDP fills them from it.
    first_loads = FIRST_PROCESS_LOADS and cfg.model.impl.value == "native"
    placement = Placement.device if not first_loads else Placement.host if dist.get_rank() == 0 else Placement.empty
    loaded = build_model(cfg, DEVICE, placement)
    model, tokenizer = loaded.model, loaded.tokenizer
    data_lib.use_data_chat_template(tokenizer, cfg.data)
    train_samples, _, _ = data_lib.load_splits(cfg.data, tokenizer, cfg.train.seed, cfg.cache_dir)
    batches = data_lib.train_batches(train_samples, cfg.data, cfg.train.micro_batch_size, pad_id(tokenizer),
                                     cfg.train.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if os.environ.get("WORKER_OPTIMIZER") == "adamw8bit":
        # bitsandbytes' 8-bit states (what the 70B recipe's paged_adamw_8bit keeps) on every LoRA
        # weight, however small: its state dict nests them, unlike torch's optimizers.
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                        weight_decay=cfg.optim.weight_decay, min_8bit_size=1)
    else:
        optimizer = build_optimizer(trainable, cfg.optim, DEVICE)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    state = TrainerState(step=0, micro_batches_consumed=0, config_hash="", tracker_run_id=None,
                         world_size=dist.get_world_size(), fsdp=True)
    if checkpoint is not None:
        path, state, saved = checkpoint
        load_adapter_weights(model, path)
        scheduler.load_state_dict(saved["scheduler"])
        for _ in range(state.micro_batches_consumed):
            next(batches)
        restore_rng_states(saved["rng_by_rank"][dist.get_rank()])
    # The recipe's choice of units: the native model names its own (and makes its codes parameters).
    policy = model.fsdp_wrap_policy()
    whole = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    built_empty = all(p.is_meta for p in model.parameters())
    sharded = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                       auto_wrap_policy=policy, use_orig_params=True,
                                       sync_module_states=first_loads, device_id=DEVICE,
                                       param_init_fn=partial(materialize_empty, device=DEVICE))
    if checkpoint is not None:
        optimizer.load_state_dict(saved_optimizer_state(checkpoint[2], dist.get_rank()))
    return loaded, model, sharded, batches, optimizer, scheduler, state, (whole, trainable, built_empty)


def gradient_elements(sharded) -> int:
    # FSDP keeps one gradient per unit, over the whole of the unit's flattened parameters.
    units = [m for m in sharded.modules() if isinstance(m, FullyShardedDataParallel) and m._handle is not None]
    return sum(m._handle.flat_param.grad.numel() for m in units if m._handle.flat_param.grad is not None)


gradient_held = []  # gradient elements this process holds after step 1's backward


def train(cfg, setup, last_step: int, out: Path, checkpoint_after: int | None = None) -> list[dict]:
    """The recipe's steps from setup's state through `last_step`; checkpoints as the recipe does under FSDP."""
    loaded, model, sharded, batches, optimizer, scheduler, state, _ = setup
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded.train()
    rows = []
    for step in range(state.step + 1, last_step + 1):
        step_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps * world)]
        state.micro_batches_consumed += len(step_batches)
        step_targets = sum(int((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for mb in step_batches)
        micro_batches = step_batches[rank::world]
        step_loss = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else sharded.no_sync():
                loss = sharded(**data_lib.model_inputs(mb, DEVICE, model.takes_packed_boundaries), num_items_in_batch=step_targets).loss
                (loss * world).backward()
            step_loss += loss.item()
        total = torch.tensor(step_loss, dtype=torch.float64)
        dist.all_reduce(total)
        if step == 1:
            gradient_held.append(gradient_elements(sharded))
        grad_norm = float(sharded.clip_grad_norm_(cfg.optim.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        rows.append({"step": step, "loss": total.item(), "grad_norm": grad_norm})
        if step == checkpoint_after:
            adapter_state = gather_trainable_state(sharded)
            rng_by_rank, optimizer_by_rank = [None] * world, [None] * world
            dist.all_gather_object(rng_by_rank, rng_states())
            dist.all_gather_object(optimizer_by_rank, optimizer_state_on_cpu(optimizer))
            if rank == 0:
                save_checkpoint(out / "checkpoints", step, model, loaded.tokenizer,
                                QuantRecord.from_config(cfg.quant, loaded.compute_dtype), optimizer, scheduler, state,
                                keep_last=1, rng_by_rank=rng_by_rank, adapter_state=adapter_state,
                                optimizer_by_rank=optimizer_by_rank)
            dist.barrier()
    return rows


def main(out: Path, overrides: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    quiet_libraries()
    cfg = compose_config("demo", overrides)

    setup = build(cfg)
    loaded, model, sharded, *_, (whole, trainable, built_empty) = setup
    held = sum(p.numel() for p in sharded.parameters())
    rows = train(cfg, setup, cfg.train.max_steps, out, checkpoint_after=1)
    state = gather_trainable_state(sharded)
    shards, gradients = [None] * world, [None] * world
    dist.all_gather_object(shards, held)
    dist.all_gather_object(gradients, gradient_held[0])
    empty = [None] * world
    dist.all_gather_object(empty, built_empty)
    if rank == 0:  # the recipe's FSDP save, from the gathered state
        save_adapter(model, loaded.tokenizer, out / "adapter", QuantRecord.from_config(cfg.quant, loaded.compute_dtype), state)
        (out / "losses.json").write_text(json.dumps(rows))
        (out / "shards.json").write_text(json.dumps({"whole": whole, "held": shards, "trainable": trainable,
                                                     "gradients": gradients, "built_empty": empty,
                                                     "gathered": sum(t.numel() for t in state.values())}))

    # As if stopped after step 1: a new model, sharded again, resumed from the checkpoint.
    resumed = build(cfg, load_latest_checkpoint(out / "checkpoints"))
    rows = train(cfg, resumed, cfg.train.max_steps, out)
    if rank == 0:
        (out / "resumed.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
