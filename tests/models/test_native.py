"""The native Llama-family decoder against transformers' modeling code and the generic (peft) path.

Every supported family is built tiny and random, saved in HF format, and loaded the way users'
checkpoints are. The helpers here are shared by the other test_native_* modules.
"""

import re

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from finetune.config import ConfigError, Dtype, LoraConfig, ModelConfig, ModelImpl, QuantConfig, RunConfig
from finetune.models import MemoryLayout, choose_impl, hf, native
from finetune.models.source import ModelSource

CPU = torch.device("cpu")
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    # Llama 3.1-style context scaling, with an original context shorter than the test sequences.
    "llama": ("LlamaConfig", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=16))),
    # A window shorter than the sequences, so it actually masks.
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict()),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(head_dim=32)),  # per-head q/k RMSNorm, head_dim != hidden / heads
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),  # Llama 3.2 1B/3B style
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def make_checkpoint(family: str, directory, max_shard_size=None, seed: int = 0, **overrides):
    """A random model of `family` saved in HF format; every tensor random (norms and biases too)."""
    import transformers

    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(std=0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


_CHECKPOINTS = {}  # one per family and session, whichever test module asks first


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> checkpoint directory, made on first use (import this fixture to share it)."""

    def get(family: str):
        if family not in _CHECKPOINTS:
            _CHECKPOINTS[family] = make_checkpoint(family, tmp_path_factory.mktemp(family))
        return _CHECKPOINTS[family]

    return get


def run_config(model_dir, impl: str = "native", torch_dtype: str = "float32", **lora) -> RunConfig:
    return RunConfig(
        name="test", output_dir="unused",
        model=ModelConfig(name_or_path=str(model_dir), impl=ModelImpl(impl), gradient_checkpointing=False),
        quant=QuantConfig(bnb_4bit_compute_dtype=Dtype.float32, torch_dtype=Dtype(torch_dtype)),
        lora=LoraConfig(**{"r": 8, "lora_alpha": 16.0, **lora}),
    )


def native_model(model_dir, cfg=None, device=CPU, compute_dtype=torch.float32):
    cfg = cfg or run_config(model_dir)
    # As the memory plan settles it when model.offload_checkpoints=true (decide_memory_layout).
    layout = MemoryLayout(park_checkpoints=cfg.model.offload_checkpoints)
    return native.build(cfg, ModelSource.from_directory(model_dir), compute_dtype, device, layout)


def quantized_base(model_dir, cfg=None, device=CPU, compute_dtype=torch.float32):
    """The generic path's 4-bit transformers model, without adapters."""
    cfg = cfg or run_config(model_dir, impl="hf")
    return hf.load_quantized_base(ModelSource.from_directory(model_dir), cfg.model, cfg.quant, compute_dtype, device)


def generic_model(model_dir, cfg=None, device=CPU, compute_dtype=torch.float32):
    cfg = cfg or run_config(model_dir, impl="hf")
    return hf.attach_lora(quantized_base(model_dir, cfg, device, compute_dtype), cfg.lora,
                          cfg.model.gradient_checkpointing)


def copy_lora_from_peft(peft_model, model) -> None:
    """Give the native model the generic model's adapter weights, tensor for tensor."""
    import peft

    layers = {name: layer for name, layer in model.named_modules() if getattr(layer, "lora_A", None) is not None}
    state = peft.get_peft_model_state_dict(peft_model)
    assert len(state) == 2 * len(layers)
    with torch.no_grad():
        for key, tensor in state.items():
            module, which = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])\.weight", key).groups()
            getattr(layers[module], which).copy_(tensor)


def transformers_reference(model_dir):
    """transformers' own fp32 model with each linear weight replaced by dequant(NF4(W)), as stored natively."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=64,
                                                             compress_statistics=True, quant_type="nf4")
                module.weight.copy_(bnb_functional.dequantize_4bit(packed, state, quant_type="nf4"))
    return model


def randomize_lora_B(model, seed: int, std: float = 0.1) -> None:
    """Non-trivial adapters, as after training (B starts at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_modeling_code(family, checkpoints):
    model_dir = checkpoints(family)
    model = native_model(model_dir).eval()
    reference = transformers_reference(model_dir)
    ids = random_ids(2, 24)
    with torch.no_grad():
        assert relative_error(model(input_ids=ids).logits, reference(input_ids=ids).logits) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_logits_match_the_generic_path(family, checkpoints):
    model_dir = checkpoints(family)
    ids = random_ids(2, 20, seed=2)
    with torch.no_grad():
        expected = generic_model(model_dir).eval()(input_ids=ids).logits
        assert relative_error(native_model(model_dir).eval()(input_ids=ids).logits, expected) <= 1e-3


def test_loss_is_summed_token_ce_over_num_items_with_the_hf_shift(checkpoints):
    model = native_model(checkpoints("llama")).eval()
    ids = random_ids(2, 16, seed=3)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=7).loss
        mean = model(input_ids=ids, labels=labels).loss
    token_ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 reduction="none")
    torch.testing.assert_close(loss, token_ce.sum() / 7)
    torch.testing.assert_close(mean, token_ce.sum() / (labels[:, 1:] != -100).sum())


