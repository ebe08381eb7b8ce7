"""The adapter directory: peft's LoRA format, and the quantization record this project adds to it.

    adapter_config.json          peft's LoraConfig: r, lora_alpha, target_modules, base_model_name_or_path, ...
    adapter_model.safetensors    the weights under peft's keys: base_model.model.<module>.lora_A.weight
                                 (r, in) and .lora_B.weight (out, r); with DoRA <module>.lora_magnitude_vector
                                 (out,); a modules_to_save copy under the parameter's own name
    finetune_quantization.json   how training stored the frozen base (QuantRecord)
    tokenizer files

Written by training (both model paths), read by merging, by `finetune.load` and by peft itself:
what an adapter is is decided here only. peft's older adapter_model.bin is read, never written.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.config import ConfigError, Dtype, QuantConfig, QuantStorage, QuantType
from finetune.errors import UserError
from finetune.lora import adapted_layers, compute_device, linear_layers
from finetune.quant import BLOCKSIZE

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
QUANT_FILE = "finetune_quantization.json"
# The block sizes bitsandbytes quantizes 4-bit weights in.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

MAGNITUDE = "lora_magnitude_vector"
# Key endings -> the part of a module's LoRA they hold.
_LORA_PARTS = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (f".{MAGNITUDE}.weight", MAGNITUDE),  # peft < 0.12 wrapped it in a module
    (f".{MAGNITUDE}", MAGNITUDE),
)


class AdapterError(UserError):
    """An adapter directory that is missing, incomplete or not peft's LoRA format."""


def lora_key(module: str, part: str) -> str:
    """peft's key for one LoRA tensor of `module` (`part`: lora_A or lora_B)."""
    return f"{PEFT_PREFIX}{module}.{part}.weight"


# ----------------------------------------------------------------------------- reading


@dataclass
class LoraWeights:
    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float
    magnitude: torch.Tensor | None = None  # (out_features,), DoRA only


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    lora: dict[str, LoraWeights]  # base module name -> its LoRA
    replacements: dict[str, torch.Tensor]  # base parameter name -> trained copy (modules_to_save)


