"""The recipe itself (`finetune.train`) under FSDP on the CPU, as one of two processes.

    torchrun --nproc_per_node=2 fsdp_cpu_recipe.py RECIPE key=value ...

accelerate runs FSDP on GPUs only: on the CPU it starts the processes as DDP over gloo. This has the
recipe take them for FSDP: the accelerator reports FSDP1 with use_orig_params, the first process
loading the native base (recipes/accelerate/fsdp.yaml), and torch's FSDP wraps the model as
fsdp_cpu_worker.py wraps it, where accelerate would. The rest is the recipe's own: loading, set-up,
the reference, steps, evaluation, checkpoints and resume.
"""

import sys
from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp import _init_utils as fsdp_init_utils

import finetune
from finetune import recipe
from finetune.training.processes import check_processes

# torch refuses to broadcast CPU tensors for sync_module_states because NCCL cannot; gloo can, and
# this is the only way to run the first-process loading on the CPU (the GPU tests run it unpatched).
fsdp_init_utils._check_module_states_for_sync_module_states = lambda states: None

start_processes = recipe.start_processes


def start_as_fsdp(cfg, resumed_state=None):
    processes = start_processes(cfg)  # DDP's, checked as such; checked again as FSDP's below
    state = processes.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = SimpleNamespace(fsdp_version=1, use_orig_params=True, cpu_ram_efficient_loading=True)
    check_processes(cfg, processes.accelerator, processes.fsdp, resumed_state)
    return processes


def wrap_as_accelerate(processes, model, optimizer):
    sharded = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                       auto_wrap_policy=model.fsdp_wrap_policy(), use_orig_params=True,
                                       sync_module_states=True, device_id=torch.device("cpu"),
                                       param_init_fn=model.fsdp_param_init(processes.device))
    processes.accelerator._models.append(sharded)  # so its clip_grad_norm_ takes FSDP's, over every shard
    return sharded, optimizer


if __name__ == "__main__":
    recipe.start_processes, recipe.wrap_for_processes = start_as_fsdp, wrap_as_accelerate
    finetune.train(sys.argv[1], sys.argv[2:])
