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
written into a hidden staging directory beside OUTPUT and renamed into place only once it is
complete (and verified), so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import enum
import gc
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import MISSING, OmegaConf

from finetune.adapter_format import CONFIG_FILE, QUANT_FILE, AdapterError, LoraAdapter, LoraWeights, QuantRecord
from finetune.adapter_format import read_adapter, read_config
from finetune.config import Dtype, QuantType, checked_options, options_from_args
from finetune.errors import MergeError
from finetune.hub_code import keep_hub_code_out
from finetune.io import IfExists, atomic_dir

MERGE_MARKER = "finetune_merge.json"
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
    return options_from_args(MergeConfig, argv, f"\n\n{USAGE}", MergeError)


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
        # Options first: keep_hub_code_out imports bitsandbytes, seconds before a typo is reported.
        config = parse_args(argv)
        keep_hub_code_out()
        merge_adapter(config)
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


def load_adapter(path: Path) -> LoraAdapter:
    """The adapter, refused where it uses a peft feature this merge cannot reproduce."""
    try:
        config = read_config(path)
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
        return read_adapter(path, config)
    except AdapterError as error:
        raise MergeError(str(error)) from None


def resolve_base(cfg: MergeConfig, adapter: LoraAdapter) -> Path:
    if cfg.base is not None:
        base = Path(cfg.base)
        if not base.is_dir():
            raise MergeError(f"base directory {base} does not exist")
        return base
    name = adapter.config.get("base_model_name_or_path")
    if not name:
        raise MergeError(f"{adapter.path}/{CONFIG_FILE} names no base model: pass base=PATH")
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


def training_quantization(cfg: MergeConfig, adapter: LoraAdapter) -> QuantRecord:
    """How training stored the base: the adapter's record (or the usual settings), with cfg's overrides."""
    try:
        record = QuantRecord.read(adapter.path)
    except AdapterError as error:
        raise MergeError(str(error)) from None
    if not (adapter.path / QUANT_FILE).is_file():
        print(
            f"{adapter.path} has no {QUANT_FILE}: assuming training quantized the base as "
            f"{record.bnb_4bit_quant_type.value.upper()} {'with' if record.bnb_4bit_use_double_quant else 'without'} "
            f"double quantization, blocksize {record.blocksize}, "
            f"from {record.torch_dtype.value} weights (override with quant_type=, double_quant=, base_dtype=)"
        )
    overrides = {"bnb_4bit_quant_type": cfg.quant_type, "bnb_4bit_use_double_quant": cfg.double_quant,
                 "torch_dtype": cfg.base_dtype}
    return replace(record, **{key: value for key, value in overrides.items() if value is not None})


def _torch_dtype(dtype: Dtype) -> torch.dtype:
    return getattr(torch, dtype.value)


def roundtrip(quant: QuantRecord, weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(weight)) with bitsandbytes' own kernels, as a trained Linear4bit saw it."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.to(_torch_dtype(quant.torch_dtype)),
        blocksize=quant.blocksize,
        compress_statistics=quant.bnb_4bit_use_double_quant,
        quant_type=quant.bnb_4bit_quant_type.value,
    )
    return bnbf.dequantize_4bit(packed, state)


# ----------------------------------------------------------------------------- planning


@dataclass
class MergePlan:
    adapter: LoraAdapter
    base: Checkpoint
    quant: QuantRecord | None  # how training stored the base; None: merge into the original weights
    dtype: torch.dtype
    quantized: set[str] = field(default_factory=set)  # modules that were Linear4bit in training


def plan_merge(adapter: LoraAdapter, base: Checkpoint, quant: QuantRecord | None, dtype: torch.dtype) -> MergePlan:
    """Check that the adapter fits the base, before any work is done."""
    architectures = base.config.get("architectures") or ["?"]
    trained_on = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on not in architectures:
        raise MergeError(
            f"the adapter was trained on a {trained_on}, but the base at {base.path} is a {architectures[0]}"
        )
    linear, quantized = _linear_modules(base, quant)
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
    return MergePlan(adapter, base, quant, dtype, quantized)


