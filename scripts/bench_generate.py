"""Decode speed: finetune's generation against transformers + bitsandbytes + peft `generate`.

    python scripts/bench_generate.py --model /data/llama3-8b-random --batch-sizes 1,16 --new-tokens 256
    python scripts/bench_generate.py --model BASE_DIR --adapter RUN/adapter --batch-sizes 1,16
    python scripts/bench_generate.py --smoke        # a tiny random model on the CPU: checks the script runs

Sides: `ours` (decode steps replayed from CUDA graphs on a GPU), `ours-eager` (the same steps
launched one kernel at a time: what the graphs save) and `hf`.

Both sides load the same 4-bit base (NF4, double quantization, the adapter's training settings)
and the same adapter through `finetune.load` (impl=native: ours; impl=hf: transformers' 4-bit
model with peft's LoRA over it). Without --adapter a random all-linear r=16 adapter is written for
the base first. Prompts are random token ids of --prompt-tokens each; generation is greedy and
runs exactly --new-tokens (no EOS). Decode tok/s = batch x (new - 1) / (time of new tokens - time
of one token): the prefill is not counted. The bandwidth bound divides the card's memory
bandwidth by the bytes one decode step must read: every 4-bit weight with its scales, the LM
head, norms and LoRA weights, and the KV cache at mid-generation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without an install
    from finetune.entry import start

    start("python scripts/bench_generate.py")
    from finetune.cli import quiet_libraries

    quiet_libraries()

import torch  # noqa: E402

# Peak memory bandwidth by card name (GB/s), for the bound; --bandwidth-gbs overrides.
BANDWIDTH_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039}


def random_adapter(model_dir: Path, out_dir: Path, device: torch.device, r: int = 16) -> Path:
    """An all-linear LoRA adapter for `model_dir` with random (non-zero) B, saved in peft's format."""
    from transformers import AutoTokenizer

    from finetune.adapter_format import QuantRecord
    from finetune.config import Dtype, LoraConfig, ModelConfig, ModelImpl, QuantConfig, RunConfig
    from finetune.models import build_model

    compute = Dtype.bfloat16 if device.type == "cuda" else Dtype.float32
    cfg = RunConfig(name="bench", output_dir="unused",
                    model=ModelConfig(name_or_path=str(model_dir), impl=ModelImpl.native), quant=QuantConfig(bnb_4bit_compute_dtype=compute), lora=LoraConfig(r=r, lora_alpha=2 * r))
    torch.manual_seed(0)  # LoRA A's initialization draws from the global generator
    loaded = build_model(cfg, device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    loaded.model.save_pretrained(out_dir)
    QuantRecord.from_config(cfg.quant, loaded.compute_dtype).write(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, torch.Tensor]:
    from transformers import GenerationConfig

    # No EOS: every row runs the full length on both sides.
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    synchronize(device)
    assert out.shape[1] == ids.shape[1] + new_tokens, "generation stopped early"
    return time.perf_counter() - start, out[:, ids.shape[1]:]


def decode_bytes(model, batch: int, context: int) -> int:
    """Bytes a decode step reads: every tensor but the embedding table (one row a token), plus the KV cache."""
    from finetune.models.native import NativeCausalLM

    assert isinstance(model, NativeCausalLM)
    args = model.args
    embeddings = model.model.embed_tokens.weight
    weights = model.memory_footprint()
    if not args.tie_word_embeddings:
        weights -= embeddings.numel() * embeddings.element_size()
    kv = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * embeddings.element_size()
    return weights + batch * context * kv


def bench_side(side: str, adapter: Path, device: torch.device, batch_sizes: list[int], prompt_tokens: int,
               new_tokens: int, vocab: int, repeats: int) -> list[dict]:
    import finetune

    model, _ = finetune.load(adapter, device=str(device), impl="hf" if side == "hf" else "native")
    if side == "ours-eager":
        model.cuda_graph_decoding = False
    if side == "hf":
        model.generation_config.eos_token_id = None  # the model's own default would stop rows early
    rows = []
    for batch in batch_sizes:
        ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(batch)).to(device)
        timed_generate(model, ids, 2, device)  # warm-up: kernels compiled, caches allocated
        one = min(timed_generate(model, ids, 1, device)[0] for _ in range(repeats))
        runs = [timed_generate(model, ids, new_tokens, device) for _ in range(repeats)]
        total, tokens = min(run[0] for run in runs), runs[0][1]
        row = dict(side=side, batch=batch, prefill_s=one, total_s=total,
                   decode_tok_s=batch * (new_tokens - 1) / max(total - one, 1e-9), tokens=tokens.cpu())
        if side != "hf":
            row["step_bytes"] = decode_bytes(model, batch, prompt_tokens + new_tokens // 2)
        rows.append(row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], bandwidth_gbs: float | None) -> str:
    ours = {r["batch"]: r for r in rows if r["side"] == "ours"}
    hf = {r["batch"]: r for r in rows if r["side"] == "hf"}
    lines = ["| batch | ours decode tok/s | hf decode tok/s | ours / hf | same tokens | ours prefill s | "
             "hf prefill s | GB read / step | bound tok/s | ours / bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for batch in sorted(ours.keys() | hf.keys()):
        o, h = ours.get(batch), hf.get(batch)
        ratio = f"{o['decode_tok_s'] / h['decode_tok_s']:.2f}x" if o and h else "-"
        same = f"{(o['tokens'] == h['tokens']).float().mean().item():.0%}" if o and h else "-"
        bound = share = gb = "-"
        if o:
            gb = f"{o['step_bytes'] / 1e9:.2f}"
            if bandwidth_gbs:
                limit = batch * bandwidth_gbs * 1e9 / o["step_bytes"]
                bound, share = f"{limit:,.0f}", f"{o['decode_tok_s'] / limit:.0%}"
        lines.append(f"| {batch} | {o['decode_tok_s']:,.1f} | " if o else f"| {batch} | - | ")
        lines[-1] += (f"{h['decode_tok_s']:,.1f} | " if h else "- | ") + f"{ratio} | {same} | "
        lines[-1] += (f"{o['prefill_s']:.3f} | " if o else "- | ") + (f"{h['prefill_s']:.3f} | " if h else "- | ")
        lines[-1] += f"{gb} | {bound} | {share} |"
    for row in rows:
        if row["side"] not in ("ours", "hf"):
            lines.append(f"{row['side']}, batch {row['batch']}: {row['decode_tok_s']:,.1f} decode tok/s, "
                         f"prefill {row['prefill_s']:.3f} s")
    return "\n".join(lines)


def smoke_model(directory: Path) -> Path:
    """A tiny random Llama with the demo tokenizer, like the checkpoints the benchmark is meant for."""
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_random_checkpoint import write_random_checkpoint

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    return write_random_checkpoint(config, directory, "cpu", dtype=torch.float32)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="base model directory (HF safetensors: the hf side loads it too)")
    parser.add_argument("--adapter", type=Path, help="adapter directory (default: a random r=16 one)")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sides", default="ours,hf")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the fastest counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the bound (default: by card)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, a few tokens")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            args.model = smoke_model(Path(scratch) / "model")
            args.new_tokens, args.prompt_tokens, args.repeats = 6, 8, 1
            batch_sizes = [1, 3]
        if args.model is None:
            parser.error("--model is required (or --smoke)")
        adapter = args.adapter or random_adapter(args.model, Path(scratch) / "adapter", device)
        vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
        rows = []
        for side in sides:
            rows += bench_side(side, adapter, device, batch_sizes, args.prompt_tokens, args.new_tokens, vocab,
                               args.repeats)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in card), None)
    print(f"{card}: {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy"
          + (f", bound at {bandwidth:,.0f} GB/s" if bandwidth else ""))
    print(table(rows, bandwidth))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