def read_config(path: Path) -> dict:
    """adapter_config.json of a peft LoRA adapter directory (which must hold its weights too)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    if not (path / CONFIG_FILE).is_file() or _weights_file(path) is None:
        raise AdapterError(f"{path} is not a peft adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} holds a {config['peft_type']} adapter; only LoRA adapters are supported")
    return config


def _weights_file(path: Path) -> Path | None:
    return next((path / name for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE) if (path / name).is_file()), None)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's keys, on the CPU."""
    file = _weights_file(Path(path))
    if file is None:
        raise AdapterError(f"{path} holds no adapter weights ({WEIGHTS_FILE})")
    if file.name == WEIGHTS_FILE:
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def split_keys(tensors: Mapping[str, torch.Tensor], source) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                    dict[str, torch.Tensor]]:
    """peft's keys -> ({module: {"lora_A": A, "lora_B": B, ...}}, {parameter: modules_to_save copy})."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replacements = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"unexpected tensor {key!r} in {source}: peft names start with {PEFT_PREFIX!r}")
        name = key.removeprefix(PEFT_PREFIX)
        match = next(((suffix, part) for suffix, part in _LORA_PARTS if name.endswith(suffix)), None)
        if match is not None:
            suffix, part = match
            lora.setdefault(name.removesuffix(suffix), {})[part] = tensor
        elif "lora_embedding_" in name:
            raise AdapterError(f"the adapter has LoRA on an embedding layer ({name}); only LoRA on Linear layers "
                               "is supported")
        elif ".lora_" in name:
            raise AdapterError(f"unsupported adapter tensor {key!r} in {source}")
        else:
            replacements[name] = tensor
    return lora, replacements


def read_adapter(path: Path, config: dict | None = None) -> LoraAdapter:
    """An adapter directory, every LoRA pair checked and its scaling worked out as peft does.

    `config`: its adapter_config.json as `read_config` gave it, where the caller checked it first.
    """
    path = Path(path)
    config = read_config(path) if config is None else config
    parts, replacements = split_keys(read_weights(path), path)
    lora = {}
    for module, found in parts.items():
        if "lora_A" not in found or "lora_B" not in found:
            raise AdapterError(f"the adapter in {path} has an incomplete LoRA pair for {module}")
        A, B = found["lora_A"], found["lora_B"]
        if A.ndim != 2 or B.ndim != 2:
            raise AdapterError(f"LoRA on {module} is not on a Linear layer (lora_A has shape {tuple(A.shape)})")
        if A.shape[0] != B.shape[1]:
            raise AdapterError(f"lora_A/lora_B ranks differ for {module}: {A.shape[0]} vs {B.shape[1]}")
        if MAGNITUDE in found and not config.get("use_dora"):
            raise AdapterError(f"{module} has a DoRA magnitude but {CONFIG_FILE} says use_dora=false")
        if config.get("use_dora") and MAGNITUDE not in found:
            raise AdapterError(f"{CONFIG_FILE} says use_dora=true but {module} has no magnitude vector")
        lora[module] = LoraWeights(A, B, _scaling(config, module, A.shape[0]), found.get(MAGNITUDE))
    return LoraAdapter(path, config, lora, replacements)


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
        raise AdapterError(f"{CONFIG_FILE} gives {module} rank {r}, but its lora_A has rank {rank}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ----------------------------------------------------------------------------- writing


def write_adapter(directory: Path, config, tensors: Mapping[str, torch.Tensor]) -> None:
    """adapter_config.json (`config`: a peft config) + adapter_model.safetensors (`tensors` under peft's keys)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- QLoRALinear layers <-> files


def peft_config(model: nn.Module, base_model_name_or_path: str):
    """The peft.LoraConfig that describes the model's QLoRALinear adapters, as peft itself would write it.

    target_modules lists the adapted layers by full name, as peft records "all-linear".
    """
    import peft

    layers = adapted_layers(model)
    settings = {(m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"expected one LoRA setting across layers, found {sorted(settings)}")
    r, lora_alpha, lora_dropout, use_rslora = settings.pop()
    return peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
        target_modules=sorted(layers), bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path, inference_mode=True,
    )


def save_qlora_adapter(model: nn.Module, directory: Path, base_model_name_or_path: str,
                       state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """The model's QLoRALinear adapters as peft's files, exactly as peft's save_pretrained writes them.

    The LoRA weights come from the modules, or from `state_dict` (the full state FSDP gathers:
    under FSDP each process's modules hold only its shard).
    """
    tensors = {lora_key(name, part): getattr(layer, part) if state_dict is None else state_dict[f"{name}.{part}"]
               for name, layer in adapted_layers(model).items() for part in ("lora_A", "lora_B")}
    write_adapter(directory, peft_config(model, base_model_name_or_path), tensors)


def copy_qlora_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], source="the adapter") -> None:
    """Copy saved LoRA tensors (peft's keys) into the model's QLoRALinear adapters in place.

    In place, because resuming restores an optimizer that holds these very parameter objects.
    """
    layers = adapted_layers(model)
    parts, replacements = split_keys(weights, source)
    unknown = [*(f"{name}.{part}" for name, found in parts.items() for part in found
                 if name not in layers or part == MAGNITUDE), *replacements]
    if unknown:
        raise ConfigError(f"{source}: tensor {unknown[0]!r} matches no linear layer of this model.")
    missing = sorted(set(layers) - set(parts))
    if missing:
        raise ConfigError(f"{source} lacks LoRA weights the model has, e.g. for {missing[0]}.")
    with torch.no_grad():
        for name, found in parts.items():
            for part, tensor in found.items():
                target = getattr(layers[name], part)
                if target.shape != tensor.shape:
                    raise ConfigError(f"{source}: {name}.{part} has shape {tuple(tensor.shape)}, "
                                      f"the model's has {tuple(target.shape)}.")
                target.copy_(tensor)


