"""DPO throughput and memory: train.py against TRL's DPOTrainer, and against train.py's SFT, in one run.

The same 4-bit base for every side, the same tokens for DPO and SFT (shared/BENCH.md; issue #18).

    python scripts/bench_dpo.py                                   # 2 pairs x 2048 on the random Llama-3-8B
    python scripts/bench_dpo.py --settings 2x2048 1x4096 --sides dpo trl-dpo
    python scripts/bench_dpo.py --override optim=adamw            # our runs with TRL's kind of optimizer
    python scripts/bench_dpo.py --smoke                           # a tiny random Llama, a few steps: the script runs

A setting is PAIRSxSEQ: micro-batches of PAIRS preference pairs whose prompt + response is SEQ
tokens. Each side runs in its own process on the same random-weight checkpoint (the one bench.py
writes), with LoRA r=16, alpha=16, dropout 0 on every linear layer, gradient checkpointing on,
--accumulation micro-batches per optimizer step, and --warmup steps left out of the timing:

  dpo      python train.py recipe=llama3_8b_dpo (its paged 8-bit AdamW, lr 5e-6, beta 0.1; the
           reference is the base with the adapter off), model.checkpoint_layers=--checkpoint-layers
           (default all: `auto` fills the card by design, so its peak says nothing).
  trl-dpo  what a TRL user runs: trl.DPOTrainer on AutoModelForCausalLM.from_pretrained (NF4, double
           quant, bf16 compute, SDPA) with peft_config=LoraConfig, and DPOConfig(beta 0.1, lr 5e-6,
           max_length SEQ, gradient checkpointing, bf16, its default optimizer: fused torch AdamW).
           TRL computes the reference with the adapter off too.
  sft      python train.py recipe=llama3_8b_qlora on 2 x PAIRS packed sequences of SEQ tokens: the
           tokens of one DPO micro-batch, the yardstick for DPO's memory (issue #18: within 1.3x).

The pairs are conversations ({prompt, chosen, rejected} as message lists), so both trainers render
them with the checkpoint's chat template into the same tokens. Their words are single tokens, so
lengths are exact: the prompt is half of SEQ, and prompt + response is SEQ tokens as TRL counts
them (ours leaves out the newline the template puts after the end-of-turn token: SEQ - 1), so
nothing is truncated or dropped.

tok/s counts the non-padding tokens of the chosen and rejected sequences (the prompt in each) of
the timed optimizer steps, over their time, the GPU synchronized at each step's end: ours from
train.py's metrics.jsonl (tokens_per_s: the attention mask's sum), TRL's from its logged
num_tokens (the same sum) and a callback's clock. Peak = torch.cuda.max_memory_allocated after a
reset once the model is loaded (train.py resets it as training begins; TRL's side at train begin).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # From a checkout, installed or not; bench.py and make_random_checkpoint sit beside this file.
    sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
    from finetune.entry import start

    start("python scripts/bench_dpo.py")

import torch  # noqa: E402

import bench  # noqa: E402

DPO_RECIPE, SFT_RECIPE = "llama3_8b_dpo", "llama3_8b_qlora"
SIDES = ("dpo", "trl-dpo", "sft")
SIDE_NAMES = {"dpo": f"train.py {DPO_RECIPE}", "trl-dpo": "TRL DPOTrainer", "sft": f"train.py {SFT_RECIPE} (SFT)"}
TRL_SITE = Path("/tmp/trl-site")
# trl and its datasets at the versions the unsloth kit runs them (shared/device/unsloth/versions.txt).
TRL_WHEELS = ("trl-*.whl", "datasets-*.whl")


# ---------------------------------------------------------------- the pairs

def single_token_words(tokenizer) -> list[str]:
    """Words that are one token each after a space (byte-level BPE's 'Ġword'), so N of them are N tokens."""
    candidates = sorted(token[1:] for token in tokenizer.get_vocab() if token.startswith("Ġ") and token[1:].isalpha())
    ids = tokenizer([" " + word for word in candidates], add_special_tokens=False)["input_ids"] if candidates else []
    words = [word for word, word_ids in zip(candidates, ids) if len(word_ids) == 1]
    if not words:
        sys.exit("error: the checkpoint's tokenizer has no byte-level BPE words ('Ġword' tokens) to build pairs from")
    return words


def chat_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             add_generation_prompt=add_generation_prompt)["input_ids"])


