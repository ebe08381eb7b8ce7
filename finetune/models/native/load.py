"""Loading the native decoder (model.py) from an HF checkpoint or an NF4 cache; `build`, the recipe's model.

The checkpoint is streamed one tensor at a time: each linear weight is cast to the training dtype
and quantized to 4 bits as it arrives, so host memory peaks at about one tensor (plus the mapped
shard), never the whole model. A pre-quantized NF4 cache (nf4_cache.py) skips the quantizing.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from finetune.config import ConfigError, RunConfig
from finetune.lora import attach_lora, linear_layers
from finetune.models.native import nf4_cache
from finetune.models.native.model import ModelArgs, NativeCausalLM, Ops, torch_ops, triton_ops, unsupported_reason
from finetune.models.source import ModelSource, checkpoint_files
from finetune.quant import QuantizedWeight


def checkpoint_tensors(model_dir: Path):
    """(name, tensor) pairs one at a time, shard after shard; only the open shard is mapped."""
    from safetensors import safe_open

    files = checkpoint_files(model_dir)
    if files is None:
        raise ConfigError(f"{model_dir} has no safetensors checkpoint, which model.impl=native reads; "
                          "use model.impl=hf.")
    for file in files:
        with safe_open(str(model_dir / file), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def load_pretrained(model_dir, device: torch.device, compute_dtype: torch.dtype = torch.float32,
                    storage_dtype: torch.dtype | None = None, quant_type: str = "nf4", double_quant: bool = True,
                    use_kernels: bool = True, ops: Ops | None = None, weights_device: torch.device | None = None,
                    cache_dir: Path | None = None, load_device: torch.device | None = None,
                    config=None) -> NativeCausalLM:
    """Build the decoder empty, then stream the checkpoint into it, quantizing linear weights on arrival.

    Linear weights are cast to `storage_dtype` (the checkpoint's dtype cast, quant.torch_dtype)
    before quantizing (on `device`), exactly as the generic path does; everything else then goes
    to `compute_dtype`. The loaded tensors are kept on `load_device` (default `device`; the CPU
    when FSDP will move them to the GPU a unit at a time), quantized weights on `weights_device`
    (default `load_device`; the CPU when they will stream).
    `ops` defaults to the Triton kernels on CUDA (with use_kernels) and the references elsewhere;
    tests pass triton_ops() to run the kernels on the CPU under TRITON_INTERPRET=1.

    A pre-quantized NF4 cache (nf4_cache.py) skips the checkpoint: `model_dir` may be
    one itself, and `cache_dir` is read when it exists (once checked to come from this checkpoint
    with these settings) and written after quantizing when it does not. `config` is the
    checkpoint's HF config when the caller has read it already.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    load_device = load_device or device
    weights_device = weights_device or load_device
    storage_dtype = storage_dtype or compute_dtype
    cache_dir, fingerprint, cache_config = _checked_cache(model_dir, cache_dir, quant_type=quant_type,
                                                          double_quant=double_quant, storage_dtype=storage_dtype,
                                                          compute_dtype=compute_dtype)
    if cache_config is not None:
        model = _empty_model(cache_config, device, compute_dtype, use_kernels, ops, model_dir)
        load_from_cache(model, cache_dir, load_device, compute_dtype, weights_device)
        return model

    if config is None:
        config = AutoConfig.from_pretrained(model_dir)
    model = _empty_model(config, device, compute_dtype, use_kernels, ops, model_dir)
    args = model.args
    linears = linear_layers(model)
    for name, tensor in checkpoint_tensors(model_dir):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_word_embeddings):
            continue
        tensor = tensor.to(device=device, dtype=storage_dtype)
        module_name, leaf = name.rsplit(".", 1)
        if module_name in linears and leaf == "weight":
            layer = linears[module_name]
            _check_shape(name, tensor, (layer.out_features, layer.in_features), model_dir)
            layer.weight = QuantizedWeight.quantize(tensor, quant_type, double_quant).to(weights_device)
        else:
            _assign(model, module_name, leaf, tensor.to(device=load_device, dtype=compute_dtype), model_dir)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    check_complete(model, f"{model_dir}: the checkpoint", f"is it a complete {config.model_type} model?")
    # One writer per run: where every process quantizes (DDP), only the first keeps the result.
    if cache_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        write_nf4_cache(model, config, cache_dir, fingerprint)
    return model


