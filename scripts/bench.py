"""QLoRA training throughput and memory, ours against the baseline, measured in one run (shared/BENCH.md).

    python scripts/bench.py --arch llama3-8b --settings 2x2048 1x8192 --sides hf liger ours
    python scripts/bench.py --settings 2x2048 --sides hf hf-kbit ours --ours-variant "model.checkpoint_layers=16"
    python scripts/bench.py --settings 2x2048 --sides ours e2e     # the raw loop beside train.py end to end
    python scripts/bench_dpo.py                                    # DPO: train.py against TRL's DPOTrainer, and SFT

Baseline ("hf") is what a user would otherwise run: transformers AutoModelForCausalLM with
BitsAndBytesConfig(nf4, double quant, bf16 compute) + peft LoRA (r=16, alpha=16, dropout 0, all
linear layers) + torch AdamW, SDPA attention, gradient checkpointing on, model in train mode.
"hf-kbit" adds peft's `prepare_model_for_kbit_training` (the step peft's QLoRA guide tells users to
take: it upcasts the embeddings, norms and LM head to fp32); "liger" adds liger-kernel's Llama
patches to the baseline; "ours" is finetune's model path
(`model.impl=native`, or `--ours-impl`). Each side runs in its own process on the same random-
weight checkpoint, with random token ids, warm-up steps excluded and optimizer steps timed
with the GPU synchronized. MFU counts 4 x linear parameters (forward + input gradient; the
frozen weights get no weight gradient) plus causal attention (3 x forward) per token, against
the bf16 matmul rate measured on the card in the same run.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # From a checkout, installed or not; make_random_checkpoint sits beside this file.
    sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
    from finetune.entry import start

    start("python scripts/bench.py")

import torch  # noqa: E402

from finetune.plan.memory import useful_flops_per_token  # noqa: E402
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0)


# ---------------------------------------------------------------- one side, in its own process

def build_hf(checkpoint: Path, liger: bool, grad_ckpt: bool, kbit_prep: bool):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    if kbit_prep:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    model.train()

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, step


def build_ours(checkpoint: Path, impl: str, grad_ckpt: bool, overrides: list[str], batch: int, seq: int,
               cap_gib: float | None):
    from finetune.api import compose_config
    from finetune.models import build_model, choose_impl
    from finetune.models.source import resolve_source
    from finetune.plan.memory import GiB, decide_memory_layout, plan_for_run

    cfg = compose_config("demo", [f"model.name_or_path={checkpoint}", f"model.impl={impl}",
                                  f"model.gradient_checkpointing={str(grad_ckpt).lower()}",
                                  f"data.max_seq_len={seq}", f"train.micro_batch_size={batch}",
                                  *(f"lora.{k}={v}" for k, v in LORA.items()),
                                  # The planner (checkpoint_layers and offload left to auto) plans for the cap.
                                  *([f"hardware.gpu_memory_gb={cap_gib}"] if cap_gib else []), *overrides])
    source = resolve_source(cfg.model, cfg.cache_dir)
    impl, why = choose_impl(cfg, source)
    plan = plan_for_run(cfg, source, impl, why)
    notices = []
    layout = decide_memory_layout(cfg, source, impl, why, torch.device("cuda"), notices)
    loaded = build_model(cfg, torch.device("cuda"), layout=layout, source=source, impl=impl)
    for notice in notices:
        print(notice, file=sys.stderr)
    for notice in loaded.notices:
        print(notice, file=sys.stderr)
    model = loaded.model
    model.plan = {"plan_gib": plan.gpu_total / GiB, "plan_tensors_gib": plan.tensors_bytes / GiB,
                  "plan_offload": plan.offload.value, "plan_checkpointed_layers": plan.checkpointed_layers}
    model.train()

    def step(ids):
        return model(input_ids=ids, labels=ids, num_items_in_batch=ids[:, 1:].numel()).loss

    return model, step


def measure(args) -> dict:
    if args.cap_gib:
        # A smaller card on a big one (shared/BENCH.md): the allocator refuses beyond the cap.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    torch.manual_seed(0)
    load_start = time.perf_counter()
    batch, seq = args.batch, args.seq
    if args.side == "ours":
        model, step = build_ours(args.checkpoint, args.ours_impl, not args.no_grad_ckpt, args.ours_override,
                                 batch, seq, args.cap_gib)
    else:
        model, step = build_hf(args.checkpoint, liger=args.side == "liger", grad_ckpt=not args.no_grad_ckpt,
                               kbit_prep=args.side == "hf-kbit")
    load_s = time.perf_counter() - load_start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    vocab = model.config.vocab_size if hasattr(model, "config") else args.vocab
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses = []
    host_s = []

    def optimizer_step():
        began = time.perf_counter()
        loss = step(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Until here the host only queues work (or waits inside the step, on a copy): close to the whole
        # step means the host, not the GPU, sets the pace.
        host_s.append(time.perf_counter() - began)
        losses.append(loss.item())

    # Ours steps as train.py's loop does, under steady_heap (hf and liger as their users would run them).
    from finetune.training.step import steady_heap

    with steady_heap() if args.side == "ours" else contextlib.nullcontext():
        for _ in range(args.warmup):
            optimizer_step()
        torch.cuda.synchronize()
        if args.profile:
            # Variants of ours get files of their own, named after their overrides.
            overrides = "".join(f"-{re.sub(r'[^A-Za-z0-9_.=]', '_', o)}" for o in args.ours_override) \
                if args.side == "ours" else ""
            profile_steps(optimizer_step, args.profile / f"{args.side}{overrides}-bs{batch}x{seq}.txt")
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer_step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"side": args.side, "batch": batch, "seq": seq, "tokens_per_s": batch * seq * args.steps / elapsed,
            "step_ms": elapsed / args.steps * 1e3, "host_ms": sum(host_s[-args.steps:]) / args.steps * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses, "load_s": load_s,
            "cap_gib": args.cap_gib, "overrides": args.ours_override if args.side == "ours" else [],
            **getattr(model, "plan", {})}


# Kernel-name patterns for the profile summary, first match wins.
KERNEL_KINDS = [
    ("attention", ("fmha", "flash", "cudnn", "attn", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "splitk")),
    ("nf4 dequantize", ("nf4", "dequant")),
    ("fused linear+CE", ("cross_entropy",)),
    ("rmsnorm", ("rmsnorm",)),
    ("rope", ("rope",)),
    ("swiglu", ("swiglu",)),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("copy/cast", ("copy", "cat", "fill", "memcpy", "memset")),
]


# Gaps between the compute stream's kernels, by length: launch latency, short host stalls, long ones.
GAP_BUCKETS_US = (10, 100, 1000)


def _host_link(name: str) -> bool:
    """A copy between host and GPU memory (CUPTI names them "Memcpy HtoD ...", "Memcpy DtoH ...")."""
    name = name.lower()
    return name.startswith("memcpy") and ("htod" in name or "dtoh" in name)


def _busy_spans(activities: list[tuple]) -> list[list]:
    """Compute kernels (not host-link copies) merged into [start, end, first activity] spans:
    cuBLAS and cuDNN may overlap kernels, and a span's first activity is what ended the wait before it."""
    spans: list[list] = []
    for activity in sorted((a for a in activities if not _host_link(a[0])), key=lambda a: a[1]):
        if spans and activity[1] <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], activity[2])
        else:
            spans.append([activity[1], activity[2], activity])
    return spans


