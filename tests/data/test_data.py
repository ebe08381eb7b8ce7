"""The data pipeline on a known tokenizer: every format and masking mode token by token, sources,
mixing, splits, length policies, the cache, and every kind of bad input."""

import itertools
import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config import DataColumns, DataConfig, DataFormat, DataSource, LossOn, Truncation
from finetune.data import IGNORE_INDEX, DataError, load_splits, preview
from finetune.data.formats import CHATML, ROLES
from finetune.data.tokenization import TokenSettings, tokenize_rows, tokenizer_fingerprint
from finetune.demo import build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Colour of the cat?"},
    {"role": "assistant", "content": "black"},
    {"role": "tool", "content": "lookup: dog=brown"},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "brown"},
]
PREFIX = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nColour of the cat?<|im_end|>\n"
          "<|im_start|>assistant\n")
MIDDLE = ("\n<|im_start|>tool\nlookup: dog=brown<|im_end|>\n<|im_start|>user\nAnd the dog?<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tokenizer():
    """The demo's byte-level BPE: special tokens <|im_start|>, <|im_end|> (EOS), and a ChatML template."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The same vocabulary without a chat template, and with an EOS that is not ChatML's <|im_end|>."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(tmp_path, rows, tokenizer, **data):
    """Train samples in file order: the file is also its own eval set, so nothing is shuffled out."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = DataConfig(path=str(path), eval_path=str(path), num_proc=1, **data)
    train, _, lines = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    return train, lines


def segments(sample, tokenizer):
    """The sample as (text, trained) runs of consecutive tokens; a trained token's label is its own id."""
    trained = [label != IGNORE_INDEX for label in sample.labels]
    assert all(label == token for label, token, t in zip(sample.labels, sample.input_ids, trained) if t)
    runs, position = [], 0
    for is_trained, group in itertools.groupby(trained):
        count = len(list(group))
        runs.append((tokenizer.decode(sample.input_ids[position:position + count]), is_trained))
        position += count
    return runs


# ---- formats and masking, token by token ----

def test_chat_trains_every_assistant_turn_through_its_eos(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"messages": CHAT}], tokenizer)
    assert segments(train[0], tokenizer) == [
        (PREFIX, False), ("black<|im_end|>", True), (MIDDLE, False), ("brown<|im_end|>", True), ("\n", False)]
    assert train[0].labels[-2] == tokenizer.eos_token_id


def test_loss_on_last_assistant_turn(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"messages": CHAT}], tokenizer, loss_on=LossOn.last_assistant)
    assert segments(train[0], tokenizer) == [
        (PREFIX + "black<|im_end|>" + MIDDLE, False), ("brown<|im_end|>", True), ("\n", False)]


def test_loss_on_all_turns(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"messages": CHAT[:3]}], tokenizer, loss_on=LossOn.all_turns)
    assert segments(train[0], tokenizer) == [
        ("<|im_start|>system\nBe brief.<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nColour of the cat?<|im_end|>", True), ("\n", False),
        ("<|im_start|>assistant\nblack<|im_end|>", True), ("\n", False)]


def test_loss_on_everything(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"messages": CHAT[:3]}], tokenizer, loss_on=LossOn.everything)
    assert segments(train[0], tokenizer) == [(PREFIX + "black<|im_end|>\n", True)]


def test_instruction_format_renders_a_user_assistant_exchange(tmp_path, tokenizer):
    rows = [{"instruction": "Name the colour.", "input": "cat", "output": "black"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    train, _ = load(tmp_path, rows, tokenizer, format=DataFormat.instruction)
    assert segments(train[0], tokenizer) == [
        ("<|im_start|>user\nName the colour.\n\ncat<|im_end|>\n<|im_start|>assistant\n", False),
        ("black<|im_end|>", True), ("\n", False)]
    assert segments(train[1], tokenizer)[0] == ("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", False)
    assert train[0].messages == [{"role": "user", "content": "Name the colour.\n\ncat"},
                                 {"role": "assistant", "content": "black"}]


def test_prompt_completion_trains_the_completion_and_an_appended_eos(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"prompt": "Q: cat colour? A:", "completion": " black"}], tokenizer,
                    format=DataFormat.prompt_completion)
    assert segments(train[0], tokenizer) == [("Q: cat colour? A:", False), (" black<|im_end|>", True)]


