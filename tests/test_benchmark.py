"""finetune-eval: lm-evaluation-harness on a trained adapter against its base, offline, on a local task."""

import contextlib
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from finetune import benchmark
from finetune.demo import ENTITIES, RELATIONS, SYSTEM_PROMPT, demo_conversations
from finetune.lm_eval_model import FinetuneLM

from runner import REPO
from test_native import checkpoints  # noqa: F401  (the fixture, shared with tests/models)
from test_native import copy_lora_from_peft, generic_model, native_model, random_ids, randomize_lora_B

TASKS = "demo_facts,demo_facts_gen"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The demo's held-out questions (phrasings never trained on) as two lm_eval tasks: a choice among
    the twelve answers of the question's relation, scored by log-likelihood, and the greedy answer,
    scored by exact match."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = []
    for conversation in demo_conversations()[1]:
        question, answer = conversation["messages"][1]["content"], conversation["messages"][2]["content"]
        relation = next(i for i in range(len(RELATIONS)) if answer in {facts[i] for facts in ENTITIES.values()})
        choices = [facts[relation] for facts in ENTITIES.values()]
        rows.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    (folder / "demo_facts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "demo_facts.jsonl"}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
    # target_delimiter "": the answer follows the chat template's "assistant\n" directly, as in training.
    (folder / "demo_facts.yaml").write_text(f"""task: demo_facts
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "demo_facts_gen.yaml").write_text(f"""task: demo_facts_gen
{common}output_type: generate_until
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def demo_adapter(demo_run):
    """The demo recipe's adapter (conftest's run, shared): it picks held-out answers far above chance
    (at 150 of its 300 steps already 42% against the base's 6%)."""
    return demo_run[0] / "adapter"


def run_eval(*args: str) -> tuple[int, str, str]:
    """finetune-eval in this process (lm_eval's task index is built once per process): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("HF_HUB_OFFLINE", "1")
        code = benchmark.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def adapter_report(demo_adapter, task_dir):
    """One finetune-eval run of the demo adapter: (stdout, results file)."""
    code, out, err = run_eval(f"adapter={demo_adapter}", f"tasks={TASKS}", f"include_path={task_dir}",
                              "apply_chat_template=true", f"system_instruction={SYSTEM_PROMPT}")
    assert code == 0, err
    files = list((demo_adapter.parent / "eval").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    return out, files[0]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_adapter_beats_its_base(adapter_report):
    _, path = adapter_report
    report = json.loads(path.read_text())
    base, adapter = (report["runs"][label]["results"] for label in ("base", "adapter"))
    # Twelve choices: chance is 1/12. The base is random; the adapter learned the facts.
    assert adapter["demo_facts"]["acc,none"] >= base["demo_facts"]["acc,none"] + 0.2
    assert adapter["demo_facts_gen"]["exact_match,none"] > base["demo_facts_gen"]["exact_match,none"]
    assert report["runs"]["base"]["n-samples"]["demo_facts"]["effective"] == 36


@pytest.mark.slow
def test_results_json_records_both_runs_the_options_and_versions(adapter_report, demo_adapter, demo_base):
    _, path = adapter_report
    report = json.loads(path.read_text())
    assert path.parent == demo_adapter.parent / "eval"
    assert report["config"]["tasks"] == TASKS and report["config"]["adapter"] == str(demo_adapter)
    assert report["config"]["base_model"] == str(demo_base) and report["config"]["max_length"] == 512
    assert report["config"]["apply_chat_template"] is True
    assert report["versions"]["lm_eval"] == "0.4.13" and report["versions"]["torch"] == torch.__version__
    rows = {(row["task"], row["metric"]): row for row in report["table"]}
    assert set(rows) == {("demo_facts", "acc"), ("demo_facts_gen", "exact_match")}
    for (task, metric), row in rows.items():
        base, adapter = (report["runs"][label]["results"][task][f"{metric},none"] for label in ("base", "adapter"))
        assert (row["base"], row["adapter"]) == (base, adapter)
        assert row["delta"] == pytest.approx(adapter - base)


@pytest.mark.slow
def test_table_shows_each_metric_for_base_adapter_and_delta(adapter_report):
    stdout, path = adapter_report
    table = {row["task"]: row for row in json.loads(path.read_text())["table"]}
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["task", "metric", "base", "adapter", "delta"])
    body = [line.split() for line in lines[header + 2:header + 4]]
    for task, metric, base, adapter, delta in body:
        row = table[task]
        assert metric == row["metric"]
        assert (float(base), float(adapter), float(delta)) == pytest.approx(
            (row["base"], row["adapter"], row["delta"]), abs=1e-4)
    assert f"results: {path}" in stdout


@pytest.mark.slow
def test_merged_model_scores_as_the_adapter_did(adapter_report, demo_adapter, task_dir, tmp_path):
    from finetune.export.merge import merge_adapter

    merged = tmp_path / "merged"
    merge_adapter({"adapter": str(demo_adapter), "output": str(merged), "dtype": "float32", "verify": False})
    code, out, err = run_eval(f"model={merged}", "tasks=demo_facts", f"include_path={task_dir}",
                              "apply_chat_template=true", f"system_instruction={SYSTEM_PROMPT}",
                              f"output={tmp_path / 'results'}")
    assert code == 0, err
    (path,) = (tmp_path / "results").iterdir()
    report = json.loads(path.read_text())
    assert list(report["runs"]) == ["model"] and [row.keys() for row in report["table"]] == [
        {"task", "metric", "model"}]
    adapter_run = json.loads(adapter_report[1].read_text())["runs"]["adapter"]["results"]
    # The merge reproduces the trained model; log-likelihoods differ by rounding only, far from flipping
    # more than a near-tie.
    assert abs(report["runs"]["model"]["results"]["demo_facts"]["acc,none"]
               - adapter_run["demo_facts"]["acc,none"]) <= 1 / 36
    assert ["task", "metric", "model"] in [line.split() for line in out.splitlines()]


# ----------------------------------------------------------------------------- the lm_eval model


@pytest.fixture(scope="module")
def base_lm(demo_base):
    """FinetuneLM over the plain fp32 demo base (any transformers causal LM will do)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_base, dtype=torch.float32).eval()
    return FinetuneLM(model, AutoTokenizer.from_pretrained(demo_base), max_length=512, batch_size=3)


def reference_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one unpadded forward: the definition, token by token."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    total, greedy = 0.0, True
    for offset, token in enumerate(continuation):
        position = len(context) + offset - 1  # the logits there predict this token
        total += logprobs[position, token].item()
        greedy &= int(logprobs[position].argmax()) == token
    return total, greedy


def test_loglikelihood_equals_one_forward_per_request(base_lm):
    contexts = ["What colour is the cat?", "Name the owl's home. It is the", "Tell me", "A"]
    continuations = [" black", " tree", " the sound of a duck.", "B"]
    requests = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(zip(contexts, continuations))]
    # Batches of three, longest first, right-padded: different neighbours than one request alone.
    got = base_lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(zip(contexts, continuations), got):
        whole = base_lm.tok_encode(context + continuation)
        context_ids = base_lm.tok_encode(context)
        want, want_greedy = reference_logprob(base_lm.model, context_ids, whole[len(context_ids):])
        assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_both_model_paths_give_the_same_loglikelihoods(checkpoints):
    """The native decoder and peft over transformers, same NF4 base and LoRA weights, through FinetuneLM."""
    model_dir = checkpoints("llama")
    generic = generic_model(model_dir).eval()
    randomize_lora_B(generic, seed=3)
    native = native_model(model_dir).eval()
    copy_lora_from_peft(generic, native)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    ids = random_ids(1, 60, seed=4)[0].tolist()
    # Different context and continuation lengths, so batches are right-padded.
    requests = [(None, ids[:n], ids[n:n + k]) for n, k in ((5, 3), (40, 10), (12, 1), (50, 2), (2, 30))]
    def logprobs(model) -> list[float]:
        return [logprob for logprob, _ in FinetuneLM(model, tokenizer, 256, 2)._loglikelihood_tokens(requests)]

    # test_native's bound for the two paths' logits: fp32 both, sums taken in another order.
    assert logprobs(native) == pytest.approx(logprobs(generic), rel=1e-3)


