"""finetune-chat driven through a pseudo-terminal, and `finetune.load` of the same adapter on both
model paths and merged, on an adapter the demo recipe trains here."""

import json
import shutil
import sys

import pexpect
import pytest

import finetune
from finetune.demo import SYSTEM_PROMPT
from finetune.export.merge import merge_adapter
from runner import REPO

QUESTIONS = ["Where does the frog live?", "What sound does the owl make?"]


@pytest.fixture(scope="module")
def demo_adapter(demo_run):
    """The demo recipe's adapter (conftest's run, shared): what it answers is beside the point here,
    only that chat and load answer as the in-process API does."""
    return demo_run[0] / "adapter"


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def words(text: str) -> str:
    return " ".join(text.split())  # a terminal turns line ends into \r\n


@pytest.fixture(scope="module")
def expected(demo_adapter):
    """Greedy replies of the API (native path) to each question, alone and after the first."""
    model, tokenizer = finetune.load(demo_adapter, device="cpu")
    first = finetune.generate(model, tokenizer, conversation(QUESTIONS[0]), max_new_tokens=8)
    second = finetune.generate(model, tokenizer, conversation(QUESTIONS[0]) + [
        {"role": "assistant", "content": first}, {"role": "user", "content": QUESTIONS[1]}], max_new_tokens=8)
    return words(first), words(second)


@pytest.fixture(scope="module")
def merged(demo_adapter, tmp_path_factory):
    # float32 and into the weights training saw: the merged model computes what the adapter did.
    return merge_adapter({"adapter": str(demo_adapter), "output": str(tmp_path_factory.mktemp("merged") / "m"),
                          "dtype": "float32", "verify": False})


def spawn_chat(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "finetune.chat", *args], cwd=str(REPO), encoding="utf-8",
                         timeout=300)


def ask(chat: pexpect.spawn, line: str) -> str:
    chat.sendline(line)
    chat.expect("\n> ")
    return chat.before.replace("\r", "").split("\n", 1)[1].strip()  # past the echoed line


@pytest.mark.slow
def test_chat_answers_turn_after_turn_and_takes_commands(demo_adapter, expected):
    chat = spawn_chat(f"adapter={demo_adapter}", "temperature=0", "max_new_tokens=8", f"system={SYSTEM_PROMPT}")
    chat.expect("/exit or Ctrl-D quits.")
    chat.expect("> ")
    # The second answer depends on the first turn: the history goes with it.
    assert [words(ask(chat, q)) for q in QUESTIONS] == list(expected)
    assert ask(chat, "/reset") == "(conversation cleared)"
    assert words(ask(chat, QUESTIONS[0])) == expected[0]
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


@pytest.mark.slow
def test_chat_with_a_merged_model_and_sampling_flags_ends_on_ctrl_d(merged, expected):
    # A near-zero temperature with top-k/top-p still picks the most likely token here.
    chat = spawn_chat(f"model={merged}", "temperature=0.0001", "top_k=5", "top_p=0.9", "seed=3",
                      "max_new_tokens=8", f"system={SYSTEM_PROMPT}")
    chat.expect("> ")
    assert words(ask(chat, QUESTIONS[0])) == expected[0]
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


@pytest.mark.slow
def test_chat_errors_are_one_line(demo_adapter, tmp_path, capsys):
    from finetune.chat import main as chat_main

    orphan = tmp_path / "orphan"
    shutil.copytree(demo_adapter, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    cases = {
        (f"adapter={tmp_path / 'missing'}",): f"adapter={tmp_path / 'missing'}: the directory does not exist",
        (f"model={tmp_path / 'missing'}",): f"model={tmp_path / 'missing'}: the directory does not exist",
        (f"adapter={orphan}",): "is not a local model directory",
        (): "exactly one of adapter=PATH",
        (f"adapter={demo_adapter}", "temperature=-1"): "temperature",
        (f"adapter={demo_adapter}", "top_p"): "expected key=value",
    }
    # The command's own main, in this process: a process per case cost ~6 s of imports each (the
    # tests above start the real command).
    for args, message in cases.items():
        code = chat_main(list(args))
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
        assert lines[0].startswith("finetune-chat: error: ")


@pytest.mark.slow
def test_load_gives_the_same_replies_on_both_paths_and_merged(demo_adapter, merged):
    from finetune.models.native import NativeCausalLM

    replies = []
    for path, impl in ((demo_adapter, "native"), (demo_adapter, "hf"), (merged, "auto")):
        model, tokenizer = finetune.load(path, device="cpu", impl=impl)
        assert isinstance(model, NativeCausalLM) == (impl == "native")
        replies.append([finetune.generate(model, tokenizer, conversation(q), max_new_tokens=8) for q in QUESTIONS])
    assert replies[0] == replies[1] == replies[2]
    assert any(replies[0])