def _linear_modules(base: Checkpoint, quant: QuantRecord | None) -> tuple[set[str], set[str]]:
    """(Linear modules, those that were Linear4bit in training), from a weightless copy of the model.

    Training quantized the model through transformers' BitsAndBytesConfig, which leaves some Linear
    layers (lm_head, keep-in-fp32 modules) unquantized: ask transformers itself which, on a model
    built on the meta device.
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
    if quant is None or not quant.load_in_4bit:
        return linear, set()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.bnb_4bit_quant_type.value
    )
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
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
    if plan.quant is None:
        return tensor
    held = tensor.to(_torch_dtype(plan.quant.torch_dtype))
    if name.endswith(".weight") and name.removesuffix(".weight") in plan.quantized:
        return roundtrip(plan.quant, held)
    return held.to(_torch_dtype(plan.quant.bnb_4bit_compute_dtype))


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

    out_dir.mkdir(exist_ok=True)  # the staging directory itself, or a folder in it
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


def merge_adapter(cfg: MergeConfig | Mapping[str, Any]) -> Path:
    """Merge cfg.adapter into its base and write cfg.output; returns the output directory."""
    if not isinstance(cfg, MergeConfig):
        options = dict(cfg)
        cfg = checked_options(MergeConfig, lambda: OmegaConf.create(options), f"\n\n{USAGE}", MergeError)
    adapter = load_adapter(Path(cfg.adapter))
    base = open_checkpoint(resolve_base(cfg, adapter))
    quant = training_quantization(cfg, adapter) if cfg.merge_into is MergeInto.dequantized else None
    gguf_type = cfg.gguf_type.value if cfg.gguf_type else GGUF_TYPE_OF_DTYPE[cfg.dtype.value]
    if cfg.format is OutputFormat.gguf:
        from finetune.export.gguf import check_exportable

        check_exportable(base.config)
    elif cfg.gguf_type is not None:
        raise MergeError("gguf_type applies to format=gguf only")
    output = Path(cfg.output)
    _check_output(output, cfg.overwrite)
    plan = plan_merge(adapter, base, quant, _torch_dtype(cfg.dtype))
    run_verify = should_verify(cfg, base.n_params)

    output.parent.mkdir(parents=True, exist_ok=True)
    needed = base.n_params * _torch_dtype(cfg.dtype).itemsize
    if cfg.format is OutputFormat.gguf:  # the GGUF is written beside the HF staging copy
        needed += base.n_params * GGUF_BYTES_PER_PARAM[gguf_type]
    if shutil.disk_usage(output.parent).free < needed:
        raise MergeError(f"not enough disk space in {output.parent}: the merge writes ~{needed / 2**30:.1f} GiB")

    print(
        f"merging {adapter.path} ({len(adapter.lora)} LoRA modules"
        f"{', DoRA' if adapter.config.get('use_dora') else ''}) into {cfg.merge_into.value} {base.path} "
        f"-> {output} ({cfg.dtype.value}, {cfg.format.value})"
    )
    # Replacing: _check_output let through only an empty directory or an earlier merge (with overwrite=true).
    with atomic_dir(output, IfExists.replace) as staging:
        hf_dir = staging if cfg.format is OutputFormat.hf else staging / "hf"
        write_merged_checkpoint(plan, hf_dir)
        if run_verify:
            verify(plan, hf_dir)
        if cfg.format is OutputFormat.gguf:
            from finetune.export.gguf import export_gguf

            export_gguf(hf_dir, staging, gguf_type, name=output.name)
            shutil.rmtree(hf_dir)
        record = {
            "adapter": str(adapter.path.resolve()),
            "base": str(base.path.resolve()),
            "merge_into": cfg.merge_into.value,
            "dtype": cfg.dtype.value,
            "format": cfg.format.value,
            "gguf_type": gguf_type if cfg.format is OutputFormat.gguf else None,
            "training_quantization": None if quant is None else quant.to_json(),
            "verified": run_verify,
        }
        (staging / MERGE_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}" + (f" (model.gguf as {gguf_type}, Modelfile)" if cfg.format is OutputFormat.gguf else ""))
    return output