def write_pairs(path: Path, tokenizer, seq: int, rows: int) -> Path:
    """`rows` {prompt, chosen, rejected} conversations, each prompt + response `seq` tokens as TRL
    tokenizes them, the prompt (with the template's tokens around it) half of that."""
    words = single_token_words(tokenizer)
    user = [{"role": "user", "content": " " + words[0]}]
    prompt_extra = chat_tokens(tokenizer, user, add_generation_prompt=True) - 1
    answered = [*user, {"role": "assistant", "content": " " + words[0]}]
    response_extra = chat_tokens(tokenizer, answered) - prompt_extra - 2
    prompt_words, response_words = seq // 2 - prompt_extra, seq - seq // 2 - response_extra
    if min(prompt_words, response_words) < 1:
        sys.exit(f"error: {seq} tokens leave no room for words beside the chat template's "
                 f"{prompt_extra + response_extra}; pick a longer SEQ")
    rng = random.Random(0)

    def text(count: int) -> str:
        return "".join(" " + word for word in rng.choices(words, k=count))

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text(prompt_words)}],
                                "chosen": [{"role": "assistant", "content": text(response_words)}],
                                "rejected": [{"role": "assistant", "content": text(response_words)}]}) + "\n")
    return path


# ---------------------------------------------------------------- TRL's side, in its own process

def measure_trl(args) -> dict:
    """The trl-dpo side (module docstring); its process has trl on its path."""
    import datasets
    import peft
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    if args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=torch.bfloat16, device_map={"": 0 if cuda else "cpu"}, attn_implementation="sdpa",
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    load_s = time.perf_counter() - start
    pairs = datasets.Dataset.from_list([json.loads(line) for line in args.pairs.read_text().splitlines()])
    ended, tokens, losses = {}, {}, {}

    class StepClock(transformers.TrainerCallback):
        def on_train_begin(self, *_, **__):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, _args, state, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            ended[state.global_step] = time.perf_counter()

        def on_log(self, _args, state, _control, logs=None, **__):
            if "num_tokens" in logs:  # a step's line, not the run's summary
                tokens[state.global_step], losses[state.global_step] = logs["num_tokens"], logs["loss"]

    steps = args.warmup + args.steps
    config = trl.DPOConfig(
        output_dir=str(args.workdir / f"trl-dpo-{args.batch}x{args.seq}"), max_steps=steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
        gradient_checkpointing=True, bf16=True, use_cpu=not cuda, beta=0.1, max_length=args.seq, learning_rate=5e-6,
        precompute_ref_log_probs=False, logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    lora = peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **bench.LORA)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                             peft_config=lora, callbacks=[StepClock()])
    trainer.train()
    timed_tokens = tokens[steps] - tokens[args.warmup]
    lengths = [len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
               for row in trainer.train_dataset]
    return {"side": "trl-dpo", "batch": args.batch, "seq": args.seq, "accumulation": args.accumulation,
            "tokens_per_s": timed_tokens / (ended[steps] - ended[args.warmup]),
            "tokens_per_step": timed_tokens / args.steps, "peak_gib": peak_gib(cuda),
            "losses": [losses[step] for step in sorted(losses)], "load_s": load_s, "optimizer": config.optim,
            "sequence_tokens": [min(lengths), max(lengths)],
            "versions": {"trl": trl.__version__, "datasets": datasets.__version__}}