def test_text_format_trains_every_token_and_an_appended_eos(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"text": "The cat is black."}], tokenizer, format=DataFormat.text)
    assert segments(train[0], tokenizer) == [("The cat is black.<|im_end|>", True)]


def test_fallback_template_for_a_tokenizer_without_one_adds_its_eos(tmp_path, plain_tokenizer):
    train, _ = load(tmp_path, [{"messages": CHAT[1:3]}], plain_tokenizer)
    # ChatML, plus the tokenizer's own EOS after each answer: the model must learn to stop.
    assert segments(train[0], plain_tokenizer) == [
        ("<|im_start|>user\nColour of the cat?<|im_end|>\n<|im_start|>assistant\n", False),
        ("black<|im_end|><|endoftext|>", True), ("\n", False)]


def test_chat_template_can_be_a_jinja_string(tmp_path, plain_tokenizer):
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    train, _ = load(tmp_path, [{"messages": CHAT[1:3]}], plain_tokenizer, chat_template=template)
    assert segments(train[0], plain_tokenizer) == [("user: Colour of the cat?\nassistant: ", False),
                                                   ("black\n", True)]


def test_unknown_template_name_is_a_data_error(tmp_path, plain_tokenizer):
    with pytest.raises(DataError, match="data.chat_template='vicuna'"):
        load(tmp_path, [{"messages": CHAT[1:3]}], plain_tokenizer, chat_template="vicuna")


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, plain_tokenizer):
    # Puts the turn count first, so no partial rendering is a prefix of the whole.
    template = "{{ messages | length }}" + CHATML
    with pytest.raises(DataError, match="incrementally"):
        load(tmp_path, [{"messages": CHAT[1:3]}], plain_tokenizer, chat_template=template)


def test_columns_are_mapped_by_name(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"conversations": CHAT[1:3], "id": 7}], tokenizer,
                    columns=DataColumns(messages="conversations"))
    assert segments(train[0], tokenizer)[1] == ("black<|im_end|>", True)


@pytest.mark.parametrize("user, assistant", [("human", "gpt"), ("user", "assistant")])
def test_sharegpt_conversations_train_like_messages(tmp_path, tokenizer, user, assistant):
    speakers = {"system": "system", "user": user, "assistant": assistant, "tool": "tool"}
    sharegpt = [{"from": speakers[m["role"]], "value": m["content"]} for m in CHAT]
    train, _ = load(tmp_path, [{"conversations": sharegpt}], tokenizer, columns=DataColumns(messages="conversations"))
    assert segments(train[0], tokenizer) == [
        (PREFIX, False), ("black<|im_end|>", True), (MIDDLE, False), ("brown<|im_end|>", True), ("\n", False)]
    assert train[0].messages == CHAT  # what generation-based evaluation replays


def test_openai_content_parts_are_joined_with_newlines(tmp_path, tokenizer):
    question = [{"type": "text", "text": "Colour of"}, {"type": "text", "text": "the cat?"}]
    rows = [{"messages": [{"role": "user", "content": question},
                          {"role": "assistant", "content": [{"type": "text", "text": "black"}]}]}]
    train, _ = load(tmp_path, rows, tokenizer)
    assert segments(train[0], tokenizer) == [
        ("<|im_start|>user\nColour of\nthe cat?<|im_end|>\n<|im_start|>assistant\n", False),
        ("black<|im_end|>", True), ("\n", False)]


def test_preview_marks_trained_tokens(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"messages": CHAT[1:3]}], tokenizer)
    text = preview(train[:1], tokenizer, color=False)
    assert "<|im_start|>assistant\n[[black<|im_end|>]]\n" in text
    assert "\033[32mblack<|im_end|>\033[0m" in preview(train[:1], tokenizer, color=True)