def test_right_padding_matches_each_sample_alone(checkpoints):
    model = native_model(checkpoints("qwen3")).eval()
    lengths = [11, 6, 9]
    samples = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)], mask[row, :len(sample)] = sample, 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        padded_loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1).loss
        alone = [model(input_ids=s[None]).logits[0] for s in samples]
        alone_loss = sum(model(input_ids=s[None], labels=s[None], num_items_in_batch=1).loss for s in samples)
    for row, expected in enumerate(alone):
        assert relative_error(padded[row, :lengths[row]], expected) <= 1e-5
    torch.testing.assert_close(padded_loss, alone_loss)


def packed_batch(samples):
    lengths = [len(s) for s in samples]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.cat(samples).clone()
    labels[cu_seqlens[:-1].long()] = -100  # the data pipeline's convention: no target across a boundary
    return dict(input_ids=torch.cat(samples)[None], labels=labels[None],
                position_ids=torch.cat([torch.arange(n) for n in lengths])[None], cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids"])
@pytest.mark.parametrize("lengths", [(12, 5, 15), (9, 9, 9)], ids=["mixed", "equal"])
def test_packed_rows_equal_samples_run_one_by_one(family, boundaries, lengths, checkpoints):
    from finetune.models.native.model import plan_attention

    model = native_model(checkpoints(family)).eval()
    samples = [random_ids(1, n, seed=20 + n + i)[0] for i, n in enumerate(lengths)]
    batch = packed_batch(samples)
    if boundaries == "cu_seqlens" and len(set(lengths)) == 1:
        # Samples of one length that fill the row are attended as rows of their own.
        layout = plan_attention(batch["input_ids"], None, None, batch["cu_seqlens"], use_varlen=True)[1]
        assert layout.equal_samples == len(lengths)
    if boundaries == "position_ids":
        del batch["cu_seqlens"]  # transformers' convention: restarting positions mark the samples
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed_logits = model(**inputs).logits[0]
        packed_loss = model(**batch, num_items_in_batch=1).loss
        alone_loss = sum(model(input_ids=s[None], labels=s[None], num_items_in_batch=1).loss for s in samples)
        start = 0
        for sample in samples:
            expected = model(input_ids=sample[None]).logits[0]
            assert relative_error(packed_logits[start:start + len(sample)], expected) <= 1e-5
            start += len(sample)
    torch.testing.assert_close(packed_loss, alone_loss)


def test_greedy_generation_matches_the_generic_path(checkpoints):
    model_dir = checkpoints("llama")
    prompt = random_ids(1, 7, seed=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
    expected = generic_model(model_dir).eval().generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                         **kwargs)
    actual = native_model(model_dir).eval().generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                     **kwargs)
    assert torch.equal(actual, expected)


