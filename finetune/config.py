"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

Hydra merges the recipe YAML onto these dataclasses at compose time, so an unknown key or a
value of the wrong type (including an enum value outside its choices) fails before anything
runs, naming the key. Range checks that types cannot express live in `validate()` methods and
raise `ConfigError`; they never rewrite a value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from finetune.errors import UserError


class ConfigError(UserError):
    """A configuration value that is well-typed but unusable; the message says how to fix it."""


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class QuantType(str, enum.Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class ModelImpl(str, enum.Enum):
    hf = "hf"


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    paged_adamw_8bit = "paged_adamw_8bit"


class Scheduler(str, enum.Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LossOn(str, enum.Enum):
    assistant = "assistant"


class Tracker(str, enum.Enum):
    jsonl = "jsonl"


@dataclass
class ModelConfig:
    """The frozen base model."""

    # A local HF model directory, a hub id, or "demo" for the tiny model the demo builds itself.
    name_or_path: str = MISSING
    impl: ModelImpl = ModelImpl.hf
    # Activation checkpointing: recompute each layer in backward instead of storing it.
    gradient_checkpointing: bool = True
    # Attention backend handed to transformers ("sdpa" picks PyTorch's flash/cuDNN kernels).
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class QuantConfig:
    """4-bit storage of the frozen linear layers; field names are BitsAndBytesConfig's."""

    load_in_4bit: bool = True
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = True
    # Dtype of the matmuls; falls back to float32 (with a notice) where the device lacks bf16.
    bnb_4bit_compute_dtype: Dtype = Dtype.bfloat16
    # Dtype the checkpoint's weights are cast to before they are quantized.
    torch_dtype: Dtype = Dtype.bfloat16

    def validate(self) -> None:
        if not self.load_in_4bit:
            raise ConfigError(
                "quant.load_in_4bit=false is not supported: this framework trains QLoRA on a "
                "4-bit base. Remove the override."
            )


@dataclass
class LoraConfig:
    """LoRA adapters; field names are peft.LoraConfig's."""

    r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # "all-linear" or a list of module names such as [q_proj, v_proj].
    target_modules: Any = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}. Typical values: 8, 16, 64.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora.lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        modules = self.target_modules
        if isinstance(modules, str):
            ok = bool(modules)
        else:
            ok = isinstance(modules, (list, tuple)) and modules and all(isinstance(m, str) and m for m in modules)
        if not ok:
            raise ConfigError(
                f"lora.target_modules must be 'all-linear' or a non-empty list of module names, got {modules!r}."
            )


@dataclass
class DataConfig:
    """Training data: JSONL files of chat `messages`."""

    # A JSONL file with one {"messages": [...]} object per line, or "demo".
    path: str = MISSING
    # A separate evaluation file; when unset, `eval_fraction` of `path` is held out (seeded).
    eval_path: Optional[str] = None
    eval_fraction: float = 0.05
    max_seq_len: int = 2048
    loss_on: LossOn = LossOn.assistant

    def validate(self) -> None:
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be at least 8, got {self.max_seq_len}.")
        if self.eval_path is None and not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(
                f"data.eval_fraction must be in (0, 1) when data.eval_path is unset, got {self.eval_fraction}."
            )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Optimizer = Optimizer.adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Gradients are clipped to this global L2 norm; 0 disables clipping.
    max_grad_norm: float = 1.0
    scheduler: Scheduler = Scheduler.cosine
    warmup_steps: int = 0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}. QLoRA typically uses 1e-4 to 3e-4.")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")


@dataclass
class TrainConfig:
    """The training loop."""

    seed: int = 42
    max_steps: int = 1000
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    log_every: int = 1
    # Evaluate every N optimizer steps (0: only before and after training).
    eval_every: int = 0
    # Save the adapter to checkpoints/step-N every N optimizer steps (0: only at the end).
    save_every: int = 0
    # Greedy-generate answers for this many eval prompts and report exact-match accuracy.
    eval_generate: int = 0
    max_new_tokens: int = 16
    # "auto" picks CUDA when available.
    device: str = "auto"

    def validate(self) -> None:
        positive = {
            "train.max_steps": self.max_steps,
            "train.micro_batch_size": self.micro_batch_size,
            "train.gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train.log_every": self.log_every,
            "train.max_new_tokens": self.max_new_tokens,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value}.")
        for key, value in {"train.eval_every": self.eval_every, "train.save_every": self.save_every,
                           "train.eval_generate": self.eval_generate}.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (0 disables it), got {value}.")


@dataclass
class TrackerConfig:
    """Experiment tracking. metrics.jsonl is always written."""

    backends: List[Tracker] = field(default_factory=lambda: [Tracker.jsonl])


@dataclass
class RunConfig:
    """A whole run: one field per config group, plus where everything is written."""

    # Name of the recipe (set by recipe/<name>.yaml), used in default output paths.
    name: str = MISSING
    output_dir: str = MISSING
    # Where the demo base model and other generated artifacts are cached between runs.
    cache_dir: str = "~/.cache/finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)

    def validate(self) -> None:
        for group in (self.quant, self.lora, self.data, self.optim, self.train):
            group.validate()


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "tracker": TrackerConfig,
}


def register_configs() -> None:
    """Register the run schema and one schema per group, referenced from recipes/ defaults lists."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)
