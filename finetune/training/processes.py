"""The processes a run trains in: this one alone, or one of several started by `accelerate launch`
or torchrun; the device each trains on, the checks of what they can run, and the wrapping that
averages gradients across them."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from finetune.config import ConfigError, ModelImpl, RunConfig
from finetune.models import TrainableModel
from finetune.training.optim import check_optimizer_device


@dataclass
class Processes:
    accelerator: Accelerator
    device: torch.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.accelerator.distributed_type is DistributedType.FSDP

    @property
    def engine(self) -> str:
        return "FSDP" if self.fsdp else "DDP" if self.world > 1 else "one process"

    def say(self, line: str) -> None:
        """One console: the first process speaks for all."""
        self.accelerator.print(line)


def start_processes(cfg: RunConfig, resumed_state=None) -> Processes:
    """This process's accelerator and device, refusing (before anything loads) what they cannot run.

    Started alone, it trains on train.device, and the accelerator only answers for one process
    (the main one; nothing to wait for or reduce). Started by `accelerate launch` or torchrun as one
    of several, it trains on the device accelerate gives its rank: cuda:LOCAL_RANK over NCCL, or
    the CPU over gloo when train.device picks the CPU.
    """
    device = pick_device(cfg.train.device)
    check_optimizer_device(cfg.optim, device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        processes = Processes(Accelerator(device_placement=False), device)
    else:
        if device.type == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            # Before the Accelerator: its FSDP plugin fails on a machine without GPUs, and where it
            # does start, accelerate quietly trains CPU processes under DDP instead.
            raise ConfigError("the accelerate config asks for FSDP, which accelerate runs on GPUs only, and these "
                              "processes train on the CPU: launch with recipes/accelerate/cpu.yaml (DDP) there.")
        # Every process loads the same frozen weights, so DDP need not broadcast buffers before each
        # forward (the native model keeps its 4-bit weights in buffers).
        unsynced_buffers = DistributedDataParallelKwargs(broadcast_buffers=False)
        accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False,
                                  kwargs_handlers=[unsynced_buffers])
        processes = Processes(accelerator, accelerator.device)
    check_processes(cfg, processes.accelerator, processes.fsdp, resumed_state)
    return processes


def check_processes(cfg: RunConfig, accelerator: Accelerator, fsdp: bool, resumed_state=None) -> None:
    """Refuse, before anything loads, what these processes cannot run (or resume)."""
    world = accelerator.num_processes
    if resumed_state is not None:
        if resumed_state.world_size != world:
            n = resumed_state.world_size
            raise ConfigError(f"the checkpoint was trained by {n} process(es), this run has {world}: every "
                              "process's random state and share of each step are in the checkpoint, so resume with "
                              f"{n} (e.g. accelerate launch --num_processes {n} ...), or pass train.overwrite=true to "
                              "start over.")
        if resumed_state.fsdp != fsdp:
            trained, now = ("under FSDP", "without it") if resumed_state.fsdp else ("without FSDP", "under FSDP")
            raise ConfigError(f"the checkpoint was trained {trained}, and this run is {now}: its optimizer state "
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
    if cfg.train.eval_generate or cfg.train.sample_prompts:
        raise ConfigError("generating text (train.eval_generate, train.sample_prompts) is not supported under FSDP "
                          "yet: pass train.eval_generate=0 'train.sample_prompts=[]'.")


def check_model_path(cfg: RunConfig, fsdp: bool, impl: ModelImpl) -> None:
    """What these processes cannot run on the model path chosen for this run (before it loads)."""
    if fsdp and impl is ModelImpl.hf:
        check_fsdp_quant_storage(cfg)


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


def wrap_for_processes(processes: Processes, model: TrainableModel, optimizer):
    """Under several processes, accelerate wraps the model in DDP (each process holds the whole
    4-bit base) or FSDP (each holds a shard), as `accelerate launch` was configured; either averages
    the LoRA gradients across processes in backward. One process trains the model as built."""
    if processes.world == 1:
        return model, optimizer
    if processes.fsdp:
        plugin = processes.accelerator.state.fsdp_plugin
        plugin.auto_wrap_policy = model.fsdp_wrap_policy()
        # accelerate's own param_init_fn would replace the parameters the optimizer holds.
        plugin.param_init_fn = model.fsdp_param_init(processes.device) or plugin.param_init_fn
    return processes.accelerator.prepare(model, optimizer)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(processes: Processes) -> float:
    """GPU: peak allocated by torch since the counter was last reset (training resets it as it
    begins; before that, the loading peak). CPU: the process's peak resident memory.

    With several processes, the largest of theirs: under FSDP the first process is not always the
    fullest. Every process must call this.
    """
    device = processes.device
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    if processes.world > 1:
        peak = processes.accelerator.gather(torch.tensor([peak], device=device)).max().item()
    return peak


def memory_line(model: TrainableModel, device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated on the GPU"
    return f"{model.memory_footprint() / 2**20:.1f} MiB of weights in host memory"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
