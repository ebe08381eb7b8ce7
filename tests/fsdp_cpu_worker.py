"""One process of test_distributed.py's CPU FSDP check.

    torchrun --nproc_per_node=2 fsdp_cpu_worker.py OUT key=value ...

accelerate runs FSDP on GPUs only (on the CPU its FSDP config falls back to DDP), so on the CPU
this drives torch's FSDP itself, wrapped as recipes/accelerate/fsdp.yaml has accelerate wrap it
(FSDP1, FULL_SHARD, use_orig_params, peft's auto-wrap policy or the native model's own), around the model build_model
makes, and trains the recipe's steps: each process takes micro-batches rank, rank + W, ... of the
global stream, the loss is normalized by the whole step's trainable tokens and scaled by W, and
gradients are reduced only after the last micro-batch. It proves the sharding of NF4 storage and
LoRA weights, not accelerate's plumbing (the GPU tests run that).

Writes OUT/losses.json (per step: loss, grad norm), OUT/shards.json (parameter elements held by
each process against the whole model) and OUT/adapter (gathered from the shards and saved as the
recipe saves under FSDP).
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, ShardingStrategy, StateDictType

from finetune import data as data_lib
from finetune.api import compose_config
from finetune.checkpoint import save_adapter
from finetune.cli import quiet_libraries
from finetune.models import build_model
from finetune.optim import build_optimizer, build_scheduler
from finetune.recipe import _pad_id, _quantization_record, seed_everything


def main(out: Path, overrides: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    quiet_libraries()
    cfg = compose_config("demo", overrides)
    device = torch.device("cpu")
    seed_everything(cfg.train.seed)
    loaded = build_model(cfg, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    data_lib.use_data_chat_template(tokenizer, cfg.data)
    train_samples, _, _ = data_lib.load_splits(cfg.data, tokenizer, cfg.train.seed, cfg.cache_dir)
    batches = data_lib.train_batches(train_samples, cfg.data, cfg.train.micro_batch_size, _pad_id(tokenizer),
                                     cfg.train.seed)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    # The recipe's choice of units: the native model names its own (and makes its codes parameters).
    policy = model.prepare_for_fsdp() if hasattr(model, "prepare_for_fsdp") else fsdp_auto_wrap_policy(model)
    whole = sum(p.numel() for p in model.parameters())

    sharded = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                       auto_wrap_policy=policy, use_orig_params=True,
                                       sync_module_states=False, device_id=device)
    held = sum(p.numel() for p in sharded.parameters())

    sharded.train()
    rows = []
    for step in range(1, cfg.train.max_steps + 1):
        step_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps * world)]
        step_targets = sum(int((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for mb in step_batches)
        micro_batches = step_batches[rank::world]
        step_loss = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else sharded.no_sync():
                loss = sharded(**data_lib.model_inputs(mb, model, device), num_items_in_batch=step_targets).loss
                (loss * world).backward()
            step_loss += loss.item()
        total = torch.tensor(step_loss, dtype=torch.float64)
        dist.all_reduce(total)
        grad_norm = float(sharded.clip_grad_norm_(cfg.optim.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({"step": step, "loss": total.item(), "grad_norm": grad_norm})

    # On the CPU the gathered state stays where it is: offload_to_cpu=True (accelerate's setting,
    # right on GPUs) frees the very storage it copies from here and crashes.
    with FullyShardedDataParallel.state_dict_type(sharded, StateDictType.FULL_STATE_DICT,
                                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        state = sharded.state_dict()
    shards = [None] * world
    dist.all_gather_object(shards, held)
    if rank == 0:  # the recipe's FSDP save, from the gathered state
        save_adapter(model, tokenizer, out / "adapter", _quantization_record(cfg, loaded.compute_dtype), state)
        (out / "losses.json").write_text(json.dumps(rows))
        (out / "shards.json").write_text(json.dumps({"whole": whole, "held": shards}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
