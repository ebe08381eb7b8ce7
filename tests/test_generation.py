"""Generation: the native path's KV-cached decoding against its own no-cache forward and against
transformers, sampling against the formulas written here, stop rules, streaming, and the same
front (finetune.generation) over the generic path."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from finetune.generation import chat_replies, generate_ids, generate_texts, stream_reply
from finetune.sampling import Sampling
from test_native import (COMMON, bf16_config, checkpoints, copy_lora_from_peft, cuda, generic_model,  # noqa: F401
                         native_model, random_ids, relative_error, transformers_reference)

NATIVE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]  # rope scaling, sliding window, biases, q/k norms


pytestmark = pytest.mark.usefixtures("one_thread")


def with_adapter(model, seed: int = 0):
    """Give every LoRA B (ours, or peft's) non-zero values, so that the adapter changes what the model computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def prompts(*lengths: int) -> list[list[int]]:
    return [random_ids(1, n, seed=n)[0].tolist() for n in lengths]


# ---------------------------------------------------------------- the cache computes what the full forward does

def assert_cached_logits_match_the_full_forward(model, tolerance: float, steps: int = 10, device=torch.device("cpu"),
                                                cuda_graphs: bool = False, width_step: int | None = None):
    """Prefill two left-padded prompts, then decode step by step (decoding.DecodeSteps, as generate
    does), each step's logits against the no-cache forward over the whole text so far."""
    from finetune.models.native.decoding import DecodeSteps

    ids, mask = (t.to(device) for t in left_padded(prompts(9, 5)))  # the second row left-padded by 4
    with torch.no_grad():
        cache = model.new_cache(2, ids.shape[1] + steps)
        decode = DecodeSteps(model, cache, cuda_graphs, width_step)
        cached = model.next_token_logits(ids, mask, cache)
        for _ in range(steps):
            full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            assert relative_error(cached, full) <= tolerance
            next_token = full.argmax(-1)[:, None]
            ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
            cached = decode(next_token[:, 0])


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_cached_logits_equal_the_full_forward_at_every_step(checkpoints, family):
    # 19 tokens: past Mistral's window of 8.
    assert_cached_logits_match_the_full_forward(with_adapter(native_model(checkpoints(family))), 1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_fixed_width_decode_steps_ignore_the_slots_not_yet_filled(checkpoints, family):
    """The steps CUDA graphs replay attend to a fixed number of slots (widths 16, then all 19 here),
    most of them not written yet; the mask must keep them out, the window too (Mistral's 8)."""
    assert_cached_logits_match_the_full_forward(with_adapter(native_model(checkpoints(family))), 1e-5, width_step=8)


def test_cache_attention_keeps_cudnn_out(checkpoints, monkeypatch):
    # cuDNN builds a graph for every new key length, one a step as the cache grows (1.6 ms of host
    # time per layer and step on an H100): decoding must not reach it. The flag is global state
    # that the CPU can read, while the backend itself only exists on a GPU.
    from finetune.models.native import decoding

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    model = native_model(checkpoints("llama"))
    monkeypatch.setattr(decoding, "F", SimpleNamespace(scaled_dot_product_attention=attention))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert_cached_logits_match_the_full_forward(model, 1e-5, steps=2)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the training path's choice is left as it was


# bf16 keeps 8 significant bits (relative rounding up to 2^-9 ~ 0.2% a value). The cached and full
# forwards round at different places (attention over cache slots against a masked square matrix, a
# one-token GEMM against a longer one, whose reductions are blocked differently), and two layers of
# residual stream compound such differences: a few roundings' worth of the largest logit (measured
# 0.5% to 2.2% on these models over draws of their LoRA A, on the CPU and on an H100, where a decode
# step multiplies by the 4-bit codes in bitsandbytes' fused kernel rather than dequantize + cuBLAS).
# 3% bounds them, while a wrong position or mask errs by far more (fp32 holds 1e-5).
BF16_TOLERANCE = 3e-2


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_cached_logits_in_bf16(checkpoints, family):
    model_dir = checkpoints(family)
    torch.manual_seed(0)  # LoRA A's draw: the bf16 differences depend on it
    model = native_model(model_dir, bf16_config(model_dir), compute_dtype=torch.bfloat16)
    assert_cached_logits_match_the_full_forward(with_adapter(model), BF16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_gpu_cached_logits_with_the_kernels_in_bf16(checkpoints, cuda, family):
    model_dir = checkpoints(family)
    torch.manual_seed(0)  # LoRA A's draw: the bf16 differences depend on it
    model = native_model(model_dir, bf16_config(model_dir), device=cuda, compute_dtype=torch.bfloat16)
    assert_cached_logits_match_the_full_forward(with_adapter(model), BF16_TOLERANCE, device=cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gpu_decode_steps_replayed_from_cuda_graphs_compute_the_full_forward(checkpoints, cuda, family):
    # Widths 16 then 19: a capture each, the replays in between. The graphs' logits against the
    # full forward's at every step, with BF16_TOLERANCE's reasoning.
    model_dir = checkpoints(family)
    torch.manual_seed(0)
    model = native_model(model_dir, bf16_config(model_dir), device=cuda, compute_dtype=torch.bfloat16)
    assert_cached_logits_match_the_full_forward(with_adapter(model), BF16_TOLERANCE, device=cuda, cuda_graphs=True,
                                                width_step=8)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 12])  # 12 rows: past the fused 4-bit kernel's, dequantized weights
def test_gpu_generate_with_cuda_graphs_gives_the_eager_tokens(checkpoints, cuda, rows, monkeypatch):
    from finetune.models.native import decoding

    monkeypatch.setattr(decoding, "GRAPH_WIDTH_STEP", 16)  # four captures in 40 tokens, replays between
    model_dir = checkpoints("llama")
    torch.manual_seed(0)
    model = with_adapter(native_model(model_dir, bf16_config(model_dir), device=cuda, compute_dtype=torch.bfloat16))
    ids, mask = (t.to(cuda) for t in left_padded(prompts(*range(3, 3 + rows))))
    config = GenerationConfig(max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert model.cuda_graph_decoding
    graphed = model.generate(ids, mask, generation_config=config)
    model.cuda_graph_decoding = False
    eager = model.generate(ids, mask, generation_config=config)
    assert torch.equal(graphed, eager)


def test_generic_cached_logits_equal_the_full_forward_at_every_step(checkpoints):
    model = generic_model(checkpoints("llama")).eval()
    with_adapter(model)
    ids, mask = left_padded(prompts(9, 5))
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, output_logits=True,
                             return_dict_in_generate=True)
        for step, cached in enumerate(out.logits):
            prefix = out.sequences[:, :ids.shape[1] + step]
            prefix_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1)
            full = model(input_ids=prefix, attention_mask=prefix_mask).logits[:, -1]
            assert relative_error(cached, full) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_shared_prompt_prefix_is_computed_once_and_changes_nothing(checkpoints, family):
    """Rows starting alike (a system prompt) share one prefill of that prefix; the slots then hold
    padding between it and a shorter row's own tokens, which positions and Mistral's window skip."""
    from finetune.models.native.decoding import prefill

    model = with_adapter(native_model(checkpoints(family)))
    common = prompts(6)[0]
    batch = [common + tail for tail in prompts(2, 5, 3)]
    ids, mask = left_padded(batch)
    calls = []
    original = model.next_token_logits
    model.next_token_logits = lambda ids, *rest, **kw: calls.append(tuple(ids.shape)) or original(ids, *rest, **kw)
    with torch.no_grad():
        logits = prefill(model, ids, mask, model.new_cache(3, ids.shape[1] + 12))
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert calls == [(1, 6), (3, 5)]  # the common prefix once, then each row's own tokens, left-padded
    assert relative_error(logits, full) <= 1e-5
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0)  # 21 tokens: past the window
    together = model.generate(ids, mask, generation_config=config)[:, ids.shape[1]:]
    for row, prompt in enumerate(batch):
        alone = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):]
        assert torch.equal(together[row], alone)