def _checked_cache(model_dir: Path, cache_dir: Path | None, **settings) -> tuple[Path | None, str | None, object]:
    """(cache dir, source fingerprint, the cache's HF config) for loading `model_dir`.

    `model_dir` may be a cache itself; otherwise `cache_dir`, once it exists, is the cache, checked
    (nf4_cache.check_cache) to come from this checkpoint with these `settings`. The config is None
    when there is no cache to read (yet: the fingerprint is what to write one with).
    """
    if nf4_cache.is_cache(model_dir):
        cache_dir, fingerprint = model_dir, None
    elif cache_dir is not None:
        cache_dir, fingerprint = Path(cache_dir), nf4_cache.source_fingerprint(model_dir)
    else:
        return None, None, None
    if not cache_dir.exists():
        return cache_dir, fingerprint, None
    config, meta, _ = nf4_cache.read_cache(cache_dir)
    nf4_cache.check_cache(cache_dir, meta, fingerprint=fingerprint, **settings)
    return cache_dir, fingerprint, config


def write_nf4_cache(model: NativeCausalLM, config, cache_dir: str | Path, fingerprint: str) -> Path:
    """Save a model loaded by load_pretrained (`config`: its HF config) as an NF4 cache (nf4_cache.py).

    Shards: the embeddings, final norm and LM head first, then one per decoder layer. LoRA
    adapters, if attached, are not part of the base and are not written.
    """
    if ModelArgs.from_hf(config) != model.args:
        raise ValueError("write_nf4_cache: `config` does not describe this model")
    weights = [layer.weight for layer in linear_layers(model).values()]
    first = weights[0]
    if any((w.quant_type, w.nested, w.dtype, w.blocksize) != (first.quant_type, first.nested, first.dtype,
                                                               first.blocksize) for w in weights):
        raise ValueError("write_nf4_cache: the model's linear weights were quantized with different settings")
    tensor_dtype = nf4_cache.stored_tensor_dtype(first.dtype, model.model.embed_tokens.weight.dtype)
    meta = nf4_cache.CacheMeta(fingerprint=fingerprint, quant_type=first.quant_type, double_quant=first.nested,
                               storage_dtype=first.dtype, tensor_dtype=tensor_dtype, blocksize=first.blocksize)

    shards: dict[int | None, list] = defaultdict(list)
    for name, layer in linear_layers(model).items():
        shards[nf4_cache.decoder_layer_of(name)].append((f"{name}.weight", layer.weight))
    # named_parameters lists a tied LM head once, as the embedding: it is not stored twice.
    for name, param in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            shards[nf4_cache.decoder_layer_of(name)].append((name, param))
    with nf4_cache.CacheWriter(cache_dir) as writer:
        for index in sorted(shards, key=lambda layer: -1 if layer is None else layer):  # the rest first
            for name, value in shards[index]:
                if isinstance(value, QuantizedWeight):
                    writer.add_quantized(name, value)
                else:
                    writer.add_tensor(name, value.to(tensor_dtype))
            writer.end_shard()
        return writer.finish(config, meta)


