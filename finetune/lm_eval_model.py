"""Our models as an lm-evaluation-harness model: log-likelihoods and generations for its tasks.

lm_eval asks three things of a model: the log-probability of a continuation given a context (and
whether greedy decoding would produce it), the log-probability of a whole text, and generations up
to stop strings. TemplateLM (lm_eval's base for local models) turns texts into token ids the way
its own transformers model does; this class scores those ids with one batched forward of whatever
`finetune.load` returned (either model path, a merged model), and generates through one function,
`generate_until_stop`. Importing this module needs the `eval` extra (`pip install 'finetune[eval]'`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from finetune.generation import generate_texts, pad_id
from finetune.sampling import Sampling
from finetune.lora import compute_device

# lm_eval's own default when a task sets no max_gen_toks.
DEFAULT_MAX_GEN_TOKS = 256


@register_model("finetune")
class FinetuneLM(TemplateLM):
    """A loaded model and its tokenizer; `max_length` is the longest sequence one forward sees."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 8):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self._device = compute_device(model)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context conditions on: the sequence start where the tokenizer has one.
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # A chat-rendered prompt already starts with the BOS text; a second BOS would shift every logit.
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------------- log-likelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request is ((context, continuation), context ids, continuation ids)."""
        # Longest first: a batch's padding is then at most its own spread, and running out of
        # memory happens on the first batch rather than the last.
        ordered = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        scores = []
        for batch in ordered.get_batched(n=self.batch_size):
            scores.extend(self._score_batch([(context, continuation) for _, context, continuation in batch]))
        return ordered.get_original(scores)

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # The last max_length tokens of context + continuation, less the final one (nothing follows it
        # to predict): logit t predicts token t + 1.
        rows = [(context + continuation)[-(self.max_length + 1):][:-1] for context, continuation in pairs]
        width = max(len(row) for row in rows)
        # Right padding: causal attention keeps every real token's logits independent of what follows.
        input_ids = torch.tensor([row + [pad_id(self.tokenizer)] * (width - len(row)) for row in rows],
                                 device=self._device)
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows],
                                      device=self._device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        scores = []
        for i, (row, (_, continuation)) in enumerate(zip(rows, pairs)):
            targets = torch.tensor(continuation, device=self._device)
            predicted = logits[i, len(row) - len(continuation):len(row)].float()  # (n, V)
            logprobs = F.log_softmax(predicted, dim=-1)
            total = logprobs.gather(-1, targets[:, None]).sum().item()
            scores.append((total, bool((predicted.argmax(-1) == targets).all())))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability after the prefix token, in windows of max_length (lm_eval's rule:
        every token predicted once, each window with as much context as fits)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    # ------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, where a task asks, sampled) continuations, cut before the first stop string.

        Requests sharing generation settings run together in batches of batch_size.
        """
        eos_text = self.tokenizer.decode([self.eot_token_id])
        ordered = Collator([request.args for request in requests],
                           sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        texts = []
        for batch in ordered.get_batched(n=self.batch_size):
            contexts, settings = zip(*batch)
            settings = normalize_gen_kwargs(settings[0], DEFAULT_MAX_GEN_TOKS)
            stop = handle_stop_sequences(settings.pop("until", None), eos=eos_text)
            max_new_tokens = settings.pop("max_gen_toks")
            if max_new_tokens >= self.max_length:
                raise ValueError(f"the task asks for {max_new_tokens} new tokens, but the model sees at most "
                                 f"{self.max_length} (max_length)")
            prompts = [self._fit_context(context, self.max_length - max_new_tokens) for context in contexts]
            sampling = {name: settings[name] for name in ("temperature", "top_p", "top_k") if name in settings} \
                if settings.get("do_sample") else {}
            texts.extend(generate_until_stop(self.model, self.tokenizer, prompts, max_new_tokens, stop,
                                             len(prompts), **sampling))
        return ordered.get_original(texts)

    def _fit_context(self, context: str, budget: int) -> str:
        """The context, or its last `budget` tokens where it is longer (lm_eval keeps the end)."""
        tokens = self.tok_encode(context)
        return context if len(tokens) <= budget else self.tokenizer.decode(tokens[-budget:])


def generate_until_stop(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: list[str],
                        batch_size: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> list[str]:
    """The new text after each prompt (left-padded batches, KV-cached, special tokens skipped), cut
    before the first stop string: finetune.generation on either model path."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        stop=tuple(stop))
    return generate_texts(model, tokenizer, prompts, sampling, batch_size)