def peak_gib(cuda: bool) -> float:
    """GPU: torch's peak allocation since the reset; CPU (--smoke): peak resident memory, as train.py reports it."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def trl_pythonpath(site: Path | None) -> str | None:
    """What the trl-dpo process puts first on its PYTHONPATH: --trl-site; nothing when this environment
    has trl; else the unsloth kit's trl and datasets wheels, installed into /tmp/trl-site once."""
    if site:
        if not (site / "trl").is_dir():
            sys.exit(f"error: --trl-site {site} holds no trl package")
        return str(site)
    if importlib.util.find_spec("trl"):
        return None
    if not (TRL_SITE / "trl").is_dir():
        wheels = [wheel for pattern in TRL_WHEELS for wheel in sorted((REPO / ".whl-unsloth").glob(pattern))]
        if not any(wheel.name.startswith("trl-") for wheel in wheels):
            sys.exit("error: the trl-dpo side needs trl: this environment lacks it and .whl-unsloth/ holds no trl "
                     "wheel (bash ../shared/device/unsloth/fetch.sh); pip install trl, or pass --trl-site DIR")
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-compile", "--target", str(TRL_SITE), *map(str, wheels)],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            sys.exit(f"error: installing {' '.join(w.name for w in wheels)} into {TRL_SITE} failed: "
                     f"{(install.stderr.strip().splitlines() or ['no message'])[-1]}")
    return str(TRL_SITE)


def run_trl(batch: int, seq: int, pairs: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--measure-trl", "--checkpoint", str(args.checkpoint), "--pairs", str(pairs),
           "--batch", str(batch), "--seq", str(seq), "--accumulation", str(args.accumulation),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--workdir", str(args.workdir)]
    if args.cap_gib:
        cmd += ["--cap-gib", str(args.cap_gib)]
    pythonpath = os.pathsep.join(p for p in (args.trl_pythonpath, os.environ.get("PYTHONPATH")) if p)
    # Everything is local: nothing may reach for the hub.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"side": "trl-dpo", "batch": batch, "seq": seq, "error": " | ".join(tail)[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- our sides: train.py

def ours_overrides(args) -> list[str]:
    """The baseline's LoRA (dropout 0, alpha 16 where the recipes say 32/0.05) and a meaningful peak."""
    return [*(f"lora.{key}={value}" for key, value in bench.LORA.items()),
            f"model.checkpoint_layers={args.checkpoint_layers}", *args.override]


def run_dpo(batch: int, seq: int, pairs: Path, args) -> dict:
    return bench.run_train_py("dpo", DPO_RECIPE, [f"data.path={pairs}", "data.eval_fraction=0.01",
                                                  *ours_overrides(args)], batch, seq, args.accumulation, args)


def run_sft(batch: int, seq: int, args) -> dict:
    """2 x `batch` sequences of `seq` tokens in one packed micro-batch: the tokens of `batch` pairs."""
    sequences = 2 * batch
    text = bench.synthetic_text(args.workdir / f"e2e-text-{seq}.jsonl", seq,
                                rows=(args.warmup + args.steps + 2) * args.accumulation * sequences + 64)
    overrides = ["data=text", f"data.path={text}", "data.packing=true", "data.eval_fraction=0.01",
                 *ours_overrides(args)]
    return bench.run_train_py("sft", SFT_RECIPE, overrides, sequences, seq, args.accumulation, args)


# ---------------------------------------------------------------- the driver

def tiny_llama(directory: Path) -> Path:
    """A tiny random Llama with the demo tokenizer, as make_random_checkpoint writes them."""
    if (directory / "config.json").exists():
        return directory
    from make_random_checkpoint import write_random_checkpoint
    from transformers import LlamaConfig

    # vocab_size covers the demo tokenizer: its BPE trainer stops at 600 tokens.
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=640, max_position_embeddings=256)
    return write_random_checkpoint(config, directory, "cpu")