def test_few_token_rows_multiply_the_4bit_weights_directly_and_compute_what_training_does(checkpoints, monkeypatch):
    import bitsandbytes as bnb

    model = with_adapter(native_model(checkpoints("qwen2")))  # q/k/v biases too
    ids = random_ids(1, 6)  # 6 token rows: a decoding step's size
    with torch.enable_grad():
        expected = model(input_ids=ids).logits.detach()  # the training path: [x | xa] [W | S]^T
    calls = []
    fused = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    with torch.no_grad():
        actual = model(input_ids=ids).logits
    assert len(calls) == 7 * COMMON["num_hidden_layers"]
    assert relative_error(actual, expected) <= 1e-5


# ---------------------------------------------------------------- tokens: batching, transformers, adapters

def test_left_padded_batch_gives_each_prompt_the_tokens_it_gets_alone(checkpoints):
    model = with_adapter(native_model(checkpoints("qwen2")))
    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batch = prompts(3, 9, 6)
    ids, mask = left_padded(batch)
    together = model.generate(ids, mask, generation_config=config)[:, ids.shape[1]:]
    for row, prompt in enumerate(batch):
        alone = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):]
        assert torch.equal(together[row], alone)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_greedy_equals_transformers_greedy_on_the_same_weights(checkpoints, family):
    model_dir = checkpoints(family)
    ids, mask = left_padded(prompts(7, 4))
    # Token 2 (the checkpoints' EOS) ends the llama rows early: the rows must stop alike too.
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2)
    expected = transformers_reference(model_dir).generate(input_ids=ids, attention_mask=mask,
                                                          generation_config=config)
    actual = native_model(model_dir).eval().generate(ids, mask, generation_config=config)
    assert torch.equal(actual, expected)


