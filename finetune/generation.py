"""Text generation from a trained model, the same on every model path.

Prompts are tokenized, left-padded into batches and handed to the model's transformers-style
`generate` with one GenerationConfig: on the native path that is decoding.generate (our KV cache),
on the generic path (peft over transformers, or a plain transformers model such as a merged one)
transformers' own. Either way each batch is one prefill, then one token per step for all its rows.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from finetune.lora import compute_device
from finetune.sampling import Sampling


def generation_config(sampling: Sampling, tokenizer, model):
    """The transformers GenerationConfig that means what `sampling` does."""
    from transformers import GenerationConfig

    # top_k=0 spelled out: transformers takes an unset top_k as 50.
    sampled = {} if sampling.greedy else dict(temperature=sampling.temperature, top_k=sampling.top_k,
                                              top_p=sampling.top_p)
    return GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                            repetition_penalty=sampling.repetition_penalty,
                            eos_token_id=eos_ids(tokenizer, model) or None, pad_token_id=pad_id(tokenizer), **sampled)


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and those of the model's generation_config
    (chat models often end a turn with a token other than the tokenizer's EOS)."""
    ids = []
    model_config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)):
        for token in [value] if isinstance(value, int) else (value or []):
            if token not in ids:
                ids.append(token)
    return ids


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate


def generate_texts(model, tokenizer, prompts: Sequence[str], sampling: Sampling = Sampling(),
                   batch_size: int = 16) -> list[str]:
    """The new text after each raw prompt (tokenized as the tokenizer's __call__ does, no chat
    template), special tokens skipped and cut before the first stop string, in the prompts' order."""
    # A prompt that already starts with the BOS text (one rendered with a chat template) gets no second one.
    bos = tokenizer.bos_token
    encoded = [tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
               for prompt in prompts]
    return _generate_batched(model, tokenizer, encoded, sampling, batch_size)


def chat_replies(model, tokenizer, conversations: Sequence[list[dict]], sampling: Sampling = Sampling(),
                 batch_size: int = 16) -> list[str]:
    """The reply to each conversation, rendered with the chat template (as in training), stripped."""
    encoded = [render_chat(tokenizer, conversation) for conversation in conversations]
    return [reply.strip() for reply in _generate_batched(model, tokenizer, encoded, sampling, batch_size)]


def render_chat(tokenizer, conversation: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def _generate_batched(model, tokenizer, encoded: list[list[int]], sampling: Sampling, batch_size: int) -> list[str]:
    # Prompts of similar length share a batch, so that little of it is padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        new_ids = generate_ids(model, tokenizer, [encoded[i] for i in rows], sampling)
        for row, ids in zip(rows, new_ids):
            texts[row] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
    return texts


def generate_ids(model, tokenizer, prompts: list[list[int]], sampling: Sampling, streamer=None) -> list[list[int]]:
    """The new token ids of each prompt (one batch, left-padded), up to and including its EOS."""
    device = compute_device(model)
    width = max(len(p) for p in prompts)
    pad = pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = generation_config(sampling, tokenizer, model)
    model.eval()
    with torch.no_grad(), seeded(sampling.seed, device):
        stopping = [StopOnText(tokenizer, sampling.stop, width)] if sampling.stop else []
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                streamer=streamer, stopping_criteria=StoppingCriteriaList(stopping))
    eos = set(config.eos_token_id or ())
    results = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        results.append(row[:end])
    return results


class StopOnText(StoppingCriteria):
    """Ends a row once the text of its new tokens contains a stop string.

    On decoded text, not on token strings (transformers' StopStringCriteria), so that it holds for
    any tokenizer: a stop string with a space misses with byte-level BPE vocabularies there.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, [s for s in stop if s], prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Seed torch's generators for the block and restore them after it (nothing happens without a seed)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def stream_reply(model, tokenizer, conversation: list[dict], sampling: Sampling = Sampling()) -> Iterator[str]:
    """One reply to `conversation`, yielded in pieces of text as its tokens are generated."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run():
        try:
            generate_ids(model, tokenizer, [render_chat(tokenizer, conversation)], sampling, streamer)
        except BaseException as error:  # handed to the reading thread, which raises it
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield from _until_stop(streamer, sampling.stop)
    worker.join()
    if failure:
        raise failure[0]


def _until_stop(pieces: Iterator[str], stop: Sequence[str]) -> Iterator[str]:
    """The pieces up to the first stop string; text that might begin one is held back until it is known not to."""
    held = ""
    for piece in pieces:
        held += piece
        if any(s in held for s in stop):
            yield cut_at_stop(held, stop)
            for _ in pieces:  # let generation finish (it stops on the same string)
                pass
            return
        keep = max((k for s in stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
