"""Merge a LoRA adapter into its base model; write HF safetensors or GGUF.

    python scripts/merge_adapter.py adapter=outputs/run/adapter output=merged/

Two merge bases (`merge_into=`):
  dequantized (default)  W' = dequant(NF4(W)) + s·B·A, with W cast to the training dtype and
                         quantized exactly as in training: the weights the adapter was trained
                         against, so the merged model computes what the trained model computed;
                         the other tensors (embeddings, norms) keep the values training held
                         them in, rounded through its dtypes, whatever `dtype` stores them in.
  original               W' = W + s·B·A on the full-precision base. The adapter never saw these
                         weights; the result differs from the trained model by the base's
                         quantization error (often harmless, sometimes not: verify tells).
The sum is formed in fp32 and cast once to `dtype`. Nothing is re-quantized to NF4: that is
the lossy step peft's `merge_and_unload` takes on a 4-bit model.

The base is streamed shard by shard (read a shard, merge its tensors, write it out), so peak host
memory is about one input shard plus one output shard, whatever the model's size. Everything is
written into OUTPUT.partial-<pid> and renamed into place only once it is complete (and verified),
so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import enum
import gc
import json
import math
import os
import re
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from finetune.config import Dtype
from finetune.errors import MergeError
from finetune.hub_code import keep_hub_code_out

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
QUANT_FILE = "finetune_quantization.json"
MERGE_MARKER = "finetune_merge.json"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# What QLoRA recipes use almost everywhere (and this project's trainer writes down); assumed, and
# said so, for adapters that come without finetune_quantization.json.
DEFAULT_QUANTIZATION = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "blocksize": 64,
    "torch_dtype": "bfloat16",
    "bnb_4bit_compute_dtype": "bfloat16",
}
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a LoRA adapter does.",
)
GGUF_TYPE_OF_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
# Bytes a GGUF tensor type takes per weight (block bytes / 32 weights), for the disk-space check.
GGUF_BYTES_PER_PARAM = {
    "f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32
}
# Automatic verification loads an fp32 copy of the model twice (one after the other) on the CPU;
# above this size that takes long enough that it should be asked for, not sprung on the user.
AUTO_VERIFY_MAX_PARAMS = 3_000_000_000

# Largest |merged logit - reference logit|, relative to the largest |reference logit|, that
# verification accepts. Both models run in fp32, so the gap comes from the merged weights only.
VERIFY_TOLERANCE = {
    # Same fp32 numbers, summed in another order (W·x + s·B·(A·x) against (W + s·B·A)·x): relative
    # rounding ~1e-7 per operation, ~1e-5 after dozens of layers. A wrong scaling or a skipped
    # module moves logits by as much as the adapter does: typically 1e-2 and more.
    "float32": 1e-4,
    # Rounding each weight to fp16 perturbs it by up to 2^-11 (4.9e-4) relative; the perturbations
    # are independent, so logits move by a small multiple of that. 1e-2 is ~20 units.
    "float16": 1e-2,
    # bf16 keeps 8 significant bits: up to 2^-8 (3.9e-3) relative per weight, i.e. 8x fp16's
    # rounding, hence 8x fp16's bound.
    "bfloat16": 8e-2,
}



class VerificationError(MergeError):
    """The merged model does not compute what base + adapter compute."""

    exit_code = 3


class MergeInto(enum.Enum):
    dequantized = "dequantized"
    original = "original"


class OutputFormat(enum.Enum):
    hf = "hf"
    gguf = "gguf"


class GGUFType(enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_1 = "q5_1"
    q5_0 = "q5_0"
    q4_1 = "q4_1"
    q4_0 = "q4_0"


class QuantType(enum.Enum):
    nf4 = "nf4"
    fp4 = "fp4"


@dataclass
class MergeConfig:
    adapter: str = MISSING
    """Adapter directory: adapter_config.json + adapter_model.safetensors (peft format)."""
    output: str = MISSING
    """Directory to create. format=gguf puts model.gguf and an Ollama Modelfile there."""
    base: Optional[str] = None
    """Base model directory (HF format). Default: the adapter's base_model_name_or_path."""
    merge_into: MergeInto = MergeInto.dequantized
    """dequantized: the NF4 weights the adapter was trained on; original: full-precision base."""
    dtype: Dtype = Dtype.bfloat16
    """dtype of the merged weights."""
    format: OutputFormat = OutputFormat.hf
    """hf: safetensors shards + config + tokenizer; gguf: one .gguf file for llama.cpp/Ollama."""
    gguf_type: Optional[GGUFType] = None
    """GGUF tensor type. Default: the one matching dtype (bf16, f16 or f32)."""
    verify: Optional[bool] = None
    """Compare logits of merged vs base+adapter. Default: on when the model is small enough."""
    overwrite: bool = False
    """Replace an existing output directory, if an earlier merge wrote it."""
    quant_type: Optional[QuantType] = None
    """Override the training quantization's bnb_4bit_quant_type."""
    double_quant: Optional[bool] = None
    """Override the training quantization's bnb_4bit_use_double_quant."""
    base_dtype: Optional[Dtype] = None
    """Override the dtype the base was cast to before quantization in training."""