# ---- sources, splits, mixing, lengths ----

def test_every_local_file_type_loads_the_same_rows(tmp_path, tokenizer):
    from datasets import Dataset

    rows = [{"text": f"row {i}"} for i in range(4)]
    dataset = Dataset.from_list(rows)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    dataset.save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    expected = None
    for path in ("d.jsonl", "d.json", "d.parquet", "d.csv", arrow_file, "saved"):
        config = DataConfig(path=str(tmp_path / path), eval_path=str(tmp_path / "d.jsonl"), format=DataFormat.text,
                            num_proc=1)
        train, _, _ = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
        ids = [sample.input_ids for sample in train]
        expected = expected or ids
        assert ids == expected, path


def test_eval_fraction_is_held_out_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"text": f"row number {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    config = DataConfig(path=str(path), format=DataFormat.text, eval_fraction=0.25, num_proc=1)

    def split(seed):
        train, evaluation, _ = load_splits(config, tokenizer, seed=seed, cache_dir=str(tmp_path / "cache"))
        return ({tokenizer.decode(s.input_ids) for s in train}, {tokenizer.decode(s.input_ids) for s in evaluation})

    train, evaluation = split(seed=1)
    assert len(train) == 30 and len(evaluation) == 10 and not train & evaluation
    assert split(seed=1) == (train, evaluation) and split(seed=2) != (train, evaluation)


def test_sources_mix_by_weight_with_upsampling(tmp_path, tokenizer):
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(10)])
    large = write_jsonl(tmp_path / "large.jsonl", [{"text": f"large {i}"} for i in range(30)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"text": "eval"}])
    config = DataConfig(sources=[DataSource(path=str(small), weight=3.0), DataSource(path=str(large), weight=1.0)],
                        eval_path=str(held_out), format=DataFormat.text, num_proc=1)
    train, _, lines = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    texts = [tokenizer.decode(s.input_ids) for s in train]
    from_small = [t for t in texts if t.startswith("small")]
    # 40 samples in all, three quarters from the 10 small rows: each repeated exactly 3 times.
    assert len(texts) == 40 and len(from_small) == 30
    assert all(from_small.count(t) == 3 for t in set(from_small))
    assert lines[-2].startswith("train: 40 samples")


def test_sources_can_mix_formats(tmp_path, tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[1:3]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    config = DataConfig(sources=[DataSource(path=str(chat)), DataSource(path=str(text), format=DataFormat.text)],
                        eval_path=str(chat), num_proc=1)
    train, _, _ = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert [segments(s, tokenizer)[-1] for s in train] == [("\n", False), ("plain<|im_end|>", True)]


def test_truncation_keeps_the_start_and_drop_leaves_long_samples_out(tmp_path, tokenizer):
    rows = [{"text": "short"}, {"text": "a much longer line of text " * 5}]
    train, lines = load(tmp_path, rows, tokenizer, format=DataFormat.text, max_seq_len=16)
    assert [len(s.input_ids) for s in train][1] == 16 and "1 truncated" in lines[-2]
    with pytest.warns(UserWarning, match="longer than data.max_seq_len=16"):
        train, lines = load(tmp_path, rows, tokenizer, format=DataFormat.text, max_seq_len=16,
                            truncation=Truncation.drop)
    assert len(train) == 1 and "1 dropped (too long)" in lines[-2]


def test_report_gives_counts_trained_share_and_percentiles(tmp_path, tokenizer):
    train, lines = load(tmp_path, [{"messages": CHAT[1:3]}, {"messages": CHAT}], tokenizer)
    short, long = (len(s.input_ids) for s in train)
    trained = sum(label != IGNORE_INDEX for s in train for label in s.labels)
    assert lines[0].startswith("source ") and "2 rows, tokenized" in lines[0]
    assert lines[-2] == (f"train: 2 samples, {short + long} tokens ({trained / (short + long):.0%} trained), "
                         "0 truncated, 0 dropped (no trainable tokens); tokens per sample "
                         f"p50 {round((short + long) / 2)}, p90 {round(short + 0.9 * (long - short))}, "
                         f"p99 {round(short + 0.99 * (long - short))}, max {long}")


def test_samples_without_trainable_tokens_are_dropped_with_a_warning(tmp_path, tokenizer):
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[:2]}]
    with pytest.warns(UserWarning, match="1 have no token to train on"):
        train, lines = load(tmp_path, rows, tokenizer)
    assert len(train) == 1 and "1 dropped (no trainable tokens)" in lines[-2]


