"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

Hydra merges the recipe YAML onto these dataclasses at compose time, so an unknown key or a
value of the wrong type (including an enum value outside its choices) fails before anything
runs, naming the key. Range checks that types cannot express live in `validate()` methods and
raise `ConfigError`; they never rewrite a value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from finetune.errors import UserError
from finetune.sweep import default_output_dir, sweep_group


class ConfigError(UserError):
    """A configuration value that is well-typed but unusable; the message says how to fix it."""


def checked_options(schema: type, options: Callable[[], Any], hint: str = "", error: type = UserError):
    """A command-line tool's options (a dotlist or mapping, built by `options` inside the check, as
    building can fail too) as an instance of the dataclass `schema`: a missing required option,
    an unknown key or a wrong type is one `error` naming the option, followed by `hint`."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), options()))
    except MissingMandatoryValue as e:
        raise error(f"missing required option {e.full_key}=...{hint}") from None
    except OmegaConfBaseException as e:
        raise error(f"bad option {e.full_key!r}: {str(e.msg).splitlines()[0]}{hint}") from None


def options_from_args(schema: type, argv: list[str], hint: str = "", error: type = UserError):
    """`key=value` command-line arguments as `checked_options` of `schema`."""
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise error(f"expected key=value, got {arg!r}{hint}")
    return checked_options(schema, lambda: OmegaConf.from_dotlist(argv), hint, error)


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class QuantType(str, enum.Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class QuantStorage(str, enum.Enum):
    # bitsandbytes' default: two 4-bit values per byte.
    uint8 = "uint8"
    # The same bytes viewed as a float dtype, so FSDP can flatten them with a layer's other weights.
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class ModelImpl(str, enum.Enum):
    # native when the checkpoint's architecture is one it supports (and the LoRA settings too), else hf.
    auto = "auto"
    # Our Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3): fused kernels, packed attention.
    native = "native"
    # transformers + bitsandbytes + peft: any causal LM, and the reference the native path is tested against.
    hf = "hf"


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    paged_adamw_8bit = "paged_adamw_8bit"


class Scheduler(str, enum.Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DataFormat(str, enum.Enum):
    # Chat conversations: a list of {role, content} messages rendered with the chat template.
    messages = "messages"
    # Alpaca rows (instruction, optional input, output), rendered as a user/assistant exchange.
    instruction = "instruction"
    # Plain prompt and completion strings, concatenated without a template.
    prompt_completion = "prompt_completion"
    # Plain text for continued pre-training; every token is trained.
    text = "text"
    # Preference pairs for DPO-style objectives: {prompt, chosen, rejected}, each a string or a
    # message list, or conversation pairs (chosen and rejected whole conversations that differ only
    # in their last assistant turn, no prompt). Rendered with the chat template.
    preference = "preference"
    # KTO rows {prompt, completion, label}: one completion, label true when it is desirable.
    kto = "kto"


class LossOn(str, enum.Enum):
    # Every assistant turn (the completion, the output), through its end-of-turn token.
    assistant = "assistant"
    # Only the final assistant turn: earlier turns are context.
    last_assistant = "last_assistant"
    # Every turn of every role, each with its template header and end-of-turn token.
    all_turns = "all_turns"
    # Every token of the rendered text, template scaffolding included.
    everything = "everything"


class Truncation(str, enum.Enum):
    # Keep the first max_seq_len tokens.
    truncate = "truncate"
    # Leave the whole sample out.
    drop = "drop"


class ObjectiveName(str, enum.Enum):
    # Supervised fine-tuning: next-token cross-entropy on the trained tokens.
    sft = "sft"
    # Direct Preference Optimization (Rafailov et al. 2023), with objective.loss_type.
    dpo = "dpo"
    # Identity Preference Optimization (Azar et al. 2023): DPO with loss_type=ipo.
    ipo = "ipo"
    # Odds Ratio Preference Optimization (Hong et al. 2024): SFT on chosen + odds-ratio term; no reference.
    orpo = "orpo"
    # Simple Preference Optimization (Meng et al. 2024): length-normalized rewards, a margin; no reference.
    simpo = "simpo"
    # Kahneman-Tversky Optimization (Ethayarajh et al. 2024): unpaired desirable/undesirable completions.
    kto = "kto"


class DpoLossType(str, enum.Enum):
    # -log sigmoid(h), with label_smoothing the conservative DPO of Mitchell (2023).
    sigmoid = "sigmoid"
    # relu(1 - h) (SLiC, Zhao et al. 2023).
    hinge = "hinge"
    # (h / beta - 1 / (2 beta))^2 (Azar et al. 2023), h from per-token mean log-probs (as the authors ran it).
    ipo = "ipo"
    # Robust DPO (Chowdhury et al. 2024): unbiased under label_smoothing flipped labels.
    robust = "robust"


# Objectives trained on {prompt, chosen, rejected} pairs, and on KTO's {prompt, completion, label}.
PAIR_OBJECTIVES = (ObjectiveName.dpo, ObjectiveName.ipo, ObjectiveName.orpo, ObjectiveName.simpo)
OBJECTIVES_BY_DATA_FORMAT = {"preference": PAIR_OBJECTIVES, "kto": (ObjectiveName.kto,)}


class Resume(str, enum.Enum):
    # Start fresh; an output_dir holding an earlier run is refused (see train.overwrite).
    never = "never"
    # Continue from the newest complete checkpoint in output_dir, or start fresh if there is none.
    auto = "auto"


class OffloadMode(str, enum.Enum):
    # The cheapest choice that fits the GPU: nothing offloaded, then activations, then weights, then both.
    auto = "auto"
    # Everything stays on the GPU.
    none = "none"
    # Checkpointed layer inputs wait in pinned host memory until backward (needs gradient checkpointing).
    activations = "activations"
    # The 4-bit layer weights live in pinned host memory and stream to the GPU a few layers at a time.
    weights = "weights"
    # Both of the above.
    all = "all"


class WandbMode(str, enum.Enum):
    # Online when an API key is configured and the server answers, offline otherwise.
    auto = "auto"
    online = "online"
    offline = "offline"


@dataclass
class ModelConfig:
    """The frozen base model."""

    # A local HF model directory, a hub id, or "demo" for the tiny model the demo builds itself.
    name_or_path: str = MISSING
    impl: ModelImpl = ModelImpl.auto
    # Activation checkpointing: recompute each layer in backward instead of storing it.
    gradient_checkpointing: bool = True
    # Attention backend handed to transformers ("sdpa" picks PyTorch's flash/cuDNN kernels).
    attn_implementation: str = "sdpa"
    # Native path: Triton kernels (RMSNorm, RoPE, SwiGLU, NF4 dequantize, fused LM head + loss) on
    # CUDA. The CPU always runs their plain-PyTorch references.
    use_kernels: bool = True
    # Native path: torch.compile each decoder layer. Trains like eager, but measured slower on an
    # H100 (0.79x on the 8B): the hot paths are already fused kernels and cuBLAS GEMMs.
    compile: bool = False
    # Native path, with gradient_checkpointing: how many decoder layers (the first ones) recompute in
    # backward. The others keep their activations: each layer left out saves about a sixth of its
    # matmul work and costs its activations' memory (train.dry_run shows how much). auto: on a GPU,
    # the fewest that let the run fit hardware.gpu_memory_gb (or the free memory), as the memory plan
    # works it out; all layers elsewhere. all (or null): every layer. A number: that many.
    checkpoint_layers: Optional[str] = "auto"
    # Native path, training: run each layer's MLP over at most this many tokens at a time, each
    # chunk recomputed in its backward, so the MLP's intermediates (3 x intermediate_size values
    # per token) exist for one chunk only. For very long sequences (tens of thousands of tokens);
    # costs about one more MLP forward per step. null: the whole micro-batch at once, unless the
    # memory plan (CUDA) finds that the step fits only in chunks: then 8,192-token ones, and it says so.
    mlp_chunk_tokens: Optional[int] = None
    # Native path, CUDA: park each checkpointed layer's input in pinned host memory until backward.
    # Needs gradient_checkpointing. The copies run on a side stream behind the compute, so it costs
    # host memory and PCIe traffic rather than time: Llama-3-8B recomputing every layer ran 0.97x at
    # 2 x 2048 (7.1 GiB instead of 7.9), 1.00x at 1 x 8192 (7.9 instead of 9.7) and 1.01x at
    # 1 x 32768 (12.9 instead of 20.2) against keeping the inputs on the GPU (H100).
    offload_checkpoints: bool = False
    # Native path, with offload_checkpoints (or hardware.offload parking activations), rows of 4,096
    # tokens or more: a recomputed layer parks its q/k/v projections, attention's output and
    # log-sum-exp and its residual beside its input, so that its recompute runs neither attention's
    # forward nor the q/k/v and o_proj GEMMs (models/native/kept_attention.py). Costs pinned host
    # memory and, on the GPU, those tensors for each of the two layers in flight (Llama-3-8B: 28 KiB
    # a token each). false: recompute them.
    keep_attention: bool = True
    # Native path, CUDA, training, an LM head with weights of its own (not tied to the embeddings):
    # the input embedding table stays in page-locked host memory and each forward reads the rows its
    # tokens name over the bus (models/native/host_embedding.py): 1.0 GiB less on the GPU for
    # Llama-3-8B, 2.1 GB for a 70B, for 32 MiB read per 4,096 tokens. Off until measured on a GPU.
    host_embeddings: bool = False
    # Native path, CUDA: up to this many layers besides the recomputed ones (any larger number: all the
    # others) are not recomputed either, and park everything they save for backward in pinned host
    # memory, copied out and back behind the compute (finetune/models/native/parking.py); they are
    # spread evenly among the recomputed layers (Decoder.set_checkpointing). For long
    # sequences with MLP chunks, where a layer's compute outlasts its copies: Llama-3-8B at
    # 1 x 32768 with checkpoint_layers=0, parked_layers=32, mlp_chunk_tokens=8192 trained 1.11x
    # faster than recomputing every layer, at 10.7 GiB instead of 20.2 (H100), pinning ~36 GiB of
    # host memory (train.dry_run=true shows how much; a run that would pin more than the machine has
    # is refused). Short sequences wait for the link instead: 0.60x at 2 x 2048. Not with model.compile.
    parked_layers: int = 0
    # Native path: a directory for the pre-quantized (NF4) base. Read when it exists (it must come
    # from this checkpoint with these quant settings), written after quantizing when it does not;
    # later runs then skip reading and quantizing the checkpoint. name_or_path may also be a cache.
    nf4_cache: Optional[str] = None
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # A LoRA adapter directory (peft's format, e.g. an SFT run's OUTPUT_DIR/adapter) to start from:
    # its weights are loaded into the trainable adapter, which then trains on; lora.r, lora_alpha,
    # use_rslora and target_modules must match it. Preference objectives take it as their reference
    # model. "demo": the demo recipe's adapter, trained once (a short run) and kept in cache_dir.
    adapter: Optional[str] = None

    def validate(self) -> None:
        requested = self.requested_checkpoint_layers()
        if isinstance(requested, int) and not self.gradient_checkpointing:
            raise ConfigError(f"model.checkpoint_layers={requested} picks layers to checkpoint; "
                              "it needs model.gradient_checkpointing=true.")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ConfigError("model.offload_checkpoints=true offloads the inputs of checkpointed layers; "
                              "it needs model.gradient_checkpointing=true.")
        if self.parked_layers < 0:
            raise ConfigError(f"model.parked_layers must be 0 or more, got {self.parked_layers}.")
        if self.parked_layers and self.compile:
            raise ConfigError("model.parked_layers parks activations through saved-tensor hooks, which "
                              "torch.compile does not trace; pass model.compile=false or model.parked_layers=0.")
        if self.parked_layers and self.impl is ModelImpl.hf:
            raise ConfigError(f"model.parked_layers={self.parked_layers} applies to the native model path, and "
                              "model.impl=hf takes the generic one; remove it.")
        if self.mlp_chunk_tokens is not None and self.mlp_chunk_tokens < 1:
            raise ConfigError(f"model.mlp_chunk_tokens must be a positive number of tokens (or null), "
                              f"got {self.mlp_chunk_tokens}.")
        if self.impl is ModelImpl.hf and isinstance(requested, int):
            raise ConfigError(f"model.checkpoint_layers={requested} applies to the native model path, "
                              "and model.impl=hf takes the generic one; remove it.")

    def requested_checkpoint_layers(self) -> int | str:
        """model.checkpoint_layers read: a number of layers, "auto" or "all"."""
        value = self.checkpoint_layers
        if value is None or value == "all":
            return "all"
        if value == "auto":
            return "auto"
        try:
            layers = int(value)
        except ValueError:
            layers = None
        if layers is None or layers < 0:
            raise ConfigError(f"model.checkpoint_layers={value!r}: pass auto, all, or a number of layers >= 0.")
        return layers

    def plans_checkpoint_layers(self) -> bool:
        """Whether the memory plan picks how many layers recompute (checkpoint_layers=auto, checkpointing on)."""
        return self.gradient_checkpointing and self.requested_checkpoint_layers() == "auto"

    def checkpointed_layers(self, num_layers: int, auto: int | None = None) -> int:
        """How many of `num_layers` layers recompute in backward (gradient_checkpointing, checkpoint_layers).

        `auto` is the memory plan's answer for checkpoint_layers=auto (None: all layers). The
        native model path takes the result as it is; the generic path checkpoints all layers or none.
        """
        if not self.gradient_checkpointing:
            return 0
        requested = self.requested_checkpoint_layers()
        if requested == "all":
            return num_layers
        if requested == "auto":
            return num_layers if auto is None else auto
        if not 0 <= requested <= num_layers:
            raise ConfigError(f"model.checkpoint_layers={requested}, but the model has {num_layers} "
                              f"layers; pick 0 to {num_layers} (or auto, or all).")
        return requested


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
    # Dtype the packed 4-bit weights are stored in (the values are the same either way). FSDP
    # flattens each layer's weights into one tensor of one dtype: under FSDP set it to torch_dtype.
    bnb_4bit_quant_storage: QuantStorage = QuantStorage.uint8

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


# The fields each format reads; data.columns names the dataset column holding each.
FORMAT_COLUMNS = {
    DataFormat.messages: ("messages",),
    DataFormat.instruction: ("instruction", "input", "output"),
    DataFormat.prompt_completion: ("prompt", "completion"),
    DataFormat.text: ("text",),
    DataFormat.preference: ("prompt", "chosen", "rejected"),
    DataFormat.kto: ("prompt", "completion", "label"),
}
# Formats whose rows are tokenized into preference pairs (finetune/data/preference.py), not samples.
PREFERENCE_DATA_FORMATS = (DataFormat.preference, DataFormat.kto)


@dataclass
class DataColumns:
    """The dataset column holding each format field, where yours differ: e.g. messages: conversations."""

    messages: str = "messages"
    instruction: str = "instruction"
    # Optional in the data: rows without it are instructions alone.
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    chosen: str = "chosen"
    rejected: str = "rejected"
    # KTO: true for a desirable completion, false for an undesirable one.
    label: str = "label"


@dataclass
class DataSource:
    """One dataset of a mixture."""

    # A local .json/.jsonl/.parquet/.csv/.arrow file, a directory written by `save_to_disk`, or a
    # Hugging Face hub dataset name.
    path: str = MISSING
    # Share of the training samples drawn from this source, relative to the other sources' weights;
    # a source is repeated (upsampled) when its share exceeds its size.
    weight: float = 1.0
    # Hub datasets only: the configuration ("subset") and split to load.
    subset: Optional[str] = None
    split: str = "train"
    # Override data.format and data.columns for this source, to mix e.g. chat and plain text.
    format: Optional[DataFormat] = None
    columns: Optional[DataColumns] = None


@dataclass
class DataConfig:
    """Training data: which datasets, how they are rendered and masked, and how batches are built."""

    # Single-source shorthand for `sources`: a file, a hub dataset name, or "demo" (the demo's chats;
    # with data.format=preference its preference pairs, with data.format=kto its KTO rows).
    path: Optional[str] = None
    # Several datasets mixed by weight, e.g. [{path: a.jsonl, weight: 0.7}, {path: b.parquet, weight: 0.3}].
    sources: List[DataSource] = field(default_factory=list)
    # A separate evaluation set (file or hub dataset, read with data.format and data.columns); when
    # unset, `eval_fraction` of each source is held out (seeded by train.seed).
    eval_path: Optional[str] = None
    # Hub evaluation sets only: the split `eval_path` names.
    eval_split: str = "test"
    eval_fraction: float = 0.05
    format: DataFormat = DataFormat.messages
    columns: DataColumns = field(default_factory=DataColumns)
    # Chat template: "chatml" or a Jinja string. Unset: the tokenizer's own, or chatml when it has
    # none. Whatever renders the data is also set on the tokenizer saved with the adapter.
    chat_template: Optional[str] = None
    # SFT formats only: preference objectives always score each whole response.
    loss_on: LossOn = LossOn.assistant
    max_seq_len: int = 2048
    # What happens to samples longer than max_seq_len. Preference data: a pair is too long when its
    # prompt plus its longer response exceeds max_seq_len (KTO: prompt plus completion). `truncate`
    # then keeps the prompt's LAST tokens, cut only as far as needed but never below max_seq_len // 2
    # of them (a shorter prompt stays whole), and cuts the responses' ENDS to the room left; `drop`
    # leaves the pair out. Pairs whose chosen and rejected tokens are identical (after truncation)
    # carry no preference and are dropped with a warning.
    truncation: Truncation = Truncation.truncate
    # Concatenate samples into one row per micro-batch (up to micro_batch_size * max_seq_len
    # tokens), with attention kept inside each sample: no padding is computed. Preference pairs:
    # each micro-batch's chosen and rejected sequences share one row; KTO: its completions one row,
    # their KL rows another.
    packing: bool = False
    # Worker processes for tokenizing; unset: one per CPU core, at most 8.
    num_proc: Optional[int] = None
    # Print this many rendered training samples with their trained tokens marked, then exit.
    preview: int = 0

    def validate(self) -> None:
        self.validate_shape()
        if self.path is None and not self.sources:
            raise ConfigError("no training data: pass data.path=FILE_OR_HUB_NAME or "
                              "data.sources=[{path: ..., weight: ...}, ...].")

    def validate_shape(self) -> None:
        """The rules a memory plan depends on; it needs no data."""
        if self.path is not None and self.sources:
            raise ConfigError(f"data.path={self.path!r} and data.sources are both set; pass one of them "
                              "(data.path is the shorthand for a single source; data.path=null clears a "
                              "recipe's).")
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be at least 8, got {self.max_seq_len}.")
        if self.eval_path is None and not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(
                f"data.eval_fraction must be in (0, 1) when data.eval_path is unset, got {self.eval_fraction}."
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be a positive integer, got {self.num_proc}.")
        if self.preview < 0:
            raise ConfigError(f"data.preview must be >= 0 (0 trains as usual), got {self.preview}.")
        for index, source in enumerate(self.sources):
            if source.weight <= 0:
                raise ConfigError(f"data.sources[{index}].weight must be positive, got {source.weight}.")
        self._validate_preference()

    def _validate_preference(self) -> None:
        formats = {"data.format": self.format,
                   **{f"data.sources[{i}].format": s.format for i, s in enumerate(self.sources) if s.format}}
        if not any(value in PREFERENCE_DATA_FORMATS for value in formats.values()):
            return
        if len(set(formats.values())) > 1:
            listed = ", ".join(f"{key}={value.value}" for key, value in formats.items())
            raise ConfigError(f"preference data cannot be mixed with other formats ({listed}): every source of a "
                              "preference run is read as data.format=preference (or kto for KTO); set data.format "
                              "once and leave the sources' format unset.")


@dataclass
class ObjectiveConfig:
    """What training optimizes: next-token cross-entropy (sft) or a preference objective.

    Preference objectives score whole responses by their summed token log-probs log pi(y|x); DPO,
    IPO and KTO compare them with a reference model's, log pi_ref(y|x): the same 4-bit base with
    the adapter switched off, or the adapter the run started from (model.adapter) as it was then.
    """

    name: ObjectiveName = ObjectiveName.sft
    # DPO/KTO: the strength of the implicit KL penalty toward the reference (rewards are
    # beta * log pi/pi_ref); IPO: its tau; SimPO: the reward scale (the paper's beta, ~2);
    # ORPO: only scales the logged rewards (beta * mean token log-prob), as in TRL.
    beta: float = 0.1
    # DPO only (objective=ipo implies ipo).
    loss_type: DpoLossType = DpoLossType.sigmoid
    # DPO sigmoid and robust, SimPO: the assumed share of pairs whose preference label is flipped, in [0, 0.5).
    label_smoothing: float = 0.0
    # SimPO: the target reward margin gamma in -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l)
    # - gamma), absolute (TRL's simpo_gamma). The paper's tables give gamma/beta: gamma = ratio * beta.
    gamma: float = 1.0
    # ORPO: lambda, the weight of the odds-ratio term beside the chosen responses' NLL ("lambda" is
    # a Python keyword, hence the prefix).
    orpo_lambda: float = 0.1
    # KTO: weights of the desirable and undesirable completions' losses (lambda_D, lambda_U). With
    # unbalanced data the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # DPO/IPO: compute the reference log-probs of every training pair once before training and
    # keep them in OUTPUT_DIR/reference_logps.safetensors (recomputed when the data, base, adapter
    # or lengths change) instead of one extra no-grad forward per step.
    precompute_reference: bool = False

    @property
    def needs_reference(self) -> bool:
        return self.name in (ObjectiveName.dpo, ObjectiveName.ipo, ObjectiveName.kto)

    def validate(self) -> None:
        name = self.name.value
        if self.beta <= 0:
            raise ConfigError(f"objective.beta must be positive, got {self.beta}. "
                              "Typical: 0.1 (dpo, kto), 2.0 (simpo).")
        if self.name is ObjectiveName.ipo and self.loss_type not in (DpoLossType.sigmoid, DpoLossType.ipo):
            raise ConfigError(f"objective=ipo is DPO with loss_type=ipo; objective.loss_type={self.loss_type.value} "
                              "contradicts it. Remove the override, or use objective=dpo.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        smoothable = (self.name is ObjectiveName.simpo or self.name is ObjectiveName.dpo
                      and self.loss_type in (DpoLossType.sigmoid, DpoLossType.robust))
        if self.label_smoothing and not smoothable:
            raise ConfigError(f"objective.label_smoothing={self.label_smoothing} applies to dpo with loss_type "
                              f"sigmoid or robust, and to simpo; objective={name}"
                              f"{' loss_type=' + self.loss_type.value if self.name is ObjectiveName.dpo else ''} "
                              "has none. Remove it.")
        if self.gamma < 0:
            raise ConfigError(f"objective.gamma must be >= 0, got {self.gamma}.")
        if self.orpo_lambda <= 0:
            raise ConfigError(f"objective.orpo_lambda must be positive, got {self.orpo_lambda}.")
        for key, value in {"objective.desirable_weight": self.desirable_weight,
                           "objective.undesirable_weight": self.undesirable_weight}.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}.")
        if self.precompute_reference and self.name not in (ObjectiveName.dpo, ObjectiveName.ipo):
            why = ("its KL estimate pairs completions by batch, so their reference log-probs run in the step"
                   if self.name is ObjectiveName.kto else "it has no reference model")
            raise ConfigError(f"objective.precompute_reference=true applies to dpo and ipo; objective={name}: {why}. "
                              "Remove it.")

    def validate_data(self, formats: set[str]) -> None:
        """`formats`: the data.format of every training source."""
        wanted = next((f for f, names in OBJECTIVES_BY_DATA_FORMAT.items() if self.name in names), None)
        if wanted is None:
            given = sorted(formats & set(OBJECTIVES_BY_DATA_FORMAT))
            if given:
                raise ConfigError(f"data.format={given[0]} holds preference data, which objective=sft cannot train "
                                  f"on; pick a preference objective (objective=dpo, ...) or SFT data.")
            return
        if formats != {wanted}:
            raise ConfigError(f"objective={self.name.value} trains on data.format={wanted} rows, got data.format="
                              f"{', '.join(sorted(formats))}. Set data.format={wanted} (and data.columns.* "
                              "if your columns are named otherwise).")


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
    # User messages answered greedily at every evaluation, printed and logged as a table.
    sample_prompts: List[str] = field(default_factory=list)
    max_new_tokens: int = 16
    # "auto" picks CUDA when available.
    device: str = "auto"
    resume: Resume = Resume.never
    # Start over in an output_dir that holds an earlier run: its run files are replaced
    # (adapter, checkpoints, metrics, config, tracker files); other files are left alone.
    overwrite: bool = False
    # Complete checkpoints kept in output_dir/checkpoints (older ones are deleted).
    keep_last: int = 3
    # A non-finite loss or gradient norm skips that update; this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # Print the memory plan of this recipe on hardware.* and stop: loads no weights, needs no
    # network for the known architectures, writes nothing.
    dry_run: bool = False

    def validate(self) -> None:
        positive = {
            "train.max_steps": self.max_steps,
            "train.micro_batch_size": self.micro_batch_size,
            "train.gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train.log_every": self.log_every,
            "train.max_new_tokens": self.max_new_tokens,
            "train.keep_last": self.keep_last,
            "train.max_nonfinite_steps": self.max_nonfinite_steps,
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
    """Experiment tracking. OUTPUT_DIR/metrics.jsonl is always written; these add backends.

    Pick with `tracker=wandb`, `tracker=tensorboard`, `tracker=[wandb,tensorboard]` or `tracker=none`.
    """

    wandb: bool = False
    tensorboard: bool = False
    wandb_mode: WandbMode = WandbMode.auto
    # wandb project; runs of one sweep share `group`.
    project: str = "finetune"
    entity: Optional[str] = None
    # Defaults to the output directory's name.
    run_name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # Set on resume so the tracker continues the same run.
    run_id: Optional[str] = None


@dataclass
class HardwareConfig:
    """The GPU a run is planned for (see train.dry_run), and what may move to host memory."""

    # GPU memory for the run in GiB (2**30 bytes: a "24 GB" card is 24). Unset: the free memory of
    # the current CUDA device, or 24 (a common consumer card) where there is none.
    gpu_memory_gb: Optional[float] = None
    offload: OffloadMode = OffloadMode.auto
    # Pinned host-to-GPU copy rate in GB/s (bytes, not bits), for the weight-streaming time estimate.
    # Unset: 25, PCIe 4.0 x16.
    host_link_gbps: Optional[float] = None

    def validate(self) -> None:
        for key, value in {"hardware.gpu_memory_gb": self.gpu_memory_gb,
                           "hardware.host_link_gbps": self.host_link_gbps}.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be positive (or null to detect it), got {value}.")


@dataclass
class RunConfig:
    """A whole run: one field per config group, plus where everything is written."""

    # Name of the recipe (set by recipe/<name>.yaml), used in default output paths.
    name: str = MISSING
    output_dir: str = MISSING
    # Where the demo base model, tokenized data and other generated artifacts are cached
    # between runs (recipes default it to $FINETUNE_CACHE_DIR, else ~/.cache/finetune).
    cache_dir: str = "~/.cache/finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def validate(self) -> None:
        """Every rule that needs no model, no data and no machine: run before anything is loaded."""
        for group in (self.model, self.quant, self.lora, self.optim, self.train, self.hardware, self.objective):
            group.validate()
        self.objective.validate_data({(source.format or self.data.format).value for source in self.data.sources}
                                     or {self.data.format.value})
        if self.model.impl is ModelImpl.native and self.lora.use_dora:
            raise ConfigError("lora.use_dora=true runs on the generic model path only: pass model.impl=auto "
                              "(which then takes it) or hf.")
        # The memory plan does not depend on which data is trained on, only on its shape.
        self.data.validate_shape() if self.train.dry_run else self.data.validate()


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "tracker": TrackerConfig,
    "hardware": HardwareConfig,
    "objective": ObjectiveConfig,
}


def register_configs() -> None:
    """Register the run schema, one schema per group, and the resolvers recipes/train.yaml uses."""
    OmegaConf.register_new_resolver("finetune_output_dir", default_output_dir, replace=True)
    OmegaConf.register_new_resolver("finetune_sweep_group", sweep_group, replace=True)
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)