USAGE = """\
usage: python scripts/merge_adapter.py adapter=PATH output=PATH [key=value ...]

options (default first):
  base=PATH                           base model dir (default: adapter's base_model_name_or_path)
  merge_into=dequantized|original     merge into the NF4 weights training saw, or the originals
  dtype=bfloat16|float16|float32      dtype of the merged weights
  format=hf|gguf                      HF safetensors, or GGUF + Ollama Modelfile
  gguf_type=f16|bf16|f32|q8_0|q5_1|q5_0|q4_1|q4_0   (default: matches dtype)
  verify=true|false                   compare logits with base+adapter (default: if small enough)
  overwrite=false|true                replace an output dir an earlier merge wrote
  quant_type=nf4|fp4, double_quant=true|false, base_dtype=...
                                      override the training quantization (finetune_quantization.json)
"""


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> MergeConfig:
    """`key=value` arguments -> MergeConfig, checked against the schema."""
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise MergeError(f"expected key=value, got {arg!r}\n\n{USAGE}")
    return _to_config(lambda: OmegaConf.from_dotlist(argv))


def _to_config(options: Callable[[], Any]) -> MergeConfig:
    """Validate user options (built inside the try, as building can fail too) against the schema."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MergeConfig), options()))
    except MissingMandatoryValue as e:
        raise MergeError(f"missing required option {e.full_key}=...\n\n{USAGE}") from None
    except OmegaConfBaseException as e:
        reason = str(e.msg).splitlines()[0]
        raise MergeError(f"bad option {e.full_key!r}: {reason}\n\n{USAGE}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(USAGE)
        return 0

    # A killed merge must still clean up its partial output: turn SIGTERM into an exception.
    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        keep_hub_code_out()
        merge_adapter(parse_args(argv))
    except MergeError as e:
        print(f"finetune-merge: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # unwritable output, full disk, unreadable input: the message says it all
        print(f"finetune-merge: error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# ----------------------------------------------------------------------------- inputs


@dataclass
class LoraWeights:
    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float
    magnitude: torch.Tensor | None = None  # (out_features,), DoRA only


@dataclass
class Adapter:
    path: Path
    config: dict
    lora: dict[str, LoraWeights]  # base module name -> its LoRA
    replacements: dict[str, torch.Tensor]  # base parameter name -> trained copy (modules_to_save)


@dataclass
class QuantSpec:
    """How training turned the base weights into the ones the adapter saw."""

    load_in_4bit: bool
    quant_type: str
    double_quant: bool
    blocksize: int
    base_dtype: torch.dtype  # what the checkpoint was cast to before quantizing (quant.torch_dtype)
    compute_dtype: torch.dtype  # what training held the unquantized tensors in
    skip_modules: list[str] | None = None

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """dequant(quant(weight)) with bitsandbytes' own kernels, as a trained Linear4bit saw it."""
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(
            weight.to(self.base_dtype),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )
        return bnbf.dequantize_4bit(packed, state)


