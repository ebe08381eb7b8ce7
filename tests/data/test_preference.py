"""Preference data (data.format=preference and kto) on the demo tokenizer: every row shape token by
token, conversation pairs split where the chat template's renderings part, truncation and drops,
bad input, the padded chosen+rejected and KTO batch layouts, the cache, mixing, and the demo pairs."""

import itertools
import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import untouchable_copy

from finetune.config import ConfigError, DataConfig, DataFormat, DataSource, LossOn, Truncation
from finetune.data import (IGNORE_INDEX, DataError, PreferencePair, collate_kto, collate_kto_packed, collate_pairs,
                           collate_pairs_packed, count_tokens, eval_preference_batches, load_preference_splits,
                           load_splits, preference_batches, preview)
from finetune.data.tokenization import TokenSettings, fit_pair, tokenize_pair_rows
from finetune.demo import ENTITIES, RELATIONS, build_tokenizer, demo_conversations, demo_preference_pairs

QUESTION = "Colour of the cat?"
PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
SYSTEM = [{"role": "system", "content": "Be brief."}]
SYSTEM_PROMPT = f"<|im_start|>system\nBe brief.<|im_end|>\n{PROMPT}"
# Plain "role: content" lines: no special tokens, no EOS, so answers' text runs on into the prompt's.
ROLE_LINES = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(tmp_path, rows, tokenizer, **data):
    """Train pairs in file order (the file is its own eval set), and the report lines."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data.setdefault("format", DataFormat.preference)
    config = DataConfig(path=str(path), eval_path=str(path), num_proc=1, **data)
    train, _, lines = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    return train, lines


def texts(pair, tokenizer):
    return tuple(tokenizer.decode(ids) for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))


# ---- row shapes, token by token ----

def test_string_prompt_and_responses_render_as_a_user_assistant_exchange(tmp_path, tokenizer):
    train, lines = load(tmp_path, [{"prompt": QUESTION, "chosen": "black", "rejected": "brown"}], tokenizer)
    pair = train[0]
    assert texts(pair, tokenizer) == (PROMPT, "black<|im_end|>", "brown<|im_end|>")
    assert pair.label is None and pair.index == 0 and pair.messages == [user(QUESTION)]
    # The response ids are what the whole conversation tokenizes to after the prompt.
    assert pair.prompt_ids + pair.chosen_ids == tokenizer(PROMPT + "black<|im_end|>")["input_ids"]
    assert lines[-2].startswith("train: 1 pairs, ") and "0 truncated, 0 dropped" in lines[-2]


def test_message_list_prompt_and_multi_turn_responses_render_turn_by_turn(tmp_path, tokenizer):
    chosen = [assistant("black"), user("Sure?"), assistant("yes")]
    rows = [{"prompt": SYSTEM + [user(QUESTION)], "chosen": chosen, "rejected": [assistant("brown")]}]
    pair = load(tmp_path, rows, tokenizer)[0][0]
    assert texts(pair, tokenizer) == (
        SYSTEM_PROMPT, "black<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>",
        "brown<|im_end|>")
    assert pair.messages == SYSTEM + [user(QUESTION)]


def test_conversation_pairs_split_at_the_last_assistant_turn(tmp_path, tokenizer):
    history = SYSTEM + [user(QUESTION), assistant("black"), user("And the dog?")]
    # The answers share "The dog is b": a common-string-prefix split would move it into the prompt.
    rows = [{"chosen": history + [assistant("The dog is brown")], "rejected": history + [assistant("The dog is blue")]}]
    pair = load(tmp_path, rows, tokenizer)[0][0]
    prompt = SYSTEM_PROMPT + "black<|im_end|>\n<|im_start|>user\nAnd the dog?<|im_end|>\n<|im_start|>assistant\n"
    assert texts(pair, tokenizer) == (prompt, "The dog is brown<|im_end|>", "The dog is blue<|im_end|>")
    assert pair.messages == history


def test_whole_conversations_beside_a_prompt_column_are_split_like_conversation_pairs(tmp_path, tokenizer):
    # UltraFeedback's layout: the prompt in its own column and again at the start of both conversations.
    rows = [{"prompt": QUESTION, "chosen": [user(QUESTION), assistant("black")],
             "rejected": [user(QUESTION), assistant("brown")]}]
    pair = load(tmp_path, rows, tokenizer)[0][0]
    assert texts(pair, tokenizer) == (PROMPT, "black<|im_end|>", "brown<|im_end|>")


def test_conversation_pairs_under_a_template_without_special_tokens(tmp_path, tokenizer):
    rows = [{"chosen": [user(QUESTION), assistant("black cat")], "rejected": [user(QUESTION), assistant("word")]},
            {"chosen": [user(QUESTION), assistant("answer")], "rejected": [user(QUESTION), assistant("black")]}]
    first, second = load(tmp_path, rows, tokenizer, chat_template=ROLE_LINES)[0]
    assert texts(first, tokenizer) == (f"user: {QUESTION}\nassistant: ", "black cat\n", "word\n")
    assert texts(second, tokenizer) == (f"user: {QUESTION}\nassistant: ", "answer\n", "black\n")
    # The prompt's last token, a space, merges into " answer" when the whole sequence is tokenized,
    # so that answer is tokenized on its own: the prompt keeps the tokens generation starts from.
    # " black" has no merged token: it tokenizes as in the whole sequence either way.
    assert tokenizer.convert_ids_to_tokens(first.prompt_ids[-1:]) == ["Ġ"] and first.prompt_ids == second.prompt_ids
    whole = tokenizer(f"user: {QUESTION}\nassistant: answer\n")["input_ids"]
    assert whole[:len(second.prompt_ids)] != second.prompt_ids
    assert second.chosen_ids == tokenizer("answer\n")["input_ids"]
    whole = tokenizer(f"user: {QUESTION}\nassistant: black cat\n")["input_ids"]
    assert first.chosen_ids == whole[len(first.prompt_ids):]


def test_kto_rows_hold_one_completion_and_its_label(tmp_path, tokenizer):
    rows = [{"prompt": QUESTION, "completion": "black", "label": True},
            {"prompt": [user(QUESTION)], "completion": [assistant("brown")], "label": False}]
    train, lines = load(tmp_path, rows, tokenizer, format=DataFormat.kto)
    assert [(texts(row, tokenizer), row.label) for row in train] == [
        ((PROMPT, "black<|im_end|>", ""), True), ((PROMPT, "brown<|im_end|>", ""), False)]
    assert lines[-2].startswith("train: 2 rows (1 desirable, 1 undesirable), ")


def test_columns_are_mapped_by_name(tmp_path, tokenizer):
    from finetune.config import DataColumns

    rows = [{"question": QUESTION, "good": "black", "bad": "brown"}]
    columns = DataColumns(prompt="question", chosen="good", rejected="bad")
    pair = load(tmp_path, rows, tokenizer, columns=columns)[0][0]
    assert texts(pair, tokenizer) == (PROMPT, "black<|im_end|>", "brown<|im_end|>")


def test_parquet_conversation_pairs_load_like_jsonl(tmp_path, tokenizer):
    from datasets import Dataset

    rows = [{"chosen": [user(QUESTION), assistant("black")], "rejected": [user(QUESTION), assistant("brown")]}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    config = DataConfig(path=str(tmp_path / "pairs.parquet"), eval_path=str(tmp_path / "pairs.parquet"),
                        format=DataFormat.preference, num_proc=1)
    train, _, _ = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert texts(train[0], tokenizer) == (PROMPT, "black<|im_end|>", "brown<|im_end|>")


def test_preview_marks_prompt_chosen_and_rejected(tmp_path, tokenizer):
    train, _ = load(tmp_path, [{"prompt": QUESTION, "chosen": "black", "rejected": "brown"}], tokenizer)
    text = preview(train[:1], tokenizer, color=False)
    assert text.startswith("--- pair 1: prompt ")
    assert f"prompt:\n{PROMPT}\nchosen:\n[[chosen: black<|im_end|>]]\nrejected:\n[[rejected: brown<|im_end|>]]" in text
    coloured = preview(train[:1], tokenizer, color=True)
    assert "\033[32mblack<|im_end|>\033[0m" in coloured and "\033[31mbrown<|im_end|>\033[0m" in coloured


# ---- lengths: truncation and drops ----

@pytest.mark.parametrize("prompt, longest, kept_prompt, room", [
    (10, 20, 8, 8),  # both long: the prompt keeps half, the responses the rest
    (4, 20, 4, 12),  # a short prompt stays whole
    (30, 3, 13, 3),  # short responses: the prompt is cut only as far as they need
    (6, 6, 6, 6),  # fits
])
def test_fit_pair_keeps_the_prompts_end_and_the_responses_starts(prompt, longest, kept_prompt, room):
    prompt_ids, chosen, rejected = list(range(prompt)), list(range(100, 100 + longest)), [7, 8]
    kept, (kept_chosen, kept_rejected) = fit_pair(prompt_ids, [chosen, rejected], max_seq_len=16)
    assert kept == prompt_ids[prompt - kept_prompt:]
    assert kept_chosen == chosen[:room] and kept_rejected == rejected[:room]
    assert len(kept) + max(len(kept_chosen), len(kept_rejected)) <= 16


def test_long_pairs_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long = "a much longer answer than fits " * 4
    rows = [{"prompt": QUESTION, "chosen": "black", "rejected": "brown"},
            {"prompt": "a very long question indeed " * 4, "chosen": long, "rejected": "no"}]
    train, lines = load(tmp_path, rows, tokenizer, max_seq_len=32)
    full = tokenizer(PROMPT.replace(QUESTION, rows[1]["prompt"]))["input_ids"]
    assert train[1].prompt_ids == full[-16:] and len(train[1].chosen_ids) == 16
    assert tokenizer.decode(train[1].chosen_ids) == tokenizer.decode(tokenizer(long)["input_ids"][:16])
    assert texts(train[1], tokenizer)[2] == "no<|im_end|>"
    assert "1 truncated" in lines[-2]
    with pytest.warns(UserWarning, match=r"1 train pairs were dropped: 1 are longer than data.max_seq_len=32 "
                                         r"\(data.truncation=drop\)"):
        train, lines = load(tmp_path, rows, tokenizer, max_seq_len=32, truncation=Truncation.drop)
    assert len(train) == 1 and "0 truncated, 1 dropped (too long)" in lines[-2]


def test_identical_chosen_and_rejected_are_dropped_with_a_warning(tmp_path, tokenizer):
    rows = [{"prompt": QUESTION, "chosen": "black", "rejected": "brown"},
            {"prompt": QUESTION, "chosen": "black", "rejected": "black"}]
    with pytest.warns(UserWarning, match="1 have identical chosen and rejected tokens"):
        train, lines = load(tmp_path, rows, tokenizer)
    assert len(train) == 1 and "1 dropped (identical chosen and rejected)" in lines[-2]
    with warnings.catch_warnings(), pytest.raises(DataError, match="all 1 train pairs were dropped"):
        warnings.simplefilter("ignore")
        load(tmp_path, rows[1:], tokenizer)


# ---- bad input: one DataError naming file and row ----

GOOD = {"prompt": QUESTION, "chosen": "black", "rejected": "brown"}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": QUESTION, "chosen": "black"}],
     r"train.jsonl: missing column\(s\) \['rejected'\] for data.format=preference; expected \['prompt', 'chosen', "
     r"'rejected'\], found \['prompt', 'chosen'\]"),
    ([GOOD, {"prompt": QUESTION, "chosen": "", "rejected": "brown"}], r"train.jsonl: row 2: 'chosen' is empty"),
    ([GOOD, {"prompt": QUESTION, "chosen": "black", "rejected": "  "}], r"train.jsonl: row 2: 'rejected' is empty"),
    ([{"prompt": [user(QUESTION)], "chosen": [], "rejected": [assistant("brown")]}],
     r"train.jsonl: row 1: 'chosen' must be a non-empty list"),
    ([{"prompt": [user(QUESTION)], "chosen": [user("black")], "rejected": [assistant("brown")]}],
     r"row 1: 'chosen' must begin with an assistant message, got role 'user'"),
    ([{"prompt": [user(QUESTION)], "chosen": [assistant("black")], "rejected": [{"role": "bot", "content": "x"}]}],
     r"row 1: message 0 has unknown role 'bot'"),
    ([{"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
       "rejected": [user("a"), assistant("X"), user("c"), assistant("e")]}],
     r"train.jsonl: row 1: chosen and rejected render differently from message 1, before their last assistant "
     r"turns \(messages 3 and 3\)"),
    ([{"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("c")]}],
     r"row 1: chosen and rejected share no prefix"),
    ([{"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b"), user("c"), assistant("d")]}],
     r"row 1: chosen and rejected render differently from message 2, before their last assistant turns "
     r"\(messages 1 and 3\)"),
    ([{"chosen": [user("a")], "rejected": [user("a"), assistant("c")]}],
     r"row 1: without a 'prompt' column, 'chosen' must be a whole conversation"),
    ([{"chosen": [assistant("b")], "rejected": [assistant("c")]}],
     r"row 1: without a 'prompt' column, 'chosen' must be a whole conversation"),
    ([{"chosen": "black", "rejected": "brown"}],
     r"row 1: without a 'prompt' column, 'chosen' must be a whole conversation \(a list of \{role, content\} "
     r"messages\), got str"),
])
def test_malformed_pairs_say_where_and_what(tmp_path, tokenizer, rows, message):
    with pytest.raises(DataError, match=message):
        load(tmp_path, rows, tokenizer)


def test_a_wrongly_typed_column_names_the_row(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"train.jsonl: row 1: column 'chosen' must hold a string or a list"):
        load(tmp_path, [{"prompt": QUESTION, "chosen": 5, "rejected": 6}], tokenizer)


@pytest.mark.parametrize("label", ["yes", 1])
def test_kto_label_must_be_a_bool(tmp_path, tokenizer, label):
    rows = [{"prompt": QUESTION, "completion": "black", "label": label}]
    with pytest.raises(DataError, match=rf"train.jsonl: row 1: column 'label' must be true \(a desirable completion\) "
                                        rf"or false \(an undesirable one\), got {type(label).__name__} {label!r}"):
        load(tmp_path, rows, tokenizer, format=DataFormat.kto)


def test_kto_needs_a_label_column(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\] for data.format=kto"):
        load(tmp_path, [{"prompt": QUESTION, "completion": "black"}], tokenizer, format=DataFormat.kto)


def test_config_refuses_mixed_formats():
    DataConfig(path="x.jsonl", format=DataFormat.preference, packing=True).validate()
    DataConfig(path="x.jsonl", format=DataFormat.kto, packing=True).validate()
    mixed = DataConfig(format=DataFormat.preference,
                       sources=[DataSource(path="a.jsonl"), DataSource(path="b.jsonl", format=DataFormat.messages)])
    with pytest.raises(ConfigError, match=r"preference data cannot be mixed with other formats \(data.format="
                                          r"preference, data.sources\[1\].format=messages\)"):
        mixed.validate()
    DataConfig(path="x.jsonl", format=DataFormat.kto).validate()


def test_sft_loader_refuses_preference_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    with pytest.raises(DataError, match="objective=dpo"):
        load_splits(DataConfig(path=str(path), format=DataFormat.preference), tokenizer, 0, str(tmp_path / "c"))


# ---- batches ----

def pair(prompt, chosen, rejected, index):
    return PreferencePair(prompt, chosen, rejected, None, [], index)


def test_pair_batch_puts_chosen_rows_first_then_rejected_in_the_same_order():
    pairs = [pair([1, 2, 3], [10, 11], [20], index=7), pair([4], [12, 13, 14], [21, 22], index=3)]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11], [4, 12, 13, 14, 0], [1, 2, 3, 20, 0], [4, 21, 22, 0, 0]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, i, 10, 11], [i, 12, 13, 14, i], [i, i, i, 20, i], [i, 21, 22, i, i]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["pair_index"].tolist() == [7, 3]
    assert count_tokens(batch) == 5 + 4 + 4 + 3


def test_packed_pairs_hold_the_padded_batchs_sequences_back_to_back():
    pairs = [pair([1, 2, 3], [10, 11], [20], index=7), pair([4], [12, 13, 14], [21, 22], index=3)]
    packed, padded = collate_pairs_packed(pairs), collate_pairs(pairs, pad_id=0)
    lengths = padded["attention_mask"].sum(-1).tolist()
    assert packed["cu_seqlens"].tolist() == [0, 5, 9, 13, 16]
    assert packed["position_ids"][0].tolist() == [*range(5), *range(4), *range(4), *range(3)]
    unpadded = [row[:n] for row, n in zip(padded["input_ids"].tolist(), lengths)]
    assert packed["input_ids"][0].tolist() == sum(unpadded, [])  # chosen 0, chosen 1, rejected 0, rejected 1
    assert packed["labels"][0].tolist() == sum((row[:n] for row, n in zip(padded["labels"].tolist(), lengths)), [])
    assert packed["pair_index"].tolist() == [7, 3] and count_tokens(packed) == count_tokens(padded)


def test_kto_batch_has_mismatched_kl_rows_cut_to_max_seq_len():
    rows = [PreferencePair([1, 2], [10], [], True, [], 0), PreferencePair([3], [11, 12, 13], [], False, [], 1),
            PreferencePair([4, 5], [14, 15], [], True, [], 2)]
    batch = collate_kto(rows, pad_id=0, max_seq_len=4)
    i = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[1, 2, 10, 0], [3, 11, 12, 13], [4, 5, 14, 15]]
    assert batch["labels"].tolist() == [[i, i, 10, i], [i, 11, 12, 13], [i, i, 14, 15]]
    assert batch["kto_label"].tolist() == [True, False, True] and batch["pair_index"].tolist() == [0, 1, 2]
    # Row i: prompt i, then completion (i + 1) mod B, its end cut so the row fits max_seq_len.
    assert batch["kl_input_ids"].tolist() == [[1, 2, 11, 12], [3, 14, 15, 0], [4, 5, 10, 0]]
    assert batch["kl_labels"].tolist() == [[i, i, 11, 12], [i, 14, 15, i], [i, i, 10, i]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert count_tokens(batch) == (3 + 4 + 4) + (4 + 3 + 3)
    single = collate_kto(rows[:1], pad_id=0, max_seq_len=4)
    assert not any(key.startswith("kl_") for key in single)


def test_packed_kto_batch_holds_the_padded_batchs_sequences_and_kl_rows_back_to_back():
    rows = [PreferencePair([1, 2], [10], [], True, [], 0), PreferencePair([3], [11, 12, 13], [], False, [], 1),
            PreferencePair([4, 5], [14, 15], [], True, [], 2)]
    packed, padded = collate_kto_packed(rows, max_seq_len=4), collate_kto(rows, pad_id=0, max_seq_len=4)
    i = IGNORE_INDEX
    assert packed["input_ids"].tolist() == [[1, 2, 10, 3, 11, 12, 13, 4, 5, 14, 15]]
    assert packed["labels"].tolist() == [[i, i, 10, i, 11, 12, 13, i, i, 14, 15]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed["cu_seqlens"].tolist() == [0, 3, 7, 11]
    # The KL rows of the padded batch (prompt i, completion i + 1 cut to max_seq_len), unpadded, in order.
    assert packed["kl_input_ids"].tolist() == [[1, 2, 11, 12, 3, 14, 15, 4, 5, 10]]
    assert packed["kl_labels"].tolist() == [[i, i, 11, 12, i, 14, 15, i, i, 10]]
    assert packed["kl_position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert packed["kl_cu_seqlens"].tolist() == [0, 4, 7, 10]
    for key in ("kl_input_ids", "kl_labels"):
        lengths = padded["kl_attention_mask"].sum(-1).tolist()
        assert packed[key][0].tolist() == sum((row[:n] for row, n in zip(padded[key].tolist(), lengths)), [])
    assert packed["kto_label"].tolist() == [True, False, True] and packed["pair_index"].tolist() == [0, 1, 2]
    assert "attention_mask" not in packed and "kl_attention_mask" not in packed
    assert count_tokens(packed) == count_tokens(padded) == 11 + 10
    single = collate_kto_packed(rows[:1], max_seq_len=4)
    assert not any(key.startswith("kl_") for key in single) and count_tokens(single) == 3


def test_batches_from_a_split_cover_every_pair_and_eval_keeps_the_order(tmp_path, tokenizer):
    rows = [{"prompt": f"question {n}", "chosen": "black", "rejected": "brown"} for n in range(5)]
    train, _ = load(tmp_path, rows, tokenizer)
    config = DataConfig(path="unused", format=DataFormat.preference)
    stream = preference_batches(train, config, micro_batch_size=2, pad_id=tokenizer.pad_token_id, seed=0)
    epoch = [next(stream) for _ in range(3)]
    assert [tuple(b["input_ids"].shape[:1]) for b in epoch] == [(4,), (4,), (2,)]
    assert sorted(itertools.chain.from_iterable(b["pair_index"].tolist() for b in epoch)) == [0, 1, 2, 3, 4]
    for batch in epoch:  # each row pairs its own prompt with its response
        for row, index in enumerate(batch["pair_index"].tolist()):
            assert f"question {index}" in tokenizer.decode(batch["input_ids"][row])
    order = [index for b in eval_preference_batches(train, 2, tokenizer.pad_token_id) for index in b["pair_index"]]
    assert order == [0, 1, 2, 3, 4]
    config.packing = True
    packed = next(preference_batches(train, config, micro_batch_size=2, pad_id=tokenizer.pad_token_id, seed=0))
    assert packed["input_ids"].shape[0] == 1 and len(packed["cu_seqlens"]) == 5
    assert packed["pair_index"].tolist() == epoch[0]["pair_index"].tolist()


def test_kto_batches_pack_with_data_packing(tmp_path, tokenizer):
    rows = [{"prompt": f"question {n}", "completion": "black", "label": n % 2 == 0} for n in range(5)]
    train, _ = load(tmp_path, rows, tokenizer, format=DataFormat.kto)
    config = DataConfig(path="unused", format=DataFormat.kto, packing=True)
    packed = next(preference_batches(train, config, micro_batch_size=2, pad_id=tokenizer.pad_token_id, seed=0))
    config.packing = False
    padded = next(preference_batches(train, config, micro_batch_size=2, pad_id=tokenizer.pad_token_id, seed=0))
    assert packed["input_ids"].shape[0] == packed["kl_input_ids"].shape[0] == 1
    assert len(packed["cu_seqlens"]) == len(packed["kl_cu_seqlens"]) == 3
    assert packed["pair_index"].tolist() == padded["pair_index"].tolist()
    assert count_tokens(packed) == count_tokens(padded)
    evaluated = next(eval_preference_batches(train, 2, tokenizer.pad_token_id))  # evaluation stays padded
    assert evaluated["kl_input_ids"].shape[0] == 2 and "kl_attention_mask" in evaluated


# ---- splits, mixing, the cache ----

def test_eval_fraction_holds_out_pairs(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q {n}", "chosen": "a", "rejected": "b"} for n in range(20)])
    config = DataConfig(path=str(path), format=DataFormat.preference, eval_fraction=0.25, num_proc=1)
    train, evaluation, _ = load_preference_splits(config, tokenizer, seed=1, cache_dir=str(tmp_path / "cache"))
    prompts = [{tokenizer.decode(p.prompt_ids) for p in split} for split in (train, evaluation)]
    assert len(train) == 15 and len(evaluation) == 5 and not prompts[0] & prompts[1]


def test_sources_mix_by_weight(tmp_path, tokenizer):
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"small {n}", "chosen": "a", "rejected": "b"}
                                                   for n in range(4)])
    large = write_jsonl(tmp_path / "large.jsonl", [{"prompt": f"large {n}", "chosen": "a", "rejected": "b"}
                                                   for n in range(12)])
    config = DataConfig(sources=[DataSource(path=str(small), weight=3.0), DataSource(path=str(large))],
                        eval_path=str(small), format=DataFormat.preference, num_proc=1)
    train, _, lines = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    prompts = [tokenizer.decode(p.prompt_ids) for p in train]
    from_small = [p for p in prompts if "small" in p]
    assert len(prompts) == 16 and len(from_small) == 12 and all(from_small.count(p) == 3 for p in set(from_small))
    assert [p.index for p in train] == list(range(16)) and lines[-2].startswith("train: 16 pairs")


def test_second_load_reads_the_cache_without_tokenizing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD] * 3)
    config = DataConfig(path=str(path), eval_path=str(path), format=DataFormat.preference, num_proc=1)
    first, _, lines = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert "tokenized" in lines[0]

    same = untouchable_copy(tokenizer)
    second, _, lines = load_preference_splits(config, same, seed=0, cache_dir=str(tmp_path / "cache"))
    assert "read from cache" in lines[0] and "read from cache" in lines[1]
    assert [texts(p, tokenizer) for p in second] == [texts(p, tokenizer) for p in first]
    config.max_seq_len = 12  # the cut depends on it: a new key
    _, _, lines = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert "tokenized" in lines[0]


def test_worker_processes_give_the_same_pairs(tmp_path, tokenizer, monkeypatch):
    from finetune.data import tokenization

    monkeypatch.setattr(tokenization, "ROWS_PER_PROCESS", 4)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q {n}", "chosen": "a", "rejected": f"b {n}"}
                                              for n in range(12)])
    results = []
    for num_proc in (1, 2):
        config = DataConfig(path=str(path), eval_path=str(path), format=DataFormat.preference, num_proc=num_proc,
                            max_seq_len=64 + num_proc)
        train, _, _ = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
        results.append([texts(p, tokenizer) for p in train])
    assert results[0] == results[1] and len(results[0]) == 12


# ---- the demo pairs ----

def test_demo_pairs_prefer_the_right_answer_to_a_wrong_one_of_the_same_relation():
    train, held_out = demo_preference_pairs()
    assert (train, held_out) == demo_preference_pairs()  # deterministic
    assert demo_preference_pairs(seed=5) != (train, held_out)
    sft_train, sft_held_out = demo_conversations()
    for pairs, conversations in ((train, sft_train), (held_out, sft_held_out)):
        assert [p["prompt"] + p["chosen"] for p in pairs] == [c["messages"] for c in conversations]
    for pair_row in train + held_out:
        right, wrong = pair_row["chosen"][0]["content"], pair_row["rejected"][0]["content"]
        relation = next(r for r in RELATIONS if right in {values[RELATIONS.index(r)] for values in ENTITIES.values()})
        assert wrong != right and wrong in {values[RELATIONS.index(relation)] for values in ENTITIES.values()}
        assert pair_row["rejected"][0]["role"] == "assistant"


@pytest.mark.parametrize("data_format, report", [(DataFormat.preference, "train: 108 pairs"),
                                                 (DataFormat.kto, "train: 216 rows (108 desirable, 108 undesirable)")])
def test_demo_path_reads_the_demo_in_the_configured_format(tmp_path, tokenizer, data_format, report):
    config = DataConfig(path="demo", format=data_format, num_proc=1)
    config.validate()
    train, evaluation, lines = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path))
    assert lines[-2].startswith(report) and len(evaluation) == len(train) // 3
    first = train[0]
    assert tokenizer.decode(first.prompt_ids).startswith("<|im_start|>system\nYou answer with one word.")
    assert first.messages[-1]["role"] == "user"
    # The SFT demo's files stay as they were beside the pairs.
    sft_train, _, _ = load_splits(DataConfig(path="demo", num_proc=1), tokenizer, 0, str(tmp_path))
    assert len(sft_train) == 108


# ---- property: random conversation pairs ----

TEXT = st.lists(st.sampled_from(["a", "b", " ", "\n", "é", "猫", "<|im_end|>", "<|im_start|>assistant\n", "ok."]),
                min_size=1, max_size=8).map("".join).filter(str.strip)
TURNS = st.lists(st.tuples(st.sampled_from(["user", "tool", "system"]), TEXT, TEXT), min_size=1, max_size=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=TURNS, chosen=TEXT, rejected=TEXT)
def test_random_conversation_pairs_split_into_the_rendered_prompt_and_answers(tokenizer, turns, chosen, rejected):
    history = []
    for role, text, answer in turns:
        history += [{"role": role, "content": text}, assistant(answer)]
    history = history[:-1]  # ends on a non-assistant turn: the answers follow it
    settings_ = TokenSettings(DataFormat.preference, LossOn.assistant, 4096, tokenizer.chat_template)
    row = {"chosen": [history + [assistant(chosen)]], "rejected": [history + [assistant(rejected)]]}
    columns = tokenize_pair_rows(row, [0], tokenizer=tokenizer, settings=settings_, source_name="random")
    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(columns["prompt_ids"][0]) == prompt
    for answer, ids in ((chosen, columns["chosen_ids"][0]), (rejected, columns["rejected_ids"][0])):
        # Each answer, through the end-of-turn token that closes it (an answer may hold that text too).
        assert tokenizer.decode(columns["prompt_ids"][0] + ids) == prompt + answer + "<|im_end|>"