def test_native_greedy_with_an_adapter_equals_peft_generate(checkpoints):
    model_dir = checkpoints("llama")
    generic = with_adapter(generic_model(model_dir))
    native = native_model(model_dir).eval()
    copy_lora_from_peft(generic, native)
    ids, mask = left_padded(prompts(7, 4))
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2)
    expected = generic.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(native.generate(ids, mask, generation_config=config), expected)
    # And the adapter matters: the base alone continues differently.
    with torch.no_grad():
        for module in native.modules():
            if getattr(module, "lora_B", None) is not None:
                module.lora_B.zero_()
    assert not torch.equal(native.generate(ids, mask, generation_config=config), expected)


def test_eos_ends_a_row_and_pads_it_while_others_go_on(checkpoints):
    model = with_adapter(native_model(checkpoints("llama")))
    ids, mask = left_padded(prompts(7, 4))
    free = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0)[:, ids.shape[1]:].tolist()
    # A token that row 0 makes first at step k > 0 and row 1 never makes.
    k = next(k for k in range(1, 8) if free[0][k] not in free[0][:k] + free[1])
    eos = free[0][k]
    stopped = model.generate(ids, mask, max_new_tokens=8, pad_token_id=299, eos_token_id=[eos])[:, ids.shape[1]:]
    assert stopped[0].tolist() == free[0][:k + 1] + [299] * (7 - k)
    assert stopped[1].tolist() == free[1]
    # Once every row has finished, decoding stops.
    both = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=[eos, free[1][0]])
    assert both.shape[1] == ids.shape[1] + k + 1


# ---------------------------------------------------------------- sampling, against its formulas