def compute_timeline(activities: list[tuple[str, float, float]], wall_us: float, steps: int) -> list[str]:
    """Report lines on when the compute stream works, from (name, start us, end us) GPU activities.

    Host-link copies (memcpy: activation parking and weight streaming copy on side streams) are
    taken apart; the rest are merged into busy spans, and what lies between spans is the compute
    stream waiting, for the host's launches or for a copy.
    """
    copies = [(start, end) for name, start, end, *_ in activities if _host_link(name)]
    spans = _busy_spans(activities)
    busy = sum(end - start for start, end, _ in spans)
    gaps = [later[0] - earlier[1] for earlier, later in zip(spans, spans[1:])]
    bounds = (0, *GAP_BUCKETS_US, float("inf"))
    lines = [f"compute kernels busy {busy / steps / 1e3:.1f} ms/step, waiting {(wall_us - busy) / steps / 1e3:.1f} "
             f"ms/step of {wall_us / steps / 1e3:.1f}; host-link copies {sum(e - s for s, e in copies) / steps / 1e3:.1f} "
             "ms/step beside them", "", "| gap between compute kernels | gaps/step | ms/step |", "|---|---|---|"]
    for low, high in zip(bounds, bounds[1:]):
        inside = [g for g in gaps if low <= g < high]
        label = f">= {low:g} us" if high == float("inf") else f"{low:g}-{high:g} us"
        lines.append(f"| {label} | {len(inside) / steps:.0f} | {sum(inside) / steps / 1e3:.1f} |")
    return lines


# Gaps shorter than this are kernels queued back to back (launch latency), not waiting.
WAIT_US = 10