def test_all_samples_dropped_is_an_error(tmp_path, tokenizer):
    with warnings.catch_warnings(), pytest.raises(DataError, match="all 1 train samples were dropped"):
        warnings.simplefilter("ignore")
        load(tmp_path, [{"messages": CHAT[:2]}], tokenizer)


# ---- the cache ----

def untouchable_copy(tokenizer):
    """The same tokenizer (the same fingerprint, so the same cache key), failing if it is ever used."""

    class Untouchable(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized again despite a cache hit")

        def apply_chat_template(self, *args, **kwargs):
            raise AssertionError("rendered again despite a cache hit")

    same = Untouchable(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token,
                       bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token,
                       chat_template=tokenizer.chat_template)
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tokenizer)
    return same


def test_second_load_reads_the_cache_without_tokenizing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}] * 3)
    config = DataConfig(path=str(path), eval_path=str(path), num_proc=1)
    first, _, lines = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert "tokenized" in lines[0]

    same = untouchable_copy(tokenizer)
    second, _, lines = load_splits(config, same, seed=0, cache_dir=str(tmp_path / "cache"))
    assert "read from cache" in lines[0] and "read from cache" in lines[1]
    assert [s.input_ids for s in second] == [s.input_ids for s in first]


@pytest.mark.parametrize("change", ["file", "max_seq_len", "loss_on", "template"])
def test_cache_key_follows_what_the_tokens_depend_on(tmp_path, tokenizer, change):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}])
    config = DataConfig(path=str(path), eval_path=str(path), num_proc=1)
    load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    if change == "file":
        write_jsonl(path, [{"messages": CHAT[1:3]}])
    else:
        value = {"max_seq_len": 32, "loss_on": LossOn.all_turns, "template": "chatml"}[change]
        setattr(config, "chat_template" if change == "template" else change, value)
    _, _, lines = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert "tokenized" in lines[0]


def test_worker_processes_give_the_same_tokens(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4000)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    results = []
    for num_proc in (1, 2):
        config = DataConfig(path=str(path), eval_path=str(path), num_proc=num_proc, max_seq_len=48 + num_proc)
        train, _, _ = load_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
        results.append([(s.input_ids, s.labels) for s in train[::97]])
    assert results[0] == results[1]


# ---- bad input: each a DataError that says where and what ----

@pytest.mark.parametrize("content, message", [
    (b'{"messages": []}\n{"messages": [oops]}\n', r"train.jsonl:2: malformed JSON"),
    (b"", r"train.jsonl: the file is empty"),
    (b"\n\n  \n", r"train.jsonl: the file holds only whitespace"),
    ('{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"),
     r"train.jsonl:1: not valid UTF-8"),
])
def test_unreadable_files_name_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(path=str(path), num_proc=1), tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("rows, message", [
    ([{"conversation": CHAT}], r"missing column\(s\) \['messages'\].*found \['conversation'\]"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], r"row 1: message 0 has unknown role 'bot'"),
    ([{"messages": CHAT}, {"messages": [{"role": "user", "content": 5}]}], r"row 2: message 0 \(user\) needs a string"),
    ([{"messages": [{"speaker": "user", "text": "hi"}]}],
     r"row 1: message 0 has no 'role'; found keys \['speaker', 'text'\]"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}],
     r"found \['conversations'\]; this looks like ShareGPT data: pass data.columns.messages=conversations"),
    ([{"messages": CHAT}, {"messages": [{"from": "bot", "value": "hi"}]}],
     r"train.jsonl: row 2: message 0 has unknown ShareGPT speaker 'from': 'bot'; expected one of \('human', 'gpt', "
     r"'system', 'user', 'assistant', 'tool'\)"),
    ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                  {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]}],
     r"train.jsonl: row 1: message 0 \(user\), content part 1 is of type 'image_url'; only 'text' parts"),
])
def test_malformed_rows_say_what_is_wrong(tmp_path, tokenizer, rows, message):
    with pytest.raises(DataError, match=message):
        load(tmp_path, rows, tokenizer)