def test_only_lora_weights_train_and_linear_weights_take_under_a_byte(checkpoints):
    from finetune.lora import linear_layers

    model = native_model(checkpoints("llama"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert len(trainable) == 2 * 7 * COMMON["num_hidden_layers"]  # all-linear: 7 projections a layer
    unquantized = sum(p.numel() * p.element_size() for p in model.parameters())  # embeddings, head, norms, LoRA
    linear_weights = sum(layer.weight.numel for layer in linear_layers(model).values())
    assert model.memory_footprint() < unquantized + linear_weights


def test_auto_picks_native_for_the_llama_family_and_hf_otherwise(checkpoints, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def pick(directory, **settings):
        return choose_impl(run_config(directory, **settings), ModelSource.from_directory(directory))

    llama = checkpoints("llama")
    assert pick(llama, impl="auto")[0] is ModelImpl.native
    impl, why = pick(llama, impl="auto", use_dora=True)
    assert impl is ModelImpl.hf and "DoRA" in why
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    impl, why = pick(tmp_path / "gpt2", impl="auto")
    assert impl is ModelImpl.hf and "gpt2" in why
    with pytest.raises(ConfigError, match="model.impl=native cannot run"):
        pick(tmp_path / "gpt2")


def test_dora_is_refused_on_the_native_path(checkpoints):
    with pytest.raises(ConfigError, match="use_dora"):
        native_model(checkpoints("llama"), run_config(checkpoints("llama"), use_dora=True))


def test_offloading_needs_gradient_checkpointing(checkpoints):
    cfg = run_config(checkpoints("llama"))
    cfg.model.offload_checkpoints = True
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        cfg.validate()


def test_triton_kernels_train_like_the_references(checkpoints):
    """The kernel set's wiring (argument layouts, loss convention), on the CPU under Triton's interpreter
    (tests/conftest.py turns it on before anything imports triton)."""
    from finetune.lora import attach_lora
    from finetune.models.native import triton_ops

    model_dir = checkpoints("qwen3")
    models = []
    for ops in (None, triton_ops()):
        model = native.load_pretrained(model_dir, CPU, ops=ops)
        torch.manual_seed(0)
        attach_lora(model, LoraConfig(r=4, lora_alpha=8.0))
        randomize_lora_B(model, seed=1)
        models.append(model.train())
    ids = random_ids(2, 12, seed=8)
    labels = ids.masked_fill(ids < 50, -100)
    for model in models:
        model(input_ids=ids, labels=labels, num_items_in_batch=17).loss.backward()
    reference, kernels = ({n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models)
    for name, grad in reference.items():
        assert relative_error(kernels[name], grad) <= 1e-4, name
    with torch.no_grad():
        assert relative_error(models[1].eval()(input_ids=ids).logits, models[0].eval()(input_ids=ids).logits) <= 1e-5


# ---- on the GPU machine: the same parity in bf16, with the Triton kernels and the varlen path ----

@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    return torch.device("cuda")


def bf16_config(model_dir, impl="native", **model_overrides):
    cfg = run_config(model_dir, impl=impl, torch_dtype="bfloat16")
    cfg.quant.bnb_4bit_compute_dtype = Dtype.bfloat16
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    return cfg


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_bf16_kernels_match_references_and_the_generic_path(family, checkpoints, cuda):
    model_dir = checkpoints(family)
    ids = random_ids(2, 32, seed=5).to(cuda)
    labels = ids.clone()
    with torch.no_grad():
        kernels = native_model(model_dir, bf16_config(model_dir), cuda, torch.bfloat16).eval()
        plain = native_model(model_dir, bf16_config(model_dir, use_kernels=False), cuda, torch.bfloat16).eval()
        generic = generic_model(model_dir, bf16_config(model_dir, impl="hf"), cuda, torch.bfloat16).eval()
        expected = generic(input_ids=ids).logits
        assert relative_error(plain(input_ids=ids).logits, expected) <= 2e-2
        assert relative_error(kernels(input_ids=ids).logits, expected) <= 2e-2
        loss = kernels(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(loss, generic(input_ids=ids, labels=labels).loss.float(), rtol=1e-2, atol=0)


@pytest.mark.gpu
def test_gpu_nf4_kernel_dequantizes_bit_exactly(checkpoints, cuda):
    from finetune.quant import dequantize_bnb, dequantize_triton

    model = native_model(checkpoints("qwen2"), bf16_config(checkpoints("qwen2")), cuda, torch.bfloat16)
    for layer in model.model.layers[0].modules():
        if hasattr(layer, "lora_A"):
            assert torch.equal(dequantize_triton(layer.weight), dequantize_bnb(layer.weight))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gpu_varlen_packed_rows_equal_samples_one_by_one(family, checkpoints, cuda):
    model_dir = checkpoints(family)
    model = native_model(model_dir, bf16_config(model_dir), cuda, torch.bfloat16).eval()
    samples = [random_ids(1, n, seed=30 + n)[0].to(cuda) for n in (40, 9, 23)]
    batch = {k: v.to(cuda) for k, v in packed_batch(samples).items()}
    with torch.no_grad():
        packed = model(**batch, num_items_in_batch=1).loss
        alone = sum(model(input_ids=s[None], labels=s[None], num_items_in_batch=1).loss for s in samples)
    torch.testing.assert_close(packed, alone, rtol=1e-2, atol=0)