def first_token_distribution(model, prompt: list[int], rows: int, **sampling) -> torch.Tensor:
    """Empirical distribution of the first sampled token over `rows` copies of one prompt."""
    ids = torch.tensor([prompt]).expand(rows, -1)
    torch.manual_seed(0)
    tokens = model.generate(ids, max_new_tokens=1, do_sample=True, **sampling)[:, -1]
    return torch.bincount(tokens, minlength=COMMON["vocab_size"]).float() / rows


def expected_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / T), restricted to the k most likely tokens and then to the smallest set of
    most likely tokens whose probability reaches top_p, renormalized."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept = order[:top_k] if top_k else order
    mass = probs[kept] / probs[kept].sum()
    needed = int((mass.cumsum(0) < top_p).sum()) + 1  # the token that reaches top_p is kept
    keep[kept[:needed]] = True
    probs = torch.where(keep, probs, 0)
    return (probs / probs.sum()).float()


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(temperature=1.5, top_k=4),
                                      dict(temperature=1.0, top_p=0.6), dict(temperature=2.0, top_k=10, top_p=0.5)])
def test_sampling_follows_temperature_top_k_and_top_p(checkpoints, sampling):
    model = with_adapter(native_model(checkpoints("llama")))
    prompt = prompts(6)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    draws = 20000
    expected = expected_distribution(logits, **sampling)
    seen = first_token_distribution(model, prompt, draws, **sampling)
    assert bool((seen[expected == 0] == 0).all()), "sampled a token outside top-k / top-p"
    # Total variation against its expectation under exact sampling: each token's count is binomial,
    # off by sqrt(2 / pi) standard deviations on average. Twice that leaves room for chance only.
    chance = 0.5 * ((expected * (1 - expected) / draws).sqrt() * (2 / torch.pi) ** 0.5).sum()
    assert 0.5 * (seen - expected).abs().sum() < 2 * chance + 1e-3


def test_repetition_penalty_follows_its_formula(checkpoints):
    """Each step: a token already in the sequence has its logit divided by the penalty if positive,
    multiplied if negative (CTRL's rule, as transformers applies it); then greedy."""
    model = with_adapter(native_model(checkpoints("llama")))
    penalty, prompt = 1.8, torch.tensor([prompts(6)[0]])
    tokens = prompt
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=tokens).logits[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[tokens[0]] = True
            penalized = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
            tokens = torch.cat([tokens, penalized.argmax().view(1, 1)], 1)
    actual = model.generate(prompt, max_new_tokens=8, repetition_penalty=penalty)
    assert torch.equal(actual, tokens)
    assert not torch.equal(model.generate(prompt, max_new_tokens=8), tokens)


@pytest.fixture(scope="module")
def demo(demo_base):
    """The demo's tiny base and tokenizer on the native path, with a random adapter."""
    return with_adapter(native_model(demo_base)), AutoTokenizer.from_pretrained(demo_base)


QUESTIONS = ["Where does the frog live?", "What sound does the owl make?", "Name the cow's colour."]


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(demo):
    model, tokenizer = demo
    hot = Sampling(max_new_tokens=12, temperature=1.5, seed=7)
    first = generate_texts(model, tokenizer, QUESTIONS, hot)
    torch.manual_seed(123)
    outside = torch.rand(3)
    assert generate_texts(model, tokenizer, QUESTIONS, hot) == first
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), outside), "a seeded call disturbed the caller's random state"
    assert generate_texts(model, tokenizer, QUESTIONS, Sampling(max_new_tokens=12, temperature=1.5, seed=8)) != first
    greedy = generate_texts(model, tokenizer, QUESTIONS, Sampling(max_new_tokens=12))
    assert generate_texts(model, tokenizer, QUESTIONS, Sampling(max_new_tokens=12, temperature=1.5, top_k=1,
                                                                seed=7)) == greedy