def wait_causes(kernels: list[tuple[str, float, float, int]], launches: dict[int, tuple[float, float]],
                host_calls: list[tuple[str, float, float]], steps: int, top: int = 8) -> list[str]:
    """Report lines on why the compute stream waited, gap by gap (gaps of WAIT_US or more).

    `kernels`: (name, start us, end us, correlation id) GPU activities; `launches`: correlation id
    -> host (start us, end us) of the runtime call that queued that activity; `host_calls`:
    (name, start us, end us) of every CUDA runtime or driver call. The kernel that ends a gap was
    either queued after the GPU had gone idle (its launch call still running when the gap began:
    the host was late, from launch work or a host-side stall) or before (it waited on the device,
    for another stream: a parked tensor coming back, a copy's slot). For the host-late waits, the
    runtime calls running on the host meanwhile (a synchronize there is a stall; launches alone
    mean the host's own pace), and per cause the kernels the GPU waited longest before.
    """
    spans = _busy_spans(kernels)
    causes: dict[str, list[float]] = {"host late": [], "on the device": [], "launch not in the trace": []}
    before: dict[tuple[str, str], float] = {}
    host_windows = []
    for earlier, later in zip(spans, spans[1:]):
        gap_start, gap = earlier[1], later[0] - earlier[1]
        if gap < WAIT_US:
            continue
        name, _, _, correlation = later[2]
        launch = launches.get(correlation)
        cause = "launch not in the trace" if launch is None else "host late" if launch[1] > gap_start \
            else "on the device"
        causes[cause].append(gap)
        before[cause, name] = before.get((cause, name), 0.0) + gap
        if cause == "host late":
            host_windows.append((gap_start, min(launch[0], later[0])))
    lines = [f"| why the compute stream waited (gaps >= {WAIT_US} us) | gaps/step | ms/step |", "|---|---|---|"]
    lines += [f"| {cause} | {len(gaps) / steps:.0f} | {sum(gaps) / steps / 1e3:.1f} |" for cause, gaps in causes.items()]
    overlap: dict[str, float] = {}
    host_windows.sort()
    starts = [start for start, _ in host_windows]
    for call, start, end in host_calls:
        for window_start, window_end in host_windows[max(0, bisect.bisect_right(starts, start) - 1):]:
            if window_start >= end:
                break
            shared = min(end, window_end) - max(start, window_start)
            if shared > 0:
                overlap[call] = overlap.get(call, 0.0) + shared
    ranked = sorted(overlap.items(), key=lambda kv: -kv[1])[:top]
    lines += ["", "host calls running while the GPU waited for the host (ms/step): "
              + (", ".join(f"{call} {us / steps / 1e3:.1f}" for call, us in ranked) or "none")]
    lines += ["", "| kernel the GPU waited before | cause | ms/step |", "|---|---|---|"]
    for (cause, name), us in sorted(before.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name[:80]} | {cause} | {us / steps / 1e3:.1f} |")
    return lines