def report(results: list[dict], info: dict) -> str:
    lines = [f"card: {info['card']}; " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "card"), "",
             "| setting | side | tok/s | vs trl-dpo | peak GiB | peak vs trl-dpo | loss first / last |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        rows = {r["side"]: r for r in results if r["setting"] == setting and "error" not in r}
        pairs, seq = setting.split("x")
        label = f"{pairs} pairs x {seq}"
        trl = rows.get("trl-dpo")
        for r in (r for r in results if r["setting"] == setting):
            name = SIDE_NAMES[r["side"]] + (f", {r['batch']} x {r['seq']} packed" if r["side"] == "sft" else "")
            if "error" in r:
                lines.append(f"| {label} | {name} | failed: {r['error']} | | | | |")
                continue
            versus = trl is not None and r["side"] != "sft"
            speed = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if versus else ""
            memory = f"{r['peak_gib'] / trl['peak_gib']:.2f}x" if versus else ""
            lines.append(f"| {label} | {name} | {r['tokens_per_s']:,.0f} | {speed} | {r['peak_gib']:.2f} | {memory} "
                         f"| {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
        if "dpo" in rows and "sft" in rows:
            notes.append(f"{label}: DPO peak / SFT peak on the same tokens ({rows['sft']['batch']} x {seq}) = "
                         f"{rows['dpo']['peak_gib'] / rows['sft']['peak_gib']:.2f}x (issue #18: at most 1.3x)")
        if "dpo" in rows:
            notes += [f"{label}: ours {line}" for line in rows["dpo"]["console"] if line.startswith("data train")]
        if trl:
            shortest, longest = trl["sequence_tokens"]
            notes.append(f"{label}: TRL's prompt + response {shortest}..{longest} tokens, optimizer {trl['optimizer']}")
    return "\n".join(lines + [""] + notes)


def parse_setting(text: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", text)
    if not match:
        parser.error(f"setting {text!r}: expected PAIRSxSEQ, e.g. 2x2048")
    return int(match[1]), int(match[2])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama3-8b")
    parser.add_argument("--checkpoint", type=Path, help="existing HF checkpoint (default: bench.py's random one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/finetune-bench"))
    parser.add_argument("--settings", nargs="+", default=["2x2048"], help="PAIRSxSEQ")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    # 2, not the recipes' 8: TRL's steps are the slow ones, and the three sides must fit one 10-minute GPU call.
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step, every side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--checkpoint-layers", default="all", help="model.checkpoint_layers of our runs")
    parser.add_argument("--override", action="append", default=[], help="extra config override for our runs")
    parser.add_argument("--trl-site", type=Path, help="a directory holding trl (and its datasets) for the trl-dpo "
                        "side (default: this environment's trl, else .whl-unsloth's wheels in /tmp/trl-site)")
    parser.add_argument("--cap-gib", type=float, help="cap each side's GPU memory (set_per_process_memory_fraction)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, a few steps (CPU or GPU)")
    parser.add_argument("--measure-trl", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_trl:
        print(json.dumps(measure_trl(args)))
        return []

    if args.smoke:
        args.checkpoint = tiny_llama(args.workdir / "tiny-llama-random")
        args.settings, args.accumulation, args.warmup, args.steps = ["2x64"], 1, 1, 2
        args.override = ["optim=adamw", *args.override]  # paged 8-bit AdamW needs CUDA
    for name in ("accumulation", "warmup", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    settings = [parse_setting(setting, parser) for setting in args.settings]
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint} is no HF checkpoint (no config.json)")
    args.trl_pythonpath = trl_pythonpath(args.trl_site) if "trl-dpo" in args.sides else None
    if args.checkpoint is None:
        args.checkpoint = bench.random_checkpoint(args.arch, args.workdir)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    results = []
    for batch, seq in settings:
        pairs = write_pairs(args.workdir / f"dpo-pairs-{seq}.jsonl", tokenizer, seq,
                            rows=(args.warmup + args.steps + 2) * args.accumulation * batch + 64)
        for side in args.sides:
            if side == "dpo":
                result = run_dpo(batch, seq, pairs, args)
            elif side == "trl-dpo":
                result = run_trl(batch, seq, pairs, args)
            else:
                result = run_sft(batch, seq, args)
            result["setting"] = f"{batch}x{seq}"
            print(json.dumps(result), flush=True)
            results.append(result)
    info = {**bench.versions(), **next((r["versions"] for r in results if "versions" in r), {})}
    print(report(results, info))
    if args.json:
        args.json.write_text(json.dumps({"versions": info, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
