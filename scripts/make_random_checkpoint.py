"""Write a random-weight HF checkpoint of a named architecture, tensor by tensor, or its NF4 cache.

    python scripts/make_random_checkpoint.py llama3-8b /data/llama3-8b-random [--device cuda]
    python scripts/make_random_checkpoint.py llama3.1-70b /data/llama3.1-70b-nf4 --nf4-cache

Tensors are drawn one at a time (on the GPU when there is one) and written in safetensors
shards with an index, so host memory never holds more than one shard. The demo's tokenizer is
saved beside the weights: benchmarks feed random token ids, but loaders expect tokenizer files.

With --nf4-cache the same weights are quantized on the device as they are drawn and written as a
pre-quantized cache (finetune.models.native.nf4_cache), one decoder layer per shard: host memory holds
one 4-bit layer (plus the unquantized embeddings), so a 70B model never exists in bf16 at all.
Both modes draw the same tensors for the same seed, so the cache equals the one that quantizing
the bf16 checkpoint would give (with the same device, quant settings and torch_dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without an install
    from finetune.entry import start

    start("python scripts/make_random_checkpoint.py")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from finetune.models.architectures import ARCHITECTURES, hf_config  # noqa: E402

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the architecture, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator, device: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint tensor on `device`: norms are ones, everything else N(0, 0.02)."""
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    # std 0.02 like HF initializers keeps activations finite through 80 layers.
    return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)


def write_random_checkpoint(architecture: str | PretrainedConfig, out_dir: Path, device: str,
                            dtype=torch.bfloat16, shard_gib: float = 4.0, seed: int = 0) -> Path:
    """`architecture`: a name in ARCHITECTURES, or a transformers config (tests use tiny ones)."""
    config = hf_config(architecture) if isinstance(architecture, str) else architecture
    config.torch_dtype = dtype
    shapes = parameter_shapes(config)
    out_dir.mkdir(parents=True, exist_ok=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, shard, shard_bytes, shard_names = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        file = f"model-{len(shard_names) + 1:05d}.safetensors"
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map.update({key: file for key in shard})
        shard_names.append(file)
        shard, shard_bytes = {}, 0

    for key, shape in shapes.items():
        tensor = random_tensor(key, shape, generator, device, dtype).cpu()
        shard[key] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= shard_gib * 2**30:
            flush()
    if shard:
        flush()
    # Shard names must carry the total count, as HF writes them.
    total = len(shard_names)
    renamed = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(shard_names)}
    for old, new in renamed.items():
        (out_dir / old).rename(out_dir / new)
    index = {"metadata": {"total_size": sum(math.prod(s) * dtype.itemsize for s in shapes.values())},
             "weight_map": {key: renamed[file] for key, file in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)

    from finetune.demo import build_tokenizer

    build_tokenizer().save_pretrained(out_dir)
    return out_dir


def write_random_nf4_cache(architecture: str | PretrainedConfig, out_dir: Path, device: str,
                           dtype=torch.bfloat16, seed: int = 0, quant_type: str = "nf4", double_quant: bool = True,
                           storage_dtype: torch.dtype = torch.bfloat16) -> Path:
    """The NF4 cache of write_random_checkpoint's model, without the checkpoint: quantized layer by layer.

    Tensors are drawn in the checkpoint's order and dtype (`dtype`), cast to `storage_dtype`
    (quant.torch_dtype) and quantized on `device`, as native.load_pretrained would load them.
    """
    from finetune.lora import linear_layers
    from finetune.models.native import ModelArgs, NativeCausalLM, nf4_cache, torch_ops, unsupported_reason
    from finetune.quant import QuantizedWeight

    config = hf_config(architecture) if isinstance(architecture, str) else architecture
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"the native model cannot load this architecture, so it has no NF4 cache: {reason}")
    args = ModelArgs.from_hf(config)
    linears = set(linear_layers(NativeCausalLM(args, torch_ops(), torch.device("meta"))))
    label = architecture if isinstance(architecture, str) else config.model_type
    meta = nf4_cache.CacheMeta(fingerprint=f"random:{label}:seed{seed}", quant_type=quant_type,
                               double_quant=double_quant, storage_dtype=storage_dtype, tensor_dtype=storage_dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = step = time.perf_counter()

    def close_shard(writer: nf4_cache.CacheWriter, what: str) -> None:
        nonlocal step
        size = writer.end_shard()
        if size:
            print(f"{what}: {size / 2**20:.1f} MiB in {time.perf_counter() - step:.1f} s", flush=True)
        step = time.perf_counter()

    with nf4_cache.CacheWriter(out_dir) as writer:
        shard_of = None  # the decoder layer being drawn; None for the tensors outside the layers
        for key, shape in parameter_shapes(config).items():
            # The checkpoint writer draws a tied head last: skipping it leaves every other draw as it is.
            if key == "lm_head.weight" and args.tie_word_embeddings:
                continue
            layer = nf4_cache.decoder_layer_of(key)
            if layer != shard_of:
                what = "embeddings" if shard_of is None else f"layer {shard_of + 1}/{config.num_hidden_layers}"
                close_shard(writer, what)
                shard_of = layer
            tensor = random_tensor(key, shape, generator, device, dtype).to(storage_dtype)
            if key.removesuffix(".weight") in linears:
                writer.add_quantized(key, QuantizedWeight.quantize(tensor, quant_type, double_quant))
            else:
                writer.add_tensor(key, tensor)
        close_shard(writer, "final norm and LM head")
        writer.finish(config, meta)
    # As beside the bf16 checkpoint: runs feed random ids, but loading a model loads a tokenizer.
    from finetune.demo import build_tokenizer

    build_tokenizer().save_pretrained(out_dir)
    print(f"wrote the NF4 cache {out_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nf4-cache", action="store_true",
                        help="write a pre-quantized NF4 cache (finetune.models.native.nf4_cache) instead of a bf16 "
                             "checkpoint")
    cache = parser.add_argument_group("NF4 cache settings (with --nf4-cache; a run must use the same)")
    cache.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="quant.bnb_4bit_quant_type")
    cache.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                       help="quant.bnb_4bit_use_double_quant")
    cache.add_argument("--torch-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                       help="quant.torch_dtype: weights are cast to it before quantizing")
    args = parser.parse_args(argv)
    if args.out_dir.exists():
        sys.exit(f"error: {args.out_dir} already exists; pass a new directory.")
    if args.nf4_cache:
        write_random_nf4_cache(args.architecture, args.out_dir, args.device, seed=args.seed,
                               quant_type=args.quant_type, double_quant=args.double_quant,
                               storage_dtype=getattr(torch, args.torch_dtype))
    else:
        print(write_random_checkpoint(args.architecture, args.out_dir, args.device, seed=args.seed))


if __name__ == "__main__":
    main()
