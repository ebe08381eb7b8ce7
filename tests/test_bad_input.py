"""The bad-input catalogue: each mistake gets one clear line, exit code 2, no traceback, nothing written.

Every case runs the real CLI, as a user would meet it.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

from runner import REPO, run_train

FAST = ["train.max_steps=1", "train.eval_generate=0", "train.sample_prompts=[]"]


def chat(user="hi", assistant="hello"):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def data_path(tmp_path, text: str | bytes) -> str:
    return f"data.path={write(tmp_path / 'd.jsonl', text)}"


def encoder_decoder_dir(tmp_path):
    from transformers import T5Config

    directory = tmp_path / "t5"
    T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2).save_pretrained(directory)
    return directory


def small_vocabulary_model_dir(tmp_path):
    """A model whose 20 embeddings are far fewer than the ids the demo tokenizer beside it produces."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.demo import build_tokenizer

    directory = tmp_path / "small-vocabulary"
    LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


# (id, overrides built from tmp_path, text the message must contain)
CASES = [
    ("unknown-key-with-suggestion", lambda t: ["lora.rnk=8"], "Did you mean lora.r?"),
    ("unknown-group-key", lambda t: ["trian.max_steps=3"], "Did you mean train?"),
    ("appended-unknown-key", lambda t: ["+lora.rank=3"], "unknown config key 'lora.rank'"),
    ("wrong-type", lambda t: ["lora.r=big"], "bad value for lora.r"),
    ("choice-outside-enum", lambda t: ["optim.name=sgd"], "expected one of [adamw, paged_adamw_8bit]"),
    ("unknown-recipe", lambda t: ["recipe=llama9"], "Known recipes: demo"),
    ("negative-lr", lambda t: ["optim.lr=-1e-4"], "optim.lr must be positive"),
    ("zero-rank", lambda t: ["lora.r=0"], "lora.r must be a positive integer"),
    ("zero-micro-batch", lambda t: ["train.micro_batch_size=0"], "train.micro_batch_size must be a positive"),
    ("dropout-out-of-range", lambda t: ["lora.lora_dropout=1.5"], "lora.lora_dropout must be in [0, 1)"),
    ("missing-data-path", lambda t: ["recipe=llama3_8b_qlora"], "data.path"),
    ("seq-above-model-max", lambda t: ["data.max_seq_len=4096"], "exceeds the model's maximum sequence length"),
    ("missing-model-dir", lambda t: [f"model.name_or_path={t / 'no-model'}"], "no such directory"),
    ("gguf-model-file", lambda t: [f"model.name_or_path={write(t / 'model.Q4_K_M.gguf', b'GGUF')}"],
     "is a GGUF file"),
    ("model-path-is-a-file", lambda t: [f"model.name_or_path={write(t / 'config.json', '{}')}"],
     "is a file, not a model directory"),
    ("hub-id-offline", lambda t: ["model.name_or_path=nobody-here/missing-model"], "not in the Hugging Face cache"),
    ("not-a-causal-lm", lambda t: [f"model.name_or_path={encoder_decoder_dir(t)}"], "not a causal language model"),
    ("target-modules-match-nothing", lambda t: ["lora.target_modules=[no_such_proj]"], "lora.target_modules"),
    ("paged-optimizer-without-gpu", lambda t: ["optim.name=paged_adamw_8bit"], "needs a CUDA GPU"),
    ("cuda-device-without-gpu", lambda t: ["train.device=cuda"], "no CUDA GPU is visible"),
    ("malformed-jsonl-line", lambda t: [data_path(t, chat() + "\n{oops\n")], "d.jsonl:2"),
    ("missing-column", lambda t: [data_path(t, json.dumps({"text": "x"}) + "\n")], "messages"),
    ("empty-file", lambda t: [data_path(t, "")], "d.jsonl"),
    ("unknown-role", lambda t: [data_path(t, json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")],
     "robot"),
    ("non-utf8-text", lambda t: [data_path(t, chat().encode() + b'\n{"messages": "\xff\xfe"}\n')], "UTF-8"),
    ("all-samples-masked", lambda t: [data_path(t, "".join(
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n" for _ in range(5)))],
     "no token to train on"),
    ("missing-data-file", lambda t: [f"data.path={t / 'absent.jsonl'}"], "absent.jsonl"),
    ("eval-fraction-out-of-range", lambda t: ["data.eval_fraction=1.5"], "data.eval_fraction"),
    ("output-dir-is-a-file", lambda t: [f"output_dir={write(t / 'afile', 'x')}"], "afile"),
    ("preference-objective-on-chat-data", lambda t: ["objective=dpo"],
     "objective=dpo trains on data.format=preference"),
    ("non-positive-beta", lambda t: ["objective=simpo", "objective.beta=0"], "objective.beta must be positive"),
    ("missing-start-adapter", lambda t: [f"model.adapter={t / 'no-adapter'}"], "does not exist"),
    ("token-ids-beyond-the-model-vocabulary", lambda t: [f"model.name_or_path={small_vocabulary_model_dir(t)}"],
     "the tokenizer is not the model's"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [pytest.param(o, e, id=i) for i, o, e in CASES])
def test_bad_input_gets_one_clear_line_and_exit_2(tmp_path, overrides, expected):
    args = overrides(tmp_path)
    out = tmp_path / "out"
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={out}")
    result = run_train(*args, *FAST)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_machine_rules_are_checked_before_anything_loads(tmp_path):
    result = run_train("optim.name=paged_adamw_8bit", f"output_dir={tmp_path / 'out'}", *FAST)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
    # Neither the model line nor the data report: the refusal came before loading either.
    assert "model:" not in result.stdout and "data " not in result.stdout, result.stdout


@pytest.mark.slow
def test_data_is_checked_before_the_weights_load(tmp_path):
    """A bad data line stops the run before the model's weights are read (minutes for a large base)."""
    result = run_train(data_path(tmp_path, chat() + "\n{oops\n"), f"output_dir={tmp_path / 'out'}", *FAST)
    assert result.returncode == 2 and "d.jsonl:2" in result.stderr
    assert "model:" not in result.stdout, result.stdout


@pytest.mark.slow
def test_unwritable_output_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip(reason="root can write to read-only directories, so the case cannot arise")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    result = run_train(f"output_dir={locked / 'run'}", *FAST)
    assert result.returncode == 2 and "not writable" in result.stderr


@pytest.mark.slow
def test_disk_full_while_saving_leaves_no_partial_checkpoint(tmp_path):
    # Simulate ENOSPC inside the checkpoint writer of a real run.
    script = (
        "import errno, sys, torch\n"
        "import finetune.training.checkpoint as c\n"
        "real = torch.save\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "c.torch.save = full\n"
        "from finetune.cli import main\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "main()\n"
    )
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", script, f"output_dir={out}", "train.max_steps=2",
                             "train.save_every=1", "train.eval_generate=0", "train.sample_prompts=[]"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    assert leftovers == []


@pytest.mark.slow
def test_merge_refuses_an_adapter_for_a_different_base(tmp_path):
    from test_merge import build_base  # the merge suite's own tiny-model builder

    adapter = tmp_path / "run"
    assert run_train(f"output_dir={adapter}", *FAST).returncode == 0
    other = build_base(tmp_path / "other-base")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "merge_adapter.py"),
                             f"adapter={adapter / 'adapter'}", f"base={other}", f"output={tmp_path / 'merged'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "merged").exists()