def test_missing_file_and_unknown_type_are_data_errors(tmp_path, tokenizer):
    for path, message in [(tmp_path / "absent.jsonl", "no such file"), (tmp_path / "notes.txt", "no such file")]:
        with pytest.raises(DataError, match=message):
            load_splits(DataConfig(path=str(path)), tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_splits(DataConfig(path=str(tmp_path / "notes.txt")), tokenizer, seed=0, cache_dir=str(tmp_path / "c"))


# ---- property: random conversations ----

TEXT = st.lists(st.sampled_from(["a", "b", " ", "\n", "é", "猫", "<|im_end|>", "<|im_start|>assistant\n", "ok."]),
                max_size=8).map("".join)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": TEXT})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations=st.lists(st.lists(MESSAGE, min_size=1, max_size=6), min_size=1, max_size=4))
def test_random_conversations_train_only_on_assistant_answers(tokenizer, conversations):
    settings = TokenSettings(DataFormat.messages, LossOn.assistant, 4096, tokenizer.chat_template)
    columns = tokenize_rows({"messages": conversations}, list(range(len(conversations))), tokenizer=tokenizer,
                            settings=settings, source_name="random")
    for messages, ids, labels in zip(conversations, columns["input_ids"], columns["labels"]):
        pairs = zip(ids.tolist(), labels.tolist())
        runs = [tokenizer.decode([token for token, _ in group])
                for trained, group in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX) if trained]
        # An opening assistant turn answers nothing and is not trained.
        answers = [m["content"] + "<|im_end|>" for m in messages[1:] if m["role"] == "assistant"]
        # One trained run per answer, each the answer's end through its end-of-turn token (a first
        # character that merges with the header's newline is left out, never the other way round).
        assert len(runs) == len(answers)
        assert all(answer.endswith(run) and run.endswith("<|im_end|>") for run, answer in zip(runs, answers))


def test_token_ids_beyond_the_model_vocabulary_name_the_first_sample_that_holds_one():
    from datasets import Dataset

    from finetune.data import PreferenceSplit, TokenizedSplit, check_vocabulary

    samples = TokenizedSplit(Dataset.from_dict({"input_ids": [[1, 2], [], [3, 9, 12], [12]]}))
    check_vocabulary({"train": samples}, vocab_size=13)  # ids up to 12 have embeddings
    with pytest.raises(DataError, match=r"train sample 3 \(input_ids\) holds token id 12, but the model's "
                                        r"vocabulary has 12 entries"):
        check_vocabulary({"train": samples}, vocab_size=12)
    pairs = PreferenceSplit(Dataset.from_dict({"prompt_ids": [[1], [2]], "chosen_ids": [[3], [4]],
                                               "rejected_ids": [[5], [40]]}), kto=False, max_seq_len=8)
    with pytest.raises(DataError, match=r"eval sample 2 \(rejected_ids\) holds token id 40"):
        check_vocabulary({"train": samples, "eval": pairs}, vocab_size=13)
    # A row the split left out (dropped as too long, say) is not the run's concern.
    check_vocabulary({"train": TokenizedSplit(samples.dataset.select([0, 1]))}, vocab_size=12)