def load_qlora_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Replace the model's QLoRALinear adapters with a peft LoRA adapter's (trained natively or by peft).

    Layers the adapter does not cover end up without one, so the model computes exactly what the
    adapter describes.
    """
    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    unsupported = {key: config.get(key) for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(key)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ConfigError(f"{adapter_dir}: adapter settings {unsupported} are not supported by model.impl=native; "
                          "load it with model.impl=hf.")
    adapter = read_adapter(adapter_dir, config)
    layers = linear_layers(model)
    unknown = [*sorted(set(adapter.lora) - set(layers)), *adapter.replacements]
    if unknown:
        raise ConfigError(f"{adapter_dir}: {unknown[0]!r} matches no linear layer of this model.")
    device = compute_device(model)
    for name, layer in layers.items():
        layer.remove_lora()
        lora = adapter.lora.get(name)
        if lora is None:
            continue
        if lora.A.shape[1] != layer.in_features or lora.B.shape[0] != layer.out_features:
            raise ConfigError(f"{adapter_dir}: {name} has lora_A {tuple(lora.A.shape)} and lora_B "
                              f"{tuple(lora.B.shape)}, which do not fit r={config['r']} on a "
                              f"{layer.out_features}x{layer.in_features} layer.")
        layer.lora_A = nn.Parameter(lora.A.to(device, torch.float32))
        layer.lora_B = nn.Parameter(lora.B.to(device, torch.float32))
        layer.r, layer.lora_alpha, layer.use_rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
        layer.lora_dropout = config.get("lora_dropout", 0.0)


# ----------------------------------------------------------------------------- the quantization record


@dataclass(frozen=True)
class QuantRecord:
    """How training turned the base's weights into the ones the adapter was trained against.

    Merging reproduces them (dequant(NF4(W)), not W) and `finetune.load` quantizes the base the same
    way. Field names are BitsAndBytesConfig's. The defaults are what QLoRA recipes use almost
    everywhere, and are assumed for adapters trained elsewhere, which come without the file.
    """

    load_in_4bit: bool = True
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Dtype = Dtype.bfloat16  # what the unquantized tensors were held in
    bnb_4bit_quant_storage: QuantStorage = QuantStorage.uint8
    blocksize: int = BLOCKSIZE
    torch_dtype: Dtype = Dtype.bfloat16  # what the checkpoint was cast to before quantizing

    @classmethod
    def from_config(cls, quant: QuantConfig, compute_dtype: torch.dtype) -> QuantRecord:
        """The record of a run with these `quant` settings, computing in `compute_dtype` (the dtype the
        run settled on: a device without bf16 computes in float32 whatever was asked for)."""
        return cls(
            load_in_4bit=quant.load_in_4bit,
            bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=Dtype(str(compute_dtype).removeprefix("torch.")),
            bnb_4bit_quant_storage=quant.bnb_4bit_quant_storage,
            blocksize=BLOCKSIZE,
            torch_dtype=quant.torch_dtype,
        )

    @classmethod
    def read(cls, adapter_dir: Path) -> QuantRecord:
        """The adapter's record; the defaults for an adapter without one."""
        path = Path(adapter_dir) / QUANT_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise AdapterError(f"{path} is not valid JSON ({error}): fix it, or delete it to assume the usual "
                               "QLoRA settings.") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, source) -> QuantRecord:
        """A record from its JSON object; missing fields take the defaults, unknown ones are ignored."""
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: expected a JSON object of quantization settings, got {data!r}")
        record = cls()
        values = {}
        for field in fields(cls):
            if field.name not in data:
                continue
            default, value = getattr(record, field.name), data[field.name]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise AdapterError(f"{source}: {field.name} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool) or value not in BLOCKSIZES:
                    raise AdapterError(f"{source}: {field.name} {value!r} is not one bitsandbytes supports "
                                       f"{BLOCKSIZES}")
            else:
                kind = type(default)
                name = str(value).removeprefix("torch.")  # torch's spelling of a dtype is accepted too
                if name not in kind.__members__:
                    raise AdapterError(f"{source}: {field.name} {value!r} is not one of {list(kind.__members__)}")
                value = kind(name)
            values[field.name] = value
        return replace(record, **values)

    def to_json(self) -> dict:
        return {key: value.value if isinstance(value, enum.Enum) else value for key, value in asdict(self).items()}

    def write(self, directory: Path) -> None:
        (Path(directory) / QUANT_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
