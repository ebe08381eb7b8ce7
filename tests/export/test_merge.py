"""Merging LoRA adapters (finetune.export.merge) on tiny random Llama models built here.

The references are transformers + peft themselves: a QLoRA model (4-bit base + adapter) for
merge_into=dequantized, a full-precision base + adapter for merge_into=original. Everything runs
in fp32 so that a 1e-4 tolerance means "same function" rather than "close enough".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runner import REPO

from finetune.adapter_format import QUANT_FILE
from finetune.export import merge
from finetune.export.merge import main, merge_adapter

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
QUANT_FP32 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "blocksize": 64,
    "torch_dtype": "float32",
}
# What training records by default: the base cast to bf16 before quantizing, bf16 compute.
QUANT_BF16 = dict(QUANT_FP32, torch_dtype="bfloat16", bnb_4bit_compute_dtype="bfloat16")
# Logits of the tiny models are O(1) (init std 0.1): 1e-4 is ~1e-4 relative.
FP32_TOL = 1e-4


# ----------------------------------------------------------------------------- builders


def build_tokenizer():
    """Byte-level BPE with ChatML specials, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "what is the capital of france", "a poem about the sea"]
    bpe.train_from_iterator(text * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_base(path: Path, *, seed: int = 0, max_shard_size: str = "40KB", arch: str = "llama", **sizes) -> Path:
    """A random model + tokenizer saved in HF format, in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    config = config_class(
        **{**TINY_LLAMA, **sizes},
        vocab_size=len(tokenizer),
        # Larger than the default 0.02 so logits are O(1) and differences mean something.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model_class(config).save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path


def load_4bit(base: Path, quant: dict):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=getattr(torch, quant["torch_dtype"]),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=quant["bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, quant["bnb_4bit_compute_dtype"]),
        ),
    )
    # bitsandbytes computes eval-mode CPU inference in bf16 on AVX512-BF16 machines, whatever the
    # compute dtype; the fp32 comparisons below need its exact dequantize-then-matmul path.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def build_adapter(base: Path, path: Path, *, quant: dict | None = QUANT_FP32, seed: int = 1, **lora) -> Path:
    """Train-free adapter: peft on the 4-bit base, LoRA weights set to random non-zero values."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora})
    model = get_peft_model(load_4bit(base, quant or QUANT_FP32), lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    if quant is not None:
        (path / QUANT_FILE).write_text(json.dumps(quant))
    return path


def run_merge(adapter: Path, output: Path, **options) -> Path:
    """merge_adapter as a Python call; verification off unless asked (tests compare themselves)."""
    return merge_adapter({"adapter": str(adapter), "output": str(output), "verify": False, **options})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def qlora_reference(base: Path, adapter: Path, quant: dict = QUANT_FP32):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_4bit(base, quant), adapter)


def full_precision_reference(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)


def load_merged(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def leftovers(output: Path) -> list[str]:
    """Anything a merge into `output` left behind: the output or a (hidden) partial/replaced directory."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.removeprefix(".").startswith(output.name))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: thread hand-offs cost more than the math. On a 2-core VM, two OpenMP threads
    made every small op take ~20 ms instead of ~10 us (spin-waiting on a starved core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter(base, tmp_path_factory) -> Path:
    """All-linear LoRA + a trained lm_head copy (modules_to_save), fp32 training quantization."""
    return build_adapter(base, tmp_path_factory.mktemp("adapter") / "lora", modules_to_save=["lm_head"])


@pytest.fixture(scope="session")
def bf16_adapter(base, tmp_path_factory) -> Path:
    """All-linear LoRA trained the default way over the float32 base: bf16 weights and compute."""
    return build_adapter(base, tmp_path_factory.mktemp("bf16-adapter") / "lora", quant=QUANT_BF16)


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    return torch.randint(300, (2, 24), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- merge math


def test_dequantized_merge_reproduces_the_qlora_model(base, adapter, ids, tmp_path):
    out = run_merge(adapter, tmp_path / "merged", dtype="float32")

    reference = logits(qlora_reference(base, adapter), ids)
    merged = logits(load_merged(out), ids)
    assert (merged - reference).abs().max() < FP32_TOL
    # Not vacuous: the adapter moves the logits far more than the tolerance.
    from transformers import AutoModelForCausalLM

    assert (logits(AutoModelForCausalLM.from_pretrained(base), ids) - reference).abs().max() > 0.5

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "generation_config.json").is_file() and (out / "chat_template.jinja").is_file()
    assert json.loads((out / merge.MERGE_MARKER).read_text())["merge_into"] == "dequantized"


def test_original_merge_equals_full_precision_base_plus_adapter(base, adapter, ids, tmp_path):
    out = run_merge(adapter, tmp_path / "merged", merge_into="original", dtype="float32")
    from transformers import AutoModelForCausalLM

    merged = logits(load_merged(out), ids)
    assert (merged - logits(full_precision_reference(base, adapter), ids)).abs().max() < FP32_TOL

    # Against the model as trained (4-bit base + adapter), the only change is the base's NF4
    # error, so the gap should be about what that error does to the bare base's logits. The
    # adapter's weights (lora_B ~ 0.1, the same order as the base's) can amplify it somewhat:
    # allow twice. It must also be a real gap: the two merge bases are different models.
    plain_base = logits(AutoModelForCausalLM.from_pretrained(base), ids)
    quantization_effect = (plain_base - logits(load_4bit(base, QUANT_FP32), ids)).abs().max()
    gap = (merged - logits(qlora_reference(base, adapter), ids)).abs().max()
    assert 10 * FP32_TOL < gap < 2 * quantization_effect


def test_rslora_merge_and_untargeted_4bit_layers(base, ids, tmp_path):
    # Only q/v carry LoRA: k/o/mlp must still come out as dequant(NF4(W)), as the trained model had them.
    adapter = build_adapter(
        base, tmp_path / "rslora", use_rslora=True, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    out = run_merge(adapter, tmp_path / "merged", dtype="float32")
    assert (logits(load_merged(out), ids) - logits(qlora_reference(base, adapter), ids)).abs().max() < FP32_TOL


def test_rank_and_alpha_patterns(base, ids, tmp_path):
    adapter = build_adapter(base, tmp_path / "patterns", rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})
    out = run_merge(adapter, tmp_path / "merged", dtype="float32")
    assert (logits(load_merged(out), ids) - logits(qlora_reference(base, adapter), ids)).abs().max() < FP32_TOL


def test_dora_merges_match_peft(base, ids, tmp_path):
    adapter = build_adapter(base, tmp_path / "dora", use_dora=True)
    dequantized = run_merge(adapter, tmp_path / "deq", dtype="float32")
    original = run_merge(adapter, tmp_path / "orig", merge_into="original", dtype="float32")
    qlora, full_precision = qlora_reference(base, adapter), full_precision_reference(base, adapter)
    assert (logits(load_merged(dequantized), ids) - logits(qlora, ids)).abs().max() < FP32_TOL
    assert (logits(load_merged(original), ids) - logits(full_precision, ids)).abs().max() < FP32_TOL


def test_adapter_from_elsewhere_bf16_defaults_and_builtin_verify(base, tmp_path, capsys):
    """No finetune_quantization.json: assume the usual bf16 NF4 recipe, say so, and verify."""
    adapter = build_adapter(base, tmp_path / "plain-peft", quant=QUANT_BF16)
    (adapter / QUANT_FILE).unlink()
    out = merge_adapter({"adapter": str(adapter), "output": str(tmp_path / "merged")})  # verify: automatic
    printed = capsys.readouterr().out
    assert "assuming training quantized the base as NF4" in printed
    assert "verify: max |logit difference|" in printed and "top-1 agreement" in printed

    from safetensors import safe_open

    with safe_open(next(out.glob("model-*.safetensors")), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_failed_verification_exits_nonzero_and_leaves_nothing(base, adapter, tmp_path, monkeypatch, capsys):
    real = merge.merge_weight
    monkeypatch.setattr(merge, "merge_weight", lambda weight, lora: real(weight, lora) * 1.01)
    output = tmp_path / "merged"
    assert main([f"adapter={adapter}", f"output={output}", "dtype=float32", "verify=true"]) == 3
    assert "logits differ" in capsys.readouterr().err
    assert leftovers(output) == []


def test_float32_merge_of_bf16_trained_adapter_verifies(base, bf16_adapter, tmp_path, capsys):
    """Issue 15: verification refused this correct merge. Its reference ran bitsandbytes' 4-bit
    matmul, which in fp32 skips the rounding to bf16 that training's dequantized weights had."""
    from transformers import AutoModelForCausalLM

    out = merge_adapter({"adapter": str(bf16_adapter), "output": str(tmp_path / "merged"), "dtype": "float32",
                         "verify": True})
    assert "verify: max |logit difference|" in capsys.readouterr().out

    # Training held the unquantized tensors in bf16; the merged model keeps exactly those values
    # (as float32 numbers), not the base's own float32 ones. (The random base's norms are all
    # ones, the same either way.)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    merged = load_merged(out).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], original[name].bfloat16().float()), name
        assert not torch.equal(merged[name], original[name]), name


def _delta_too_large(monkeypatch):
    real = merge.merge_weight
    monkeypatch.setattr(
        merge, "merge_weight", lambda weight, lora: real(weight, dataclasses.replace(lora, scaling=lora.scaling * 1.02))
    )


def _base_tensors_as_stored(monkeypatch):
    # The unquantized tensors as the checkpoint has them, not as training held them.
    real = merge.merged_tensor

    def merged_tensor(plan, name, tensor):
        return tensor if name.removesuffix(".weight") not in plan.quantized else real(plan, name, tensor)

    monkeypatch.setattr(merge, "merged_tensor", merged_tensor)


@pytest.mark.parametrize("corrupt", [_delta_too_large, _base_tensors_as_stored])
def test_verification_refuses_float32_merge_off_the_trained_model(bf16_adapter, tmp_path, monkeypatch, capsys,
                                                                   corrupt):
    corrupt(monkeypatch)
    output = tmp_path / "merged"
    assert main([f"adapter={bf16_adapter}", f"output={output}", "dtype=float32", "verify=true"]) == 3
    assert "logits differ" in capsys.readouterr().err
    assert leftovers(output) == []


# ----------------------------------------------------------------------------- streaming


def test_peak_memory_stays_near_two_shards(tmp_path):
    """Merge a ~40 MB model in 10 shards; peak RSS growth must be about two shards, not the model."""
    small = build_base(tmp_path / "small", max_shard_size="10MB")
    big = build_base(
        tmp_path / "big",
        max_shard_size="4MB",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    small_adapter = build_adapter(small, tmp_path / "small-adapter")
    big_adapter = build_adapter(big, tmp_path / "big-adapter")
    shards = sorted(big.glob("model-*.safetensors"))
    largest_shard = max(p.stat().st_size for p in shards)
    model_size = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 8

    # Peak RSS (VmHWM) is reset after a warm-up merge, so imports and one-off allocations do
    # not count: what remains is what merging the big model holds at once.
    script = textwrap.dedent(
        f"""
        import gc, json
        from finetune.export.merge import merge_adapter

        def status(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

        def run_merge(adapter, output):
            merge_adapter(dict(adapter=adapter, output=output, dtype="float32", verify=False))

        run_merge({str(small_adapter)!r}, {str(tmp_path / "warm")!r})
        gc.collect()
        baseline = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        run_merge({str(big_adapter)!r}, {str(tmp_path / "out")!r})
        print(json.dumps({{"baseline": baseline, "peak": status("VmHWM")}}))
        """
    )
    # A fixed mmap threshold makes glibc hand every freed tensor back to the OS at once, so RSS
    # follows the memory the merge holds rather than what the allocator chose to keep.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["baseline"]
    # One input shard (memory-mapped) + one output shard (fp32 in, fp32 out: the same size) + the
    # largest weight's fp32 temporaries (the weight, its NF4 round trip, the merged sum) + slack.
    largest_weight = 1024 * 512 * 4
    assert growth < 2 * largest_shard + 3 * largest_weight + 2 * 2**20, (growth, largest_shard, model_size)
    assert growth < model_size / 2


# ----------------------------------------------------------------------------- refusals


def test_refuses_base_with_other_shapes(adapter, tmp_path, capsys):
    other = build_base(tmp_path / "wider", intermediate_size=96)
    _assert_refused([f"adapter={adapter}", f"base={other}"], tmp_path, capsys, "shape mismatch at model.layers.0.mlp")


def test_refuses_base_of_another_architecture(adapter, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300)).save_pretrained(gpt2)
    message = "trained on a LlamaForCausalLM, but the base"
    _assert_refused([f"adapter={adapter}", f"base={gpt2}"], tmp_path, capsys, message)

    # Adapters saved with a task_type do not record the base's class: the module names tell.
    untyped = tmp_path / "untyped"
    shutil.copytree(adapter, untyped)
    config = json.loads((untyped / "adapter_config.json").read_text())
    config.update(auto_mapping=None, task_type="CAUSAL_LM")
    (untyped / "adapter_config.json").write_text(json.dumps(config))
    _assert_refused([f"adapter={untyped}", f"base={gpt2}"], tmp_path, capsys, "(GPT2LMHeadModel) does not have")


def test_refuses_nan_in_merged_tensor(adapter, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    _assert_refused([f"adapter={broken}"], tmp_path, capsys, "model.layers.1.mlp.up_proj.weight contains NaN")


def test_refuses_existing_output_and_keeps_it(adapter, tmp_path, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    for overwrite in ("false", "true"):
        assert main([f"adapter={adapter}", f"output={output}", f"overwrite={overwrite}"]) == 2
        assert "overwrite=true" in capsys.readouterr().err
        assert leftovers(output) == ["merged"] and (output / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_an_earlier_merge(adapter, tmp_path):
    output = tmp_path / "merged"
    run_merge(adapter, output, dtype="float32")
    run_merge(adapter, output, dtype="float16", overwrite=True)
    assert json.loads((output / "config.json").read_text())["dtype"] == "float16"
    assert leftovers(output) == ["merged"]


def test_refuses_missing_adapter(tmp_path, capsys):
    _assert_refused([f"adapter={tmp_path / 'nope'}"], tmp_path, capsys, "does not exist")


def test_refuses_hub_base_offline(adapter, tmp_path, capsys):
    hub = tmp_path / "hub-adapter"
    shutil.copytree(adapter, hub)
    config = json.loads((hub / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (hub / "adapter_config.json").write_text(json.dumps(config))
    _assert_refused([f"adapter={hub}"], tmp_path, capsys, "'meta-llama/Llama-3.2-1B' is not a local directory")


def test_refuses_embedding_lora(base, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora_config = LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config)
    model.save_pretrained(tmp_path / "embedding-lora")
    _assert_refused([f"adapter={tmp_path / 'embedding-lora'}"], tmp_path, capsys, "LoRA on an embedding layer")


@pytest.mark.parametrize(
    "option, message",
    [
        ("colour=blue", "bad option 'colour'"),
        ("verify=maybe", "bad option 'verify'"),
        ("dtype=int8", "bad option 'dtype'"),
        ("oops", "expected key=value"),
        ("gguf_type=q8_0", "gguf_type applies to format=gguf only"),
    ],
)
def test_refuses_bad_options(adapter, tmp_path, capsys, option, message):
    _assert_refused([f"adapter={adapter}", option], tmp_path, capsys, message)


def test_missing_required_option(capsys):
    assert main(["adapter=somewhere"]) == 2
    assert "missing required option output=" in capsys.readouterr().err


def _assert_refused(args: list[str], tmp_path: Path, capsys, message: str) -> None:
    output = tmp_path / "refused-output"
    assert main([*args, f"output={output}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert leftovers(output) == []


# ----------------------------------------------------------------------------- command line


def test_command_line(adapter, tmp_path):
    output = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "merge_adapter.py"), f"adapter={adapter}", f"output={output}"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "verify: max |logit difference|" in result.stdout
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        merge.MERGE_MARKER,
    }
    assert expected <= {p.name for p in output.iterdir()}
    assert leftovers(output) == ["merged"]