def profile_steps(optimizer_step, path: Path, steps: int = 2) -> None:
    """Where the GPU time of `steps` optimizer steps goes: kernel kinds, top kernels, and idle time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            optimizer_step()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    kinds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in kernels:
        name = e.name.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other elementwise")
        kinds[kind] = kinds.get(kind, 0.0) + e.time_range.elapsed_us()
        counts[kind] = counts.get(kind, 0) + 1
    lines = [f"{steps} steps: wall {wall_us / 1e3:.1f} ms, GPU busy {busy_us / 1e3:.1f} ms "
             f"({busy_us / wall_us:.0%}), {len(kernels)} kernels", "",
             "| kind | ms/step | share of busy | kernels/step |", "|---|---|---|---|"]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / steps / 1e3:.1f} | {us / busy_us:.1%} | {counts[kind] // steps} |")
    # Kineto's own records: a kernel and the runtime call that launched it share a correlation id.
    events = prof.profiler.kineto_results.events()
    device = [(e.name(), e.start_ns() / 1e3, e.end_ns() / 1e3, e.correlation_id()) for e in events
              if e.device_type() == torch.autograd.DeviceType.CUDA]
    # CUDA runtime and driver calls (cudaLaunchKernel, cuLaunchKernel for Triton, cudaEventSynchronize...).
    runtime = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU and e.name().startswith("cu")]
    launches = {e.correlation_id(): (e.start_ns() / 1e3, e.end_ns() / 1e3) for e in runtime}
    host_calls = [(e.name(), e.start_ns() / 1e3, e.end_ns() / 1e3) for e in runtime]
    lines += ["", *compute_timeline(device, wall_us, steps), "", *wait_causes(device, launches, host_calls, steps)]
    lines += ["", prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------- the driver

def run_side(side: str, batch: int, seq: int, args, variant: str | None = None) -> dict:
    """One side in its own process; `variant`: extra overrides for ours (space-separated), reported as its own row."""
    cmd = [sys.executable, __file__, "--one", side, "--batch", str(batch), "--seq", str(seq), "--checkpoint",
           str(args.checkpoint), "--steps", str(args.steps), "--warmup", str(args.warmup), "--ours-impl", args.ours_impl]
    overrides = [*args.ours_override, *(variant.split() if variant else [])]
    cmd += [x for o in overrides for x in ("--ours-override", o)]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    if args.no_grad_ckpt:
        cmd.append("--no-grad-ckpt")
    if args.cap_gib:
        cmd += ["--cap-gib", str(args.cap_gib)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    label = f"{side} {variant}" if variant else side
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"side": label, "batch": batch, "seq": seq, "error": " | ".join(tail)[-400:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "side": label}


def run_e2e(batch: int, seq: int, args) -> dict:
    """`python train.py` as users run it: the recipe (its optimizer, accumulation, clipping, schedule,
    LoRA settings) on the random checkpoint, packed synthetic text, evaluation off.

    A packed micro-batch is one row of up to batch x seq tokens, each sample at most seq long, so
    attention spans what the raw loop's batch x seq rows span.
    """
    data = synthetic_text(args.workdir / f"e2e-text-{seq}.jsonl", seq,
                          rows=(args.warmup + args.steps + 2) * args.e2e_accumulation * batch + 64)
    overrides = ["data=text", f"data.path={data}", "data.packing=true", "data.eval_fraction=0.01", *args.e2e_override]
    result = run_train_py(f"train.py {args.e2e_recipe}", args.e2e_recipe, overrides, batch, seq,
                          args.e2e_accumulation, args)
    return {**result, "overrides": args.e2e_override}


def run_train_py(label: str, recipe: str, overrides: list[str], batch: int, seq: int, accumulation: int,
                 args) -> dict:
    """`python train.py recipe=RECIPE` on args.checkpoint for args.warmup + args.steps optimizer steps,
    evaluation, saving and sampling off, under args.cap_gib if set; `overrides` come last.

    tok/s counts the non-padding tokens of the steps after the warm-up (what the run logs as
    tokens_per_s), from metrics.jsonl (logged every step: one synchronization a step); peak is the
    largest logged peak_memory_gib.
    """
    out = args.workdir / f"e2e-{recipe}-bs{batch}x{seq}-{time.strftime('%H%M%S')}"
    cmd = [sys.executable, str(REPO / "train.py"), f"recipe={recipe}", f"model.name_or_path={args.checkpoint}",
           f"data.max_seq_len={seq}", f"train.micro_batch_size={batch}",
           f"train.gradient_accumulation_steps={accumulation}", f"train.max_steps={args.warmup + args.steps}",
           "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.eval_generate=0",
           "train.sample_prompts=[]", f"output_dir={out}", *overrides]
    if args.cap_gib:
        # The planner plans for the cap, and the allocator enforces it as it does for the other sides.
        cmd.append(f"hardware.gpu_memory_gb={args.cap_gib}")  # GiB, as the cap
        cap = (f"import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction({args.cap_gib * 2**30} / "
               f"torch.cuda.get_device_properties(0).total_memory); sys.argv = sys.argv[1:]; "
               f"runpy.run_path(sys.argv[0], run_name='__main__')")
        cmd = [sys.executable, "-c", cap, *cmd[1:]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"side": label, "batch": batch, "seq": seq, "error": " | ".join(tail)[-400:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    return {"side": label, "batch": batch, "seq": seq, "accumulation": accumulation,
            "tokens_per_s": tokens / seconds, "tokens_per_step": tokens / len(timed),
            "peak_gib": max(r["peak_memory_gib"] for r in timed), "losses": [r["loss"] for r in rows if "loss" in r],
            "wall_s": time.perf_counter() - start,
            "console": [line for line in done.stdout.splitlines() if line.startswith(("note:", "model:", "global",
                                                                                      "data "))]}


def synthetic_text(path: Path, seq: int, rows: int) -> Path:
    """Rows of random words from the checkpoint's tokenizer, each longer than `seq` tokens (cut to it)."""
    import random

    from finetune.demo import build_tokenizer

    if path.exists():
        return path
    words = [w for w in build_tokenizer().get_vocab() if w.isalpha()]
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq + 64))}) + "\n")
    return path


