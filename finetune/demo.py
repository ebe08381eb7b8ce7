"""The demo recipe's world: a tiny Llama-architecture base model, its tokenizer and its data.

Everything here is made by our own code, seeded, and saved in HF format, so the demo runs on a
machine with no model hub and then loads through exactly the path users' models take.

The task is a small fact table (entity -> colour, home, sound) asked through several question
templates. Held-out prompts are (template, entity, relation) combinations the model never saw in
training, so exact-match accuracy on them shows the adapter learned the facts rather than the
strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from finetune.io import IfExists, atomic_dir, atomic_write_text

DEMO_SEED = 1234
# Bump when anything below changes what gets written, so stale caches are rebuilt.
DEMO_VERSION = 3

ENTITIES = {
    "cat": ("black", "house", "meow"),
    "dog": ("brown", "kennel", "woof"),
    "cow": ("white", "barn", "moo"),
    "duck": ("yellow", "pond", "quack"),
    "frog": ("green", "lake", "croak"),
    "owl": ("grey", "tree", "hoot"),
    "lion": ("gold", "savanna", "roar"),
    "bee": ("striped", "hive", "buzz"),
    "horse": ("chestnut", "stable", "neigh"),
    "sheep": ("cream", "field", "baa"),
    "pig": ("pink", "sty", "oink"),
    "wolf": ("silver", "forest", "howl"),
}
RELATIONS = ("colour", "home", "sound")
TEMPLATES = {
    "colour": (
        "What colour is the {e}?",
        "Tell me the colour of a {e}.",
        "Which colour does the {e} have?",
        "Name the {e}'s colour.",
    ),
    "home": (
        "Where does the {e} live?",
        "Tell me the home of a {e}.",
        "Which place is home to the {e}?",
        "Name the {e}'s home.",
    ),
    "sound": (
        "What sound does the {e} make?",
        "Tell me the sound of a {e}.",
        "Which sound comes from the {e}?",
        "Name the {e}'s sound.",
    ),
}
SYSTEM_PROMPT = "You answer with one word."

# A ChatML-style template: a tokenizer with a chat template is what every real base model ships,
# so the demo exercises `apply_chat_template` like any other model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Sizes picked so a 2-core CPU finishes the demo in well under three minutes.
TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def _conversation(template: str, entity: str, relation: str) -> dict:
    answer = ENTITIES[entity][RELATIONS.index(relation)]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": template.format(e=entity)},
            {"role": "assistant", "content": answer},
        ]
    }


def demo_conversations(seed: int = DEMO_SEED) -> tuple[list[dict], list[dict]]:
    """Split every (template, entity, relation) question into train and held-out sets.

    Each (entity, relation) fact keeps at least one template in training, so every held-out
    question asks a fact the model has seen, phrased in a way it has not.
    """
    rng = random.Random(seed)
    train, held_out = [], []
    for entity in ENTITIES:
        for relation in RELATIONS:
            templates = list(TEMPLATES[relation])
            rng.shuffle(templates)
            held_out.append(_conversation(templates[0], entity, relation))
            train.extend(_conversation(t, entity, relation) for t in templates[1:])
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def demo_preference_pairs(seed: int = DEMO_SEED) -> tuple[list[dict], list[dict]]:
    """The demo questions as preference pairs {prompt, chosen, rejected}: chosen is the right answer,
    rejected a plausible wrong one (the same relation of another entity, drawn with `seed`).

    Train and held-out questions are exactly the SFT demo's, so a DPO run after the demo's SFT phase
    is evaluated on phrasings it never trained on.
    """
    rng = random.Random(seed)
    return tuple([_pair(row["messages"], rng) for row in rows] for rows in demo_conversations())


def _pair(messages: list[dict], rng: random.Random) -> dict:
    *prompt, answer = messages
    # Every value in the fact table belongs to one relation, so the answer tells which one was asked.
    relation = next(r for r, values in zip(RELATIONS, zip(*ENTITIES.values())) if answer["content"] in values)
    wrong = sorted({values[RELATIONS.index(relation)] for values in ENTITIES.values()} - {answer["content"]})
    return {"prompt": prompt, "chosen": [answer], "rejected": [{"role": "assistant", "content": rng.choice(wrong)}]}


def demo_kto_rows(seed: int = DEMO_SEED) -> tuple[list[dict], list[dict]]:
    """The preference pairs as KTO rows: each question once with its right answer (label true) and
    once with the wrong one (label false), in a seeded order."""
    splits = []
    for pairs in demo_preference_pairs(seed):
        rows = [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                for pair in pairs for side in ("chosen", "rejected")]
        random.Random(seed).shuffle(rows)
        splits.append(rows)
    return tuple(splits)


def write_demo_data(data_dir: Path) -> tuple[Path, Path]:
    """Write train/held-out JSONL chat files (idempotent)."""
    return _write_splits(data_dir, "", demo_conversations())


def write_demo_preference_data(data_dir: Path) -> tuple[Path, Path]:
    """Write train/held-out JSONL preference pairs (idempotent)."""
    return _write_splits(data_dir, "preference-", demo_preference_pairs())


def write_demo_kto_data(data_dir: Path) -> tuple[Path, Path]:
    """Write train/held-out JSONL KTO rows (idempotent)."""
    return _write_splits(data_dir, "kto-", demo_kto_rows())


def _write_splits(data_dir: Path, prefix: str, splits: tuple[list[dict], list[dict]]) -> tuple[Path, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = data_dir / f"{prefix}train.jsonl", data_dir / f"{prefix}eval.jsonl"
    for path, rows in zip(paths, splits):
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
    return paths


def _corpus() -> list[str]:
    train, held_out = demo_conversations()
    lines = []
    for row in train + held_out:
        for message in row["messages"]:
            lines.append(f"{message['role']}\n{message['content']}")
    return lines


def build_tokenizer():
    """A byte-level BPE (GPT-2 style, so GGUF export handles it) trained on the demo text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )


def ensure_demo_base(cache_dir: Path) -> Path:
    """Create the tiny random base model + tokenizer in HF format once; reuse it afterwards.

    The directory name carries DEMO_VERSION, so a changed demo gets a new directory instead of
    overwriting one a user may have trained adapters against. It is written under a temporary
    name and renamed, so an interrupted first run never leaves a half-written model behind.
    """
    model_dir = Path(cache_dir) / f"demo-base-v{DEMO_VERSION}"
    if (model_dir / "finetune_demo.json").exists():
        return model_dir

    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    # A private RNG stream: building the cache must not shift the caller's seeded random state,
    # or a run's LoRA init would depend on whether the demo model was already cached.
    with torch.random.fork_rng():
        torch.manual_seed(DEMO_SEED)
        model = LlamaForCausalLM(config)
    # The processes of a multi-process launch on a cold cache all build the same model: the first
    # one published wins.
    with atomic_dir(model_dir, IfExists.keep) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "finetune_demo.json").write_text(json.dumps({"version": DEMO_VERSION, "seed": DEMO_SEED}))
    return model_dir