def test_stop_strings_end_generation_and_cut_the_text(demo):
    model, tokenizer = demo
    sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=0)  # varied text; the seed repeats it
    free = generate_texts(model, tokenizer, QUESTIONS[:1], sampling)[0]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip() and free.find(stop) > 0
    stopping = replace(sampling, stop=(stop, "a stop string never generated"))
    assert generate_texts(model, tokenizer, QUESTIONS[:1], stopping)[0] == free[:free.find(stop)]
    ids = generate_ids(model, tokenizer, [tokenizer(QUESTIONS[0])["input_ids"]], stopping)[0]
    assert len(ids) < 16 and stop in tokenizer.decode(ids)  # it stopped at the stop string


def test_batched_texts_come_back_in_the_prompts_order(demo):
    model, tokenizer = demo
    alone = [generate_texts(model, tokenizer, [q], Sampling(max_new_tokens=6))[0] for q in QUESTIONS]
    assert generate_texts(model, tokenizer, QUESTIONS, Sampling(max_new_tokens=6), batch_size=2) == alone


def test_streamed_reply_is_the_reply(demo):
    model, tokenizer = demo
    conversation = [{"role": "user", "content": QUESTIONS[0]}]
    sampling = Sampling(max_new_tokens=24, temperature=1.0, seed=0)  # varied text, which streams in words
    pieces = list(stream_reply(model, tokenizer, conversation, sampling))
    assert len(pieces) > 3
    assert "".join(pieces).strip() == chat_replies(model, tokenizer, [conversation], sampling)[0]


def test_generic_path_gives_the_native_texts_through_the_same_front(demo_base):
    tokenizer = AutoTokenizer.from_pretrained(demo_base)
    generic = with_adapter(generic_model(demo_base))
    native = native_model(demo_base).eval()
    copy_lora_from_peft(generic, native)
    for sampling in (Sampling(max_new_tokens=8, repetition_penalty=1.3),
                     # Both draw with torch.multinomial from the same seeded generator, after the same
                     # processors: the same seed samples the same tokens.
                     Sampling(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=5)):
        assert generate_texts(generic, tokenizer, QUESTIONS, sampling) == generate_texts(native, tokenizer,
                                                                                         QUESTIONS, sampling)


def test_streamed_layer_weights_generate_the_same_tokens(checkpoints):
    """What weight streaming does to a layer (its buffers become views into one packed buffer that
    is pointed at a copy) leaves decoding unchanged; the GPU test below streams for real."""
    from finetune.models.native.streaming import LayerWeights

    model = with_adapter(native_model(checkpoints("qwen2")))
    ids, mask = left_padded(prompts(7, 4))
    before = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    for layer in model.model.layers:
        weights = LayerWeights(layer, pin=False)
        weights.point_to(weights.host.clone())
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8, pad_token_id=0), before)


@pytest.mark.gpu
def test_gpu_streamed_weights_generate_what_resident_weights_do(checkpoints, cuda):
    from finetune.models import native
    from finetune.models.source import ModelSource

    model_dir = checkpoints("qwen2")
    ids, mask = (t.to(cuda) for t in left_padded(prompts(7, 4)))
    outputs = []
    for stream in (False, True):
        torch.manual_seed(0)
        model = native.build(bf16_config(model_dir), ModelSource.from_directory(model_dir), torch.bfloat16, cuda,
                             layout=native.MemoryLayout(stream_weights=stream))
        with_adapter(model)
        if stream:
            assert model.model.streamer is not None
        outputs.append(model.generate(ids, mask, max_new_tokens=12, pad_token_id=0))
    assert torch.equal(outputs[1], outputs[0])


def test_bench_generate_smoke_mode_runs_both_sides_to_the_same_tokens():
    """scripts/bench_generate.py's tiny CPU mode (the GPU comparison itself is run by hand: README)."""
    import subprocess
    import sys

    from runner import REPO

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_generate.py"), "--smoke"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0
        # Token agreement is reported, not required: a random model with N(0, 0.02) weights has
        # near-flat logits, whose ties the two paths' last-bit differences break either way (the
        # tests above hold the paths to the same tokens on checkpoints with decisive logits).
        assert cells[4].endswith("%")