@dataclass
class Checkpoint:
    """A base model in HF safetensors format, known by its headers only."""

    path: Path
    config: dict
    shards: list[str]  # file names, in order
    shard_of: dict[str, str]  # tensor name -> shard file
    shapes: dict[str, tuple[int, ...]]
    indexed: bool  # has model.safetensors.index.json

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def load_adapter(path: Path) -> Adapter:
    if not path.is_dir():
        raise MergeError(f"adapter directory {path} does not exist")
    config_file = path / ADAPTER_CONFIG
    weights_file = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if not config_file.is_file() or weights_file is None:
        raise MergeError(
            f"{path} is not a peft adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]}"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{path} holds a {config['peft_type']} adapter; only LoRA adapters can be merged")
    for option, what in (
        ("lora_bias", "a bias on lora_B (lora_bias=true)"),
        ("alora_invocation_tokens", "aLoRA (activated LoRA)"),
        ("target_parameters", "LoRA on raw parameters (target_parameters)"),
        ("trainable_token_indices", "trainable token indices"),
        ("layer_replication", "layer replication"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"),
    ):
        if config.get(option):
            raise MergeError(f"the adapter in {path} uses {what}, which this merge does not support")

    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(weights_file)
    else:
        tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
    return _parse_adapter_tensors(path, config, tensors)


def _parse_adapter_tensors(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Adapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise MergeError(f"unexpected tensor {key!r} in {path}: peft names start with {PEFT_PREFIX!r}")
        name = key[len(PEFT_PREFIX) :]
        for suffix, slot in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_magnitude_vector.weight", "magnitude"),  # peft < 0.12 wrapped it in a module
            (".lora_magnitude_vector", "magnitude"),
        ):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[slot] = tensor
                break
        else:
            if "lora_embedding_" in name:
                raise MergeError(
                    f"the adapter has LoRA on an embedding layer ({name}); only LoRA on Linear layers "
                    "can be merged"
                )
            if ".lora_" in name:
                raise MergeError(f"unsupported adapter tensor {key!r} in {path}")
            replacements[name] = tensor  # a modules_to_save copy: it replaces the base's tensor

    lora = {}
    for module, found in parts.items():
        if "A" not in found or "B" not in found:
            raise MergeError(f"the adapter in {path} has an incomplete LoRA pair for {module}")
        A, B = found["A"], found["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise MergeError(f"LoRA on {module} is not on a Linear layer (lora_A has shape {tuple(A.shape)})")
        if A.shape[0] != B.shape[1]:
            raise MergeError(f"lora_A/lora_B ranks differ for {module}: {A.shape[0]} vs {B.shape[1]}")
        if "magnitude" in found and not config.get("use_dora"):
            raise MergeError(f"{module} has a DoRA magnitude but adapter_config.json says use_dora=false")
        if config.get("use_dora") and "magnitude" not in found:
            raise MergeError(f"adapter_config.json says use_dora=true but {module} has no magnitude vector")
        lora[module] = LoraWeights(A, B, _scaling(config, module, A.shape[0]), found.get("magnitude"))
    return Adapter(path, config, lora, replacements)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft's rank_pattern/alpha_pattern: the first key that matches the end of the module name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _scaling(config: dict, module: str, rank: int) -> float:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if r != rank:
        raise MergeError(f"adapter_config.json gives {module} rank {r}, but its lora_A has rank {rank}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def resolve_base(cfg: MergeConfig, adapter: Adapter) -> Path:
    if cfg.base is not None:
        base = Path(cfg.base)
        if not base.is_dir():
            raise MergeError(f"base directory {base} does not exist")
        return base
    name = adapter.config.get("base_model_name_or_path")
    if not name:
        raise MergeError(f"{adapter.path}/{ADAPTER_CONFIG} names no base model: pass base=PATH")
    for candidate in (Path(name), adapter.path / name):
        if candidate.is_dir():
            return candidate
    raise MergeError(
        f"the adapter's base model {name!r} is not a local directory (looked for {Path(name).resolve()}). "
        "This tool works offline: download the base model and pass base=PATH"
    )


def open_checkpoint(path: Path) -> Checkpoint:
    from safetensors import safe_open

    config_file = path / "config.json"
    if not config_file.is_file():
        raise MergeError(f"{path} is not an HF model directory: no config.json")
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise MergeError(f"no safetensors weights in {path}; re-save the base with save_pretrained()")
    shapes, shard_of = {}, {}
    for shard in shards:
        with safe_open(path / shard, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
                shard_of[key] = shard
    return Checkpoint(path, json.loads(config_file.read_text()), shards, shard_of, shapes, index_file.is_file())


def load_quant_spec(cfg: MergeConfig, adapter: Adapter) -> QuantSpec:
    path = adapter.path / QUANT_FILE
    if path.is_file():
        raw = json.loads(path.read_text())
    else:
        raw = dict(DEFAULT_QUANTIZATION)
        print(
            f"{adapter.path} has no {QUANT_FILE}: assuming training quantized the base as NF4 with double "
            "quantization, blocksize 64, from bfloat16 weights (override with quant_type=, double_quant=, "
            "base_dtype=)"
        )
    if cfg.quant_type is not None:
        raw["bnb_4bit_quant_type"] = cfg.quant_type.value
    if cfg.double_quant is not None:
        raw["bnb_4bit_use_double_quant"] = cfg.double_quant
    if cfg.base_dtype is not None:
        raw["torch_dtype"] = cfg.base_dtype.value

    def dtype(key: str, default: str) -> torch.dtype:
        name = str(raw.get(key, default)).removeprefix("torch.")
        if name not in Dtype.__members__:
            raise MergeError(f"{path}: {key} {name!r} is not one of {list(Dtype.__members__)}")
        return getattr(torch, name)

    base_dtype = dtype("torch_dtype", "bfloat16")
    spec = QuantSpec(
        load_in_4bit=bool(raw.get("load_in_4bit", True)),
        quant_type=raw.get("bnb_4bit_quant_type", "nf4"),
        double_quant=bool(raw.get("bnb_4bit_use_double_quant", False)),
        blocksize=int(raw.get("blocksize", 64)),
        base_dtype=base_dtype,
        # A record without it names no second cast: the tensors stayed in torch_dtype.
        compute_dtype=dtype("bnb_4bit_compute_dtype", str(base_dtype)),
        skip_modules=raw.get("llm_int8_skip_modules"),
    )
    if spec.quant_type not in QuantType.__members__:
        raise MergeError(f"{path}: bnb_4bit_quant_type {spec.quant_type!r} is not nf4 or fp4")
    if spec.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise MergeError(f"{path}: blocksize {spec.blocksize} is not one bitsandbytes supports")
    return spec


# ----------------------------------------------------------------------------- planning


@dataclass
class MergePlan:
    adapter: Adapter
    base: Checkpoint
    spec: QuantSpec | None  # None: merge into the original weights
    dtype: torch.dtype
    quantized: set[str] = field(default_factory=set)  # modules that were Linear4bit in training


def plan_merge(adapter: Adapter, base: Checkpoint, spec: QuantSpec | None, dtype: torch.dtype) -> MergePlan:
    """Check that the adapter fits the base, before any work is done."""
    architectures = base.config.get("architectures") or ["?"]
    trained_on = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on not in architectures:
        raise MergeError(
            f"the adapter was trained on a {trained_on}, but the base at {base.path} is a {architectures[0]}"
        )
    linear, quantized = _linear_modules(base, spec)
    for module, lw in adapter.lora.items():
        key = f"{module}.weight"
        if key not in base.shapes and base.config.get("tie_word_embeddings") and module == "lm_head":
            raise MergeError("the adapter has LoRA on lm_head, which this base ties to the embedding: not supported")
        if key not in base.shapes:
            raise MergeError(
                f"the adapter has LoRA on {module}, which the base at {base.path} ({architectures[0]}) "
                "does not have: was it trained on another model?"
            )
        if module not in linear:
            raise MergeError(f"the adapter has LoRA on {module}, which is not a Linear layer in the base")
        out_features, in_features = base.shapes[key]
        if lw.A.shape[1] != in_features or lw.B.shape[0] != out_features:
            raise MergeError(
                f"shape mismatch at {module}: the base weight is {out_features}x{in_features}, the adapter "
                f"expects {lw.B.shape[0]}x{lw.A.shape[1]}: was it trained on another model?"
            )
        if lw.magnitude is not None and lw.magnitude.shape != (out_features,):
            raise MergeError(f"DoRA magnitude of {module} has shape {tuple(lw.magnitude.shape)}, not ({out_features},)")
    for name, tensor in adapter.replacements.items():
        if name not in base.shapes:
            raise MergeError(
                f"the adapter replaces {name} (modules_to_save), which the base checkpoint does not store "
                "(tied embeddings?); merging that is not supported"
            )
        if tuple(tensor.shape) != base.shapes[name]:
            raise MergeError(
                f"the adapter's {name} has shape {tuple(tensor.shape)}, the base's {base.shapes[name]} "
                "(resized vocabulary?); merging that is not supported"
            )
    return MergePlan(adapter, base, spec, dtype, quantized if spec is not None and spec.load_in_4bit else set())


def _linear_modules(base: Checkpoint, spec: QuantSpec | None) -> tuple[set[str], set[str]]:
    """(Linear modules, those that were Linear4bit in training), from a weightless copy of the model.

    Training quantized the model through transformers' BitsAndBytesConfig, which leaves some Linear
    layers (lm_head, keep-in-fp32 modules, llm_int8_skip_modules) unquantized: ask transformers
    itself which, on a model built on the meta device.
    """
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    try:
        config = AutoConfig.from_pretrained(base.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as e:
        raise MergeError(f"transformers cannot build the model in {base.path}: {e}") from None
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if spec is None or not spec.load_in_4bit:
        return linear, set()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type, llm_int8_skip_modules=spec.skip_modules
    )
    skip = HfQuantizer.get_modules_to_not_convert(model, spec.skip_modules, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config)
    return linear, {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


# ----------------------------------------------------------------------------- the merge


def merge_weight(weight: torch.Tensor, lora: LoraWeights) -> torch.Tensor:
    """W + s·B·A in fp32; with DoRA, rescale each output row to the trained magnitude.

    peft's DoRA layer computes m * (W + s·B·A) / ||W + s·B·A|| with the norm taken per output row
    (over the input dimension), on the weight the layer holds: for a 4-bit layer that is the
    dequantized weight, which is what `weight` is here in dequantized mode.
    """
    merged = torch.addmm(weight.float(), lora.B.float(), lora.A.float(), alpha=lora.scaling)  # (out, in)
    if lora.magnitude is not None:
        row_norm = torch.linalg.norm(merged, dim=1)  # (out,)
        merged *= (lora.magnitude.float() / row_norm).unsqueeze(1)
    return merged


def trained_base_tensor(plan: MergePlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A floating-point base tensor as the trained model held it (merge_into=dequantized), or as it is.

    Training cast the checkpoint to torch_dtype, quantized the 4-bit layers' weights from there
    (their dequantized values are torch_dtype numbers), and held every other tensor (embeddings,
    norms, biases, an unquantized lm_head) in the compute dtype: the native path casts torch_dtype
    to the compute dtype, the generic path keeps torch_dtype, and the recipes' dtypes make those
    the same values. Those values, and no others, are what the adapter learned on top of. So even
    a float32 output stores them rounded, not the base's own float32 values: a deployment of the
    merged model then computes what the trained model computed, where the originals would shift
    every logit by the rounding the adapter was trained to live with.
    """
    if plan.spec is None:
        return tensor
    held = tensor.to(plan.spec.base_dtype)
    if name.endswith(".weight") and name.removesuffix(".weight") in plan.quantized:
        return plan.spec.roundtrip(held)
    return held.to(plan.spec.compute_dtype)


def merged_tensor(plan: MergePlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The output tensor for one base tensor."""
    if not tensor.is_floating_point():
        return tensor
    module = name.removesuffix(".weight") if name.endswith(".weight") else None
    lora = plan.adapter.lora.get(module)
    if name in plan.adapter.replacements:
        tensor = plan.adapter.replacements[name]
    else:
        tensor = trained_base_tensor(plan, name, tensor)
    if lora is not None:
        tensor = merge_weight(tensor, lora)
    out = tensor.to(plan.dtype)
    if not torch.isfinite(out).all():
        from_adapter = lora is not None or name in plan.adapter.replacements
        cause = "is the adapter broken?" if from_adapter else f"out of range for {plan.dtype}?"
        raise MergeError(f"merged tensor {name} contains NaN or Inf ({cause})")
    return out


def write_merged_checkpoint(plan: MergePlan, out_dir: Path) -> None:
    """Stream the base shard by shard: read one, merge its tensors, write it, let it go."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    base = plan.base
    total_size = 0
    for i, shard in enumerate(base.shards, 1):
        tensors = {}
        with safe_open(base.path / shard, framework="pt") as f:
            for name in f.keys():
                tensors[name] = merged_tensor(plan, name, f.get_tensor(name))
        save_file(tensors, out_dir / shard, metadata={"format": "pt"})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # the next shard may take its place
        print(f"merged {shard} ({i}/{len(base.shards)})", flush=True)
    if base.indexed:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(base.shard_of.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = {k: v for k, v in base.config.items() if k != "quantization_config"}
    dtype_name = str(plan.dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:  # transformers < 5 spelling
        config["torch_dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base.path / "generation_config.json").is_file():
        shutil.copy2(base.path / "generation_config.json", out_dir)
    _copy_tokenizer(plan.adapter.path, base.path, out_dir)


def _copy_tokenizer(adapter_dir: Path, base_dir: Path, out_dir: Path) -> None:
    # The adapter's tokenizer wins: training may have added a chat template or tokens.
    for source in (adapter_dir, base_dir):
        files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
        if files:
            for file in files:
                shutil.copy2(file, out_dir)
            if (source / "additional_chat_templates").is_dir():
                shutil.copytree(source / "additional_chat_templates", out_dir / "additional_chat_templates")
            return
    print("no tokenizer files in the adapter or the base: the output has none either")


# ----------------------------------------------------------------------------- verification


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def should_verify(cfg: MergeConfig, n_params: int) -> bool:
    if cfg.verify is not None:
        return cfg.verify
    # An fp32 copy of the model (one at a time), plus as much again while transformers loads it:
    # a 1.2B-param merge peaked at 8.3 GB above the imports.
    needed = n_params * 8
    available = _available_memory()
    if n_params <= AUTO_VERIFY_MAX_PARAMS and needed < available:
        return True
    print(
        f"skipping verification: it needs ~{needed / 2**30:.1f} GiB ({n_params / 1e9:.1f}B params in fp32), "
        f"{available / 2**30:.1f} GiB available; pass verify=true to run it anyway"
    )
    return False


def _verification_inputs(model_dir: Path, vocab_size: int) -> list[torch.Tensor]:
    """A few chat prompts through the model's own chat template; random ids without a tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        inputs = []
        for prompt in VERIFY_PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            if tokenizer.chat_template:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
            inputs.append(torch.tensor([ids[:128]]))
        return inputs
    except (OSError, ValueError) as e:
        print(f"verification uses random token ids: no usable tokenizer ({str(e).splitlines()[0]})")
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(vocab_size, (1, 32), generator=generator) for _ in VERIFY_PROMPTS]


def _reference_model(plan: MergePlan) -> torch.nn.Module:
    """Base + adapter as training computed them, through transformers and peft, in fp32 throughout.

    Every base tensor holds what the trained model held (trained_base_tensor), in plain fp32
    Linear layers, and peft adds the adapter on top: its own LoRA, DoRA and modules_to_save code,
    not the merge's. No bitsandbytes 4-bit layer computes here: its matmul (0.50's gemm_4bit)
    dequantizes the codes straight into the input's dtype, so in fp32 it skips the rounding to
    torch_dtype that training's dequantization applied; after bf16 training that is another
    model, ~4e-3 of the largest logit away, 40x the fp32 tolerance.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plan.base.path, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(trained_base_tensor(plan, name, param))
    return PeftModel.from_pretrained(model, plan.adapter.path).eval()


@torch.no_grad()
def verify(plan: MergePlan, merged_dir: Path) -> None:
    """Logits of the merged model against base + adapter (peft) on a few prompts, both in fp32."""
    from transformers import AutoModelForCausalLM

    inputs = _verification_inputs(merged_dir, plan.base.config.get("vocab_size", 32))
    reference = _reference_model(plan)
    expected = [reference(input_ids=ids).logits.float() for ids in inputs]
    del reference
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    got = [merged(input_ids=ids).logits.float() for ids in inputs]
    del merged
    gc.collect()

    max_diff = max((g - e).abs().max().item() for g, e in zip(got, expected))
    scale = max(e.abs().max().item() for e in expected)
    agree = torch.cat([(g.argmax(-1) == e.argmax(-1)).flatten() for g, e in zip(got, expected)]).float().mean()
    dtype_name = str(plan.dtype).removeprefix("torch.")
    tolerance = VERIFY_TOLERANCE[dtype_name]
    print(
        f"verify: max |logit difference| {max_diff:.3g} ({max_diff / scale:.2e} of max |logit| {scale:.3g}; "
        f"tolerance {tolerance:.0e} for {dtype_name}), top-1 agreement {agree.item():.1%} "
        f"over {sum(ids.shape[1] for ids in inputs)} positions"
    )
    if not max_diff <= tolerance * scale:
        raise VerificationError(
            f"the merged model's logits differ from base + adapter by {max_diff:.3g} "
            f"({max_diff / scale:.2e} relative, tolerance {tolerance:.0e}); output removed "
            "(verify=false skips this check)"
        )


# ----------------------------------------------------------------------------- output handling


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_file():
        raise MergeError(f"output {output} is a file, not a directory")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise MergeError(f"output {output} exists and is not empty; pass overwrite=true to replace it")
    if not (output / MERGE_MARKER).is_file():
        # overwrite=true replaces an earlier merge, never a directory of the user's own files.
        raise MergeError(
            f"output {output} holds files an earlier merge did not write (no {MERGE_MARKER}); "
            "refusing to replace it even with overwrite=true"
        )


def _move_into_place(staging: Path, output: Path) -> None:
    if not output.is_dir():
        staging.rename(output)
        return
    old = output.with_name(f"{output.name}.replaced-{os.getpid()}")
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old)


def merge_adapter(cfg: MergeConfig | Mapping[str, Any]) -> Path:
    """Merge cfg.adapter into its base and write cfg.output; returns the output directory."""
    if not isinstance(cfg, MergeConfig):
        options = dict(cfg)
        cfg = _to_config(lambda: OmegaConf.create(options))
    adapter = load_adapter(Path(cfg.adapter))
    base = open_checkpoint(resolve_base(cfg, adapter))
    spec = load_quant_spec(cfg, adapter) if cfg.merge_into is MergeInto.dequantized else None
    gguf_type = cfg.gguf_type.value if cfg.gguf_type else GGUF_TYPE_OF_DTYPE[cfg.dtype.value]
    if cfg.format is OutputFormat.gguf:
        from finetune.gguf_export import check_exportable

        check_exportable(base.config)
    elif cfg.gguf_type is not None:
        raise MergeError("gguf_type applies to format=gguf only")
    output = Path(cfg.output)
    _check_output(output, cfg.overwrite)
    plan = plan_merge(adapter, base, spec, getattr(torch, cfg.dtype.value))
    run_verify = should_verify(cfg, base.n_params)

    output.parent.mkdir(parents=True, exist_ok=True)
    needed = base.n_params * getattr(torch, cfg.dtype.value).itemsize
    if cfg.format is OutputFormat.gguf:  # the GGUF is written beside the HF staging copy
        needed += base.n_params * GGUF_BYTES_PER_PARAM[gguf_type]
    if shutil.disk_usage(output.parent).free < needed:
        raise MergeError(f"not enough disk space in {output.parent}: the merge writes ~{needed / 2**30:.1f} GiB")

    staging = output.with_name(f"{output.name}.partial-{os.getpid()}")
    hf_dir = staging if cfg.format is OutputFormat.hf else staging / "hf"
    print(
        f"merging {adapter.path} ({len(adapter.lora)} LoRA modules"
        f"{', DoRA' if adapter.config.get('use_dora') else ''}) into {cfg.merge_into.value} {base.path} "
        f"-> {output} ({cfg.dtype.value}, {cfg.format.value})"
    )
    try:
        write_merged_checkpoint(plan, hf_dir)
        if run_verify:
            verify(plan, hf_dir)
        if cfg.format is OutputFormat.gguf:
            from finetune.gguf_export import export_gguf

            export_gguf(hf_dir, staging, gguf_type, name=output.name)
            shutil.rmtree(hf_dir)
        record = {
            "adapter": str(adapter.path.resolve()),
            "base": str(base.path.resolve()),
            "merge_into": cfg.merge_into.value,
            "dtype": cfg.dtype.value,
            "format": cfg.format.value,
            "gguf_type": gguf_type if cfg.format is OutputFormat.gguf else None,
            "training_quantization": None if spec is None else {
                **asdict(spec), "base_dtype": str(spec.base_dtype), "compute_dtype": str(spec.compute_dtype)
            },
            "verified": run_verify,
        }
        (staging / MERGE_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {output}" + (f" (model.gguf as {gguf_type}, Modelfile)" if cfg.format is OutputFormat.gguf else ""))
    return output