def load_from_cache(model: NativeCausalLM, cache_dir: str | Path, device: torch.device,
                    compute_dtype: torch.dtype, weights_device: torch.device | None = None):
    """Fill an empty (meta-device) model from a cache, to the state load_pretrained leaves.

    Quantized weights go to `weights_device` (default `device`) as they are; everything else to
    `device` in `compute_dtype`. The settings are not compared with a run's here: call check_cache first.
    """
    weights_device = weights_device or device
    cache_dir = Path(cache_dir)
    config, meta, tensors = nf4_cache.read_cache(cache_dir)
    if ModelArgs.from_hf(config) != model.args:
        raise ConfigError(f"the NF4 cache {cache_dir} holds another architecture than the model being loaded "
                          f"(see its {nf4_cache.CONFIG_FILE}); give this run the cache of its own model.")
    nf4_cache.check_compute_dtype(cache_dir, meta, compute_dtype)
    linears = linear_layers(model)
    for name, value in tensors:
        module_name, leaf = name.rsplit(".", 1)
        is_linear_weight = module_name in linears and leaf == "weight"
        if is_linear_weight != isinstance(value, QuantizedWeight):
            stored, place = ("quantized", "is no linear weight") if not is_linear_weight else \
                ("unquantized", "is a linear weight")
            raise ConfigError(f"NF4 cache {cache_dir}: {name} is stored {stored}, but in the model it {place}. "
                              f"Delete {cache_dir} so that it is written again.")
        if is_linear_weight:
            layer = linears[module_name]
            _check_shape(name, value, (layer.out_features, layer.in_features), cache_dir)
            layer.weight = value.to(weights_device)
        else:
            _assign(model, module_name, leaf, value.to(device=device, dtype=compute_dtype), cache_dir)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    check_complete(model, f"the NF4 cache {cache_dir}", f"delete {cache_dir} so that it is written again.")
    return meta


def _empty_model(config, device: torch.device, compute_dtype: torch.dtype, use_kernels: bool, ops: Ops | None,
                 model_dir: Path) -> NativeCausalLM:
    reason = unsupported_reason(config)
    if reason:
        raise ConfigError(f"model.impl=native cannot run {model_dir}: {reason}. Use model.impl=hf or auto.")
    ops = ops or (triton_ops() if use_kernels and device.type == "cuda" else torch_ops())
    model = NativeCausalLM(ModelArgs.from_hf(config), ops, device, str(model_dir))
    model.model.use_varlen = device.type == "cuda" and compute_dtype in (torch.float16, torch.bfloat16)
    return model


def check_complete(model: NativeCausalLM, source: str, hint: str) -> None:
    """Refuse a model some of whose tensors never arrived (still on the meta device)."""
    missing = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    missing += [f"{name}.weight" for name, layer in linear_layers(model).items() if layer.weight is None]
    if missing:
        raise ConfigError(f"{source} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"({len(missing)} tensors); {hint}")


def empty_pretrained(model_dir, device: torch.device, compute_dtype: torch.dtype = torch.float32,
                     storage_dtype: torch.dtype | None = None, quant_type: str = "nf4", double_quant: bool = True,
                     use_kernels: bool = True, cache_dir: Path | None = None, config=None) -> NativeCausalLM:
    """The model load_pretrained would build from the same arguments, on the meta device: every
    tensor's name, shape and dtype, no values, nothing read but the config (and a cache's settings).

    Under FSDP the processes but the first start so; FSDP gives each unit storage on the GPU
    (`materialize_empty`) and fills it from the first process (sync_module_states) before sharding.
    """
    model_dir = Path(model_dir)
    storage_dtype = storage_dtype or compute_dtype
    # A cache made with other settings is refused here as the first process refuses it.
    _, _, cache_config = _checked_cache(model_dir, cache_dir, quant_type=quant_type, double_quant=double_quant,
                                        storage_dtype=storage_dtype, compute_dtype=compute_dtype)
    if cache_config is not None:
        config = cache_config
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
    model = _empty_model(config, device, compute_dtype, use_kernels, None, model_dir)
    for name, param in list(model.named_parameters()):
        module_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), leaf,
                nn.Parameter(torch.empty_like(param, dtype=compute_dtype), requires_grad=False))
    for layer in linear_layers(model).values():
        layer.weight = QuantizedWeight.empty((layer.out_features, layer.in_features), storage_dtype, quant_type,
                                             double_quant)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _assign(model: nn.Module, module_name: str, leaf: str, tensor: torch.Tensor, model_dir: Path) -> None:
    name = f"{module_name}.{leaf}"
    try:
        module = model.get_submodule(module_name)
        current = getattr(module, leaf)
    except AttributeError:
        raise ConfigError(f"{model_dir}: checkpoint tensor {name!r} has no place in the native model.") from None
    _check_shape(name, tensor, tuple(current.shape), model_dir)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple, model_dir: Path) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConfigError(f"{model_dir}: {name} has shape {tuple(tensor.shape)}, but config.json implies {expected}.")


