"""Write a random-weight HF checkpoint of a named architecture, tensor by tensor.

    python scripts/make_random_checkpoint.py llama3-8b /data/llama3-8b-random [--device cuda]

Tensors are drawn one at a time (on the GPU when there is one) and written in safetensors
shards with an index, so host memory never holds more than one shard. The demo's tokenizer is
saved beside the weights: benchmarks feed random token ids, but loaders expect tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.models.architectures import ARCHITECTURES, hf_config


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the architecture, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_random_checkpoint(name: str, out_dir: Path, device: str, dtype=torch.bfloat16, shard_gib: float = 4.0,
                            seed: int = 0) -> Path:
    config = hf_config(name)
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
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            # std 0.02 like HF initializers keeps activations finite through 80 layers.
            tensor = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out_dir.exists():
        sys.exit(f"error: {args.out_dir} already exists; pass a new directory.")
    print(write_random_checkpoint(args.architecture, args.out_dir, args.device, seed=args.seed))


if __name__ == "__main__":
    main()
