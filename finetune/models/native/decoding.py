"""Decoding on the native path: a preallocated KV cache, and transformers-style `generate` over it.

Prompts arrive left-padded (B, T) with an attention mask. The prompt runs once (prefill), writing
every layer's keys and values into the cache; after that each step feeds one token per row. All
rows share the cache's slot index (padding included), so a step writes one column of every
layer's (B, Hkv, max_len, D) buffers in place. Which slots a query sees is the mask of real
tokens so far, causally; its rotary position is the count of real tokens before it in its own
row, so a left-padded prompt computes what it computes alone. A prefix all prompts share is
prefilled once for the batch (`prefill`).

After the prefill, every step has the same shapes: one token per row, written at the slot
`cache.slot` (a device tensor), attending to the first `width` slots under the mask of filled ones.
So on CUDA a step is captured once as a CUDA graph and replayed (DecodeSteps): an 8B step is ~1,850
kernel launches, whose host time, not the GPU's, bounds eager decoding (on an H100 at batch 1: 15.5
tok/s eager, 106 replayed). `width` grows in steps of GRAPH_WIDTH_STEP slots, one capture each, so
that a step reads little more of the cache than it holds.

With weight streaming, one pass over the layers serves the whole batch at each step, and the last
layer's turn already starts copying layer 0 for the next step (eagerly: copies wait on host events).

Sampling uses transformers' logits processors (the classes its `generate` uses on the generic
path), so a GenerationConfig means the same on both paths.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Not cuDNN (the training path's first choice): it builds a new graph for every key length, and the
# cache grows by one slot a step. On an H100 that took 1.6 ms of host time per layer and step, ~40%
# of a decode step at 8B batch 1 (torch profiler). The memory-efficient kernel takes the mask as it
# is; flash attention takes none.
CACHE_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Every layer's keys and values for B rows of at most `max_len` slots."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        # Zeros, not empty: a decode step reads slots not yet written (masked out), and a NaN left in
        # memory would come through the mask (NaN * 0).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.filled = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slots holding real tokens
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # rotary position of each slot
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row so far
        self.max_len = max_len
        self.start = self.end = 0  # slots being written by the current forward
        self.rows = batch  # rows of the current forward: all, or 1 for a prefix every row shares
        self.allowed: torch.Tensor | None = None  # (rows, 1, T, end): which slots each new query sees
        self.grouped: torch.Tensor | None = None  # `allowed` repeated for a kv head's query heads, made once a forward
        # A decode step's slot and the width it attends to (None: the forward is a prefill).
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.width: int | None = None
        self.step_positions: torch.Tensor | None = None  # (B, 1): the rotary position of a step's token

    def extend(self, attention_mask: torch.Tensor | None, new_tokens: int, rows: int | None = None) -> torch.Tensor:
        """Take the next `new_tokens` slots (mask (B, T): 0 for padding); their positions (rows, T).

        `rows=1`: one row of tokens that every row shares (a common prompt prefix), computed once
        and written into every row's slots.
        """
        start, end = self.end, self.end + new_tokens
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; this forward would need {end}")
        batch = self.filled.shape[0]
        mask = (torch.ones(batch, new_tokens, dtype=torch.bool, device=self.filled.device) if attention_mask is None
                else attention_mask.to(self.filled.device, torch.bool).expand(batch, -1))
        self.filled[:, start:end] = mask
        positions = (self.seen[:, None] + mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self.positions[:, start:end] = positions
        self.seen += mask.sum(-1)
        slots = torch.arange(end, device=mask.device)
        queries = torch.arange(start, end, device=mask.device)[:, None]  # (T, 1)
        allowed = self.filled[:, None, :end] & (slots <= queries)  # (B, T, end)
        # A padding query sees no real slot; letting it see itself keeps its (unused) output finite.
        allowed |= slots == queries
        self.rows = rows or batch
        self.start, self.end, self.allowed = start, end, allowed[:self.rows, None]
        self.grouped, self.width = None, None
        return positions[:self.rows]

    def extend_one(self, width: int) -> torch.Tensor:
        """One real token per row at slot `self.slot` (set by the caller), attending to slots [0, width);
        its positions (B, 1). Device operations on fixed shapes only, so a CUDA graph can replay it."""
        positions = self.seen[:, None].clone()
        self.filled.index_fill_(1, self.slot, True)
        self.positions.index_copy_(1, self.slot, positions)
        self.seen += 1
        self.rows, self.width, self.step_positions = self.filled.shape[0], width, positions
        self.allowed = self.filled[:, None, None, :width]  # (B, 1, 1, width): slots past the step's are unfilled
        return positions

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


class LayerCache:
    """One layer's view of the cache, in the place of an AttentionLayout: `attend` stores, then attends."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def attend(self, q, k, v, window: int | None) -> torch.Tensor:
        """q (B, T, Hq, D), k and v (B, T, Hkv, D) of the new tokens -> (B, T, Hq, D) over every slot so far."""
        if self.cache.width is not None:
            return self._attend_one(q, k, v, window)
        cache = self.cache
        start, end, rows = cache.start, cache.end, cache.rows
        keys, values = cache.keys[self.index], cache.values[self.index]
        keys[:, :, start:end] = k.transpose(1, 2)  # one shared row broadcasts to all
        values[:, :, start:end] = v.transpose(1, 2)
        B, T, Hq, D = q.shape
        group = Hq // k.shape[2]
        if window is not None:
            # By position, not slot: padding may sit between a shared prefix and a row's own tokens.
            distance = cache.positions[:rows, start:end, None] - cache.positions[:rows, None, :end]  # (rows, T, end)
            allowed = (cache.allowed & (distance < window)[:, None]).repeat(1, 1, group, 1)
        else:
            if cache.grouped is None:
                cache.grouped = cache.allowed.repeat(1, 1, group, 1)
            allowed = cache.grouped
        # The query heads sharing a kv head become rows of one (group * T)-row query against that
        # head's slots: no copy of the cache per query head.
        q = q.transpose(1, 2).reshape(B, k.shape[2], group * T, D)
        with sdpa_kernel(CACHE_ATTENTION):
            y = F.scaled_dot_product_attention(q, keys[:rows, :, :end], values[:rows, :, :end], attn_mask=allowed)
        return y.reshape(B, Hq, T, D).transpose(1, 2)  # the kernel may return (B, L, H, D) in memory

    def _attend_one(self, q, k, v, window: int | None) -> torch.Tensor:
        """A decode step (KVCache.extend_one): q (B, 1, Hq, D) against the first `width` slots."""
        cache = self.cache
        width, keys, values = cache.width, cache.keys[self.index], cache.values[self.index]
        keys.index_copy_(2, cache.slot, k.transpose(1, 2))
        values.index_copy_(2, cache.slot, v.transpose(1, 2))
        B, _, Hq, D = q.shape
        allowed = cache.allowed  # (B, 1, 1, width): one query row, so every query head shares it as it is
        if window is not None:
            distance = cache.step_positions[:, :, None] - cache.positions[:, None, :width]  # (B, 1, width)
            allowed = allowed & (distance < window)[:, None]
        q = q.transpose(1, 2).reshape(B, k.shape[2], Hq // k.shape[2], D)
        with sdpa_kernel(CACHE_ATTENTION):
            y = F.scaled_dot_product_attention(q, keys[:, :, :width], values[:, :, :width], attn_mask=allowed)
        return y.reshape(B, Hq, 1, D).transpose(1, 2)


# Slots a captured decode step attends to, in multiples of this: one capture per multiple reached.
# Wider reads more of the cache each step (at 8B, batch 16: 2 MB a slot); narrower captures more often
# (each capture takes about two eager steps of host time).
GRAPH_WIDTH_STEP = 256


class DecodeSteps:
    """The steps after the prefill, one token per row each: eager, or replayed from CUDA graphs.

    A graph is captured for each width reached: first one eager step (a real one, which also
    compiles and tunes kernels and allocates workspaces, as capture needs), then the capture, which
    records that step without running it; every later step of that width copies its tokens into the
    graph's input and replays it. All of a call's graphs share one memory pool (captured and
    replayed in the same order, never at once).
    """

    def __init__(self, model, cache: KVCache, cuda_graphs: bool, width_step: int | None = None):
        self.model, self.cache, self.cuda_graphs = model, cache, cuda_graphs
        self.width_step = width_step or (GRAPH_WIDTH_STEP if cuda_graphs else 1)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.tokens: torch.Tensor | None = None  # the graphs' input

    def __call__(self, next_token: torch.Tensor) -> torch.Tensor:
        """next_token (B,) -> the logits (B, V) after it."""
        cache = self.cache
        slot = cache.end
        if slot >= cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens; this step would need {slot + 1}")
        cache.end = slot + 1
        width = min(cache.max_len, -(-(slot + 1) // self.width_step) * self.width_step)
        cache.slot.fill_(slot)
        if not self.cuda_graphs:
            return self.model.decode_step(next_token[:, None], cache, width)
        if self.tokens is None:
            self.tokens = torch.empty_like(next_token[:, None])
        self.tokens.copy_(next_token[:, None])
        if width in self.graphs:
            graph, logits = self.graphs[width]
            graph.replay()
            return logits
        logits = self.model.decode_step(self.tokens, cache, width)
        graph = torch.cuda.CUDAGraph()
        # thread_local: chat streams text from another thread while this one captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            captured = self.model.decode_step(self.tokens, cache, width)
        self.graphs[width] = (graph, captured)
        return logits


def captures_decode_steps(model, device: torch.device) -> bool:
    """CUDA graphs for the decode steps: on a GPU, unless the layers' weights stream from host memory
    (each layer's copy waits on host-side events) or the model asks for eager steps."""
    return (device.type == "cuda" and getattr(model, "cuda_graph_decoding", False)
            and getattr(model.model, "streamer", None) is None)


DEFAULT_NEW_TOKENS = 16  # without max_new_tokens or max_length
# GenerationConfig fields this loop does not implement, with the value that means "off": any other
# value is refused rather than ignored.
UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "min_new_tokens": None,
               "min_length": 0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "constraints": None,
               "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
               "stop_strings": None}  # finetune.generation stops on text itself, for every tokenizer


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, generation_config=None,
             streamer=None, stopping_criteria=None, **kwargs) -> torch.Tensor:
    """transformers' `generate` for the native model: prompt and new ids (B, T + new), finished rows padded.

    Greedy unless `do_sample`; temperature, top_k, top_p and repetition_penalty as transformers
    applies them. A row ends at any of `eos_token_id` or when one of `stopping_criteria` (transformers'
    StoppingCriteria: (ids, scores) -> (B,) bool) says so. `streamer.put` gets the prompt ids
    first, then each step's new ids, as transformers does.
    """
    from transformers import (GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unexpected arguments {sorted(unused)}")
    for name, default in UNSUPPORTED.items():
        if getattr(config, name, None) not in (default, None, []):
            raise ValueError(f"the native model's generate does not support {name}={getattr(config, name)!r}")
    B, T = input_ids.shape
    max_new = (config.max_new_tokens if config.max_new_tokens is not None
               else config.max_length - T if config.max_length is not None else DEFAULT_NEW_TOKENS)
    eos = torch.tensor([] if config.eos_token_id is None else config.eos_token_id, dtype=torch.long,
                       device=input_ids.device).reshape(-1)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))

    cache = model.new_cache(B, T + max_new)
    steps = DecodeSteps(model, cache, captures_decode_steps(model, input_ids.device))
    tokens, unfinished = input_ids, torch.ones(B, dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = prefill(model, input_ids, attention_mask, cache)  # (B, V)
    for step in range(max_new):
        scores = processors(tokens, logits.float())
        next_token = (torch.multinomial(scores.softmax(-1), 1)[:, 0] if config.do_sample
                      else scores.argmax(-1))  # (B,)
        next_token = torch.where(unfinished, next_token, pad)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_token.cpu())
        unfinished &= ~torch.isin(next_token, eos)
        for criterion in stopping_criteria or ():
            unfinished &= ~criterion(tokens, scores).to(unfinished.device)
        if step == max_new - 1 or not bool(unfinished.any()):
            break
        logits = steps(next_token)
    if streamer is not None:
        streamer.end()
    return tokens


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Run the (left-padded) prompts into the cache; the logits (B, V) after each.

    Prompts often start alike (a system prompt, few-shot examples): the longest run of real tokens
    every row starts with is computed once, for all rows, and each row's remainder after it,
    left-padded again. The slots then read [shared prefix | padding | own tokens]; positions
    count real tokens only, so each row computes what it computes alone.
    """
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    shared = shared_prefix_length(input_ids, mask) if B > 1 else 0
    if shared == 0:
        return model.next_token_logits(input_ids, attention_mask, cache)
    lengths = mask.sum(-1)
    first = int(T - lengths[0])  # where row 0's real tokens start
    model.next_token_logits(input_ids[:1, first:first + shared], None, cache, shared=True)
    # Row b's real tokens are its last lengths[b] columns; past the prefix, its last lengths[b] - shared.
    # Columns [shared, T) hold them all, right-aligned, and the original mask shifted by `shared` marks them.
    rest_mask = mask[:, :T - shared]
    rest = torch.where(rest_mask.bool(), input_ids[:, shared:], input_ids[:, :1])
    return model.next_token_logits(rest, rest_mask, cache)


def shared_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many real tokens every left-padded row starts with alike, leaving each row at least one of its own."""
    lengths = mask.sum(-1)
    T, shortest = input_ids.shape[1], int(lengths.min())
    starts = T - lengths  # (B,)
    columns = starts[:, None] + torch.arange(max(shortest - 1, 0), device=input_ids.device)  # (B, shortest - 1)
    aligned = input_ids.gather(1, columns)  # each row's first real tokens, side by side
    differs = (aligned != aligned[:1]).any(0)
    return int(differs.int().argmax()) if bool(differs.any()) else aligned.shape[1]