@dataclass(frozen=True)
class MemoryLayout:
    """How the native path spends GPU memory during training, as the memory planner settled it:
    what moves to host memory (CUDA only) and how many layers recompute in backward."""

    stream_weights: bool = False  # the layers' 4-bit weights stay in pinned host memory (native/streaming.py)
    park_checkpoints: bool = False  # checkpointed layers' inputs wait in pinned host memory until backward
    # model.checkpoint_layers=auto as planned for this GPU; None: every layer (no plan, or not a GPU)
    planned_checkpoint_layers: int | None = None
    # model.mlp_chunk_tokens unset, as planned for this GPU: the MLP's chunk where the step needs one
    planned_mlp_chunk_tokens: int | None = None
    # model.host_embeddings on CUDA with an untied LM head: the input embeddings stay in host memory
    host_embeddings: bool = False
    # model.keep_attention as planned for this GPU: False where keeping attention's results would not fit
    keep_attention: bool = True


class Placement(Enum):
    """Where `build` puts the 4-bit base."""

    device = "device"  # on the run's device: one process, DDP, and FSDP where every process loads
    host = "host"  # in host memory: FSDP's first process; FSDP moves a unit at a time to the GPU
    empty = "empty"  # on the meta device: FSDP's other processes, filled from the first


def build(cfg: RunConfig, source: ModelSource, compute_dtype: torch.dtype, device: torch.device,
          layout: MemoryLayout = MemoryLayout(), placement: Placement = Placement.device) -> NativeCausalLM:
    """The recipe's model: 4-bit base loaded from `source`, LoRA attached per cfg.lora.

    `layout.stream_weights` keeps the layers' 4-bit weights in pinned host memory (streaming.py);
    `layout.park_checkpoints` parks checkpointed layers' inputs there (both CUDA only).
    """
    stream_weights = layout.stream_weights
    model_dir = source.directory
    settings = dict(storage_dtype=getattr(torch, cfg.quant.torch_dtype.value),
                    quant_type=cfg.quant.bnb_4bit_quant_type.value,
                    double_quant=cfg.quant.bnb_4bit_use_double_quant,
                    use_kernels=cfg.model.use_kernels,
                    cache_dir=Path(cfg.model.nf4_cache).expanduser() if cfg.model.nf4_cache else None)
    if placement is Placement.empty:
        model = empty_pretrained(model_dir, device, compute_dtype, **settings, config=source.hf_config)
    else:
        host = torch.device("cpu")
        model = load_pretrained(model_dir, device, compute_dtype, **settings, config=source.hf_config,
                                load_device=host if placement is Placement.host else device,
                                weights_device=host if stream_weights else None)
    args = model.args
    attach_lora(model, cfg.lora)
    # Pinned host memory needs CUDA; on the CPU the activations are in host memory already (parked
    # layers keep what they save as it is).
    model.model.set_checkpointing(cfg.model.checkpointed_layers(args.num_hidden_layers, layout.planned_checkpoint_layers),
                                  layout.park_checkpoints and device.type == "cuda", cfg.model.parked_layers)
    model.model.set_mlp_chunking(cfg.model.mlp_chunk_tokens or layout.planned_mlp_chunk_tokens)
    model.model.keep_attention = cfg.model.keep_attention and layout.keep_attention
    # A tied LM head reads the whole table every step. FSDP's processes build on the host or empty
    # and leave the tables for FSDP to place: those stay.
    if layout.host_embeddings and placement is Placement.device and not args.tie_word_embeddings:
        model.host_embeddings()
    if stream_weights:
        model.model.stream_weights(device)
    if cfg.model.compile:
        model.model.compile_layers()
    return model