def test_a_greedy_continuation_is_reported_greedy(base_lm):
    context = base_lm.tok_encode("Where does the frog live?")
    with torch.no_grad():
        token = int(base_lm.model(torch.tensor([context])).logits[0, -1].argmax())
    ((_, greedy),) = base_lm._loglikelihood_tokens([(None, context, [token])])
    ((_, not_greedy),) = base_lm._loglikelihood_tokens([(None, context, [(token + 1) % 500])])
    assert greedy and not not_greedy


def test_rolling_loglikelihood_scores_every_token_once(base_lm, demo_base):
    text = "What sound does the cow make? moo. Where does the bee live? hive. " * 3
    tokens = base_lm.tok_encode(text, add_special_tokens=False)
    (whole,) = base_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert whole == pytest.approx(reference_logprob(base_lm.model, [base_lm.prefix_token_id], tokens)[0], abs=1e-3)
    # A context shorter than the text: lm_eval's windows, each scored on its own.
    short = FinetuneLM(base_lm.model, base_lm.tokenizer, max_length=16, batch_size=4)
    (windowed,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, short.prefix_token_id, 16, 1)]
    assert len(windows) > 3
    assert windowed == pytest.approx(sum(reference_logprob(base_lm.model, c, x)[0] for c, x in windows), abs=1e-3)