def random_checkpoint(arch: str, workdir: Path) -> Path:
    """WORKDIR/ARCH-random: the architecture with random weights (shared/BENCH.md), written on the GPU once."""
    checkpoint = workdir / f"{arch}-random"
    if not (checkpoint / "config.json").exists():
        from make_random_checkpoint import write_random_checkpoint

        start = time.perf_counter()
        write_random_checkpoint(arch, checkpoint, "cuda")
        # Flushed now rather than while the first side runs: the first process on a fresh machine
        # measured 9-20% slower than later ones, the ~16 GB just written likely still going to disk.
        os.sync()
        print(f"wrote {checkpoint} in {time.perf_counter() - start:.0f} s", flush=True)
    return checkpoint


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def report(results: list[dict], peak_tflops: float, link_gbps: float, config, info: dict) -> str:
    lines = [f"card: {info['card']}; bf16 matmul peak measured {peak_tflops:.0f} TFLOP/s; "
             f"host link (pinned host-to-GPU copies) {link_gbps:.1f} GB/s; "
             + ", ".join(f"{k} {v}" for k, v in info.items() if k != "card"),
             "", "| setting | side | tok/s | vs hf | vs hf-kbit | vs ours | MFU | peak GiB | step ms (host) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        setting = f"bs{r['batch']} x {r['seq']}"
        if "error" in r:
            lines.append(f"| {setting} | {r['side']} | failed: {r['error']} | | | | | | |")
            continue
        ratios = []
        for baseline in ("hf", "hf-kbit", "ours"):
            base = next((b for b in results if b["side"] == baseline and b["batch"] == r["batch"]
                         and b["seq"] == r["seq"] and "error" not in b), None)
            ratios.append(f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a")
        mfu = useful_flops_per_token(config, r["seq"]) * r["tokens_per_s"] / (peak_tflops * 1e12)
        # The host's share of a step: raw-loop sides only (train.py logs no such figure).
        timing = f"{r['step_ms']:.0f} ({r['host_ms']:.0f})" if "host_ms" in r else ""
        lines.append(f"| {setting} | {r['side']} | {r['tokens_per_s']:,.0f} | {' | '.join(ratios)} | {mfu:.1%} "
                     f"| {r['peak_gib']:.2f} | {timing} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama3-8b")
    parser.add_argument("--checkpoint", type=Path, help="existing HF checkpoint (default: write a random one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/finetune-bench"))
    parser.add_argument("--settings", nargs="+", default=["2x2048", "1x8192"], help="BATCHxSEQ")
    parser.add_argument("--sides", nargs="+", default=["hf", "ours"],
                        choices=["hf", "hf-kbit", "liger", "ours", "e2e"],
                        help="e2e: python train.py with --e2e-recipe, end to end")
    parser.add_argument("--e2e-recipe", default="llama3_8b_qlora")
    parser.add_argument("--e2e-accumulation", type=int, default=8, help="train.gradient_accumulation_steps of e2e")
    parser.add_argument("--e2e-override", action="append", default=[], help="extra config override for e2e")
    parser.add_argument("--ours-impl", default="native")
    parser.add_argument("--ours-override", action="append", default=[], help="extra config override for ours")
    parser.add_argument("--ours-variant", action="append", default=[],
                        help="another ours row per setting with these extra overrides (space-separated)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-grad-ckpt", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cap-gib", type=float, help="cap each side's GPU memory (set_per_process_memory_fraction)")
    parser.add_argument("--profile", type=Path, help="also write a kernel-time breakdown per side into this directory")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=128256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        args.side = args.one
        print(json.dumps(measure(args)))
        return

    from finetune.models.architectures import hf_config
    from finetune.plan.perf import host_link_bytes_per_s, matmul_peak_flops

    if args.checkpoint is None:
        args.checkpoint = random_checkpoint(args.arch, args.workdir)
    config = hf_config(args.arch).to_dict()
    peak = matmul_peak_flops(torch.device("cuda")) / 1e12
    link = host_link_bytes_per_s(torch.device("cuda")) / 1e9
    results = []
    for setting in args.settings:
        batch, seq = (int(x) for x in setting.split("x"))
        runs = [(side, None) for side in args.sides] + [("ours", variant) for variant in args.ours_variant]
        for side, variant in runs:
            result = run_e2e(batch, seq, args) if side == "e2e" else run_side(side, batch, seq, args, variant)
            print(json.dumps(result), flush=True)
            results.append(result)
    info = versions()
    table = report(results, peak, link, config, info)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"peak_tflops": peak, "host_link_gbps": link, "versions": info,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