def test_generate_until_matches_each_prompt_alone_cut_at_the_stop_string(base_lm):
    prompts = ["What colour is the cat?", "Name the owl's home, please, and then the sound of the cow.", "Tell"]
    settings = {"until": ["e"], "max_gen_toks": 5, "do_sample": False}
    got = base_lm.generate_until([Instance("generate_until", {}, (p, settings), i) for i, p in enumerate(prompts)])
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([base_lm.tok_encode(prompt)])
        with torch.no_grad():
            alone = base_lm.model.generate(ids, max_new_tokens=5, do_sample=False,
                                           pad_token_id=base_lm.tokenizer.pad_token_id)
        full = base_lm.tokenizer.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)
        assert text == full.split("e")[0]
    assert any(text != "" for text in got)


# ----------------------------------------------------------------------------- results files


def test_results_never_overwrite_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark.time, "strftime", lambda *_: "20270101-000000")
    (tmp_path / "20270101-000000.json").write_text("earlier")
    first = benchmark.save_results(tmp_path, {"run": 1})
    second = benchmark.save_results(tmp_path, {"run": 2})
    assert (first.name, second.name) == ("20270101-000000-2.json", "20270101-000000-3.json")
    assert (tmp_path / "20270101-000000.json").read_text() == "earlier"
    assert json.loads(first.read_text()) == {"run": 1} and json.loads(second.read_text()) == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "20270101-000000-2.json", "20270101-000000-3.json", "20270101-000000.json"]  # no staging files left


def test_a_checkpoints_results_go_to_its_run(tmp_path):
    config = benchmark.BenchmarkConfig(tasks="x", adapter="unused")
    assert benchmark.results_dir(config, tmp_path / "run" / "checkpoints" / "step-100") == tmp_path / "run" / "eval"
    assert benchmark.results_dir(config, tmp_path / "run" / "adapter") == tmp_path / "run" / "eval"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["adapter=/nonexistent/adapter", "tasks=demo_facts"], "adapter directory /nonexistent/adapter does not exist"),
    (["tasks=demo_facts"], "pass exactly one of adapter=PATH or model=PATH"),
    (["adapter=a", "model=b", "tasks=demo_facts"], "pass exactly one of adapter=PATH or model=PATH"),
    (["adapter=a"], "missing required option tasks=..."),
    (["adapter=a", "tasks=x", "batch_size=many"], "bad option 'batch_size'"),
    (["adapter=a", "tasks=x", "limit=0"], "limit=0: it must be at least 1"),
    (["adapter=a", "tasks=x", "device=tpu"], "bad option 'device'"),
    (["adapter=a", "tasks=x", "--limit", "3"], "expected key=value, got '--limit'"),
])
def test_bad_options_get_one_clear_message(args, message):
    code, out, err = run_eval(*args)
    assert code == 2 and out == ""
    assert err.startswith("finetune-eval: error: ") and message in err.splitlines()[0]


def test_a_model_path_that_is_no_model(tmp_path):
    code, _, err = run_eval(f"model={tmp_path}", "tasks=demo_facts")
    assert code == 2 and err.strip() == (f"finetune-eval: error: model={tmp_path}: {tmp_path} is not a model directory "
                                         "(it has no config.json); pass a merged model (finetune-merge's output), "
                                         "or adapter=PATH for an adapter")


@pytest.mark.slow
def test_unknown_task_names_get_lm_evals_hint(demo_adapter, task_dir):
    code, _, err = run_eval(f"adapter={demo_adapter}", "tasks=demo_fact,demo_facts_gen,no_such_task",
                            f"include_path={task_dir}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown tasks demo_fact, no_such_task (did you mean " in err and "demo_facts" in err
    assert "`lm-eval ls tasks` lists the names" in err and "include_path=DIR" in err


@pytest.mark.slow
def test_a_task_that_needs_a_download_fails_offline_naming_the_fix(demo_adapter, tmp_path):
    # The real command in a fresh process: no hub access unless the user allows it.
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    results = demo_adapter.parent / "eval"
    before = sorted(results.iterdir()) if results.exists() else []
    result = subprocess.run([sys.executable, "-m", "finetune.benchmark", f"adapter={demo_adapter}", "tasks=arc_easy"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune-eval: error: task 'arc_easy' could not load its data (")
    assert "include_path=DIR" in last and "HF_HUB_OFFLINE=0" in last
    assert "Retrying" not in result.stderr  # offline: no attempt to reach the hub
    assert (sorted(results.iterdir()) if results.exists() else []) == before
