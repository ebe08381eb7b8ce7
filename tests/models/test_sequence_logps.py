"""Per-sequence log-probs and the adapter switched off, on both model paths, against transformers'
logits (fp32) and peft's `disable_adapter`."""

import pytest
import torch
from test_native import (CPU, checkpoints, copy_lora_from_peft, generic_model, native_model,  # noqa: F401
                         packed_batch, quantized_base, random_ids, randomize_lora_B, relative_error,
                         transformers_reference)

from finetune.config import LoraConfig
from finetune.models import native


def padded_pairs():
    """Two prompts with chosen and rejected responses: 4 right-padded rows, labels on responses only."""
    prompts = [random_ids(1, 5, seed=40)[0], random_ids(1, 3, seed=41)[0]]
    responses = [random_ids(1, n, seed=50 + n)[0] for n in (4, 7, 2, 6)]  # chosen 0, 1; rejected 0, 1
    rows = [(prompts[i % 2], response) for i, response in enumerate(responses)]
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(4, length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        ids[row, :n] = torch.cat([prompt, response])
        labels[row, len(prompt):n] = response
        mask[row, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def logps_from_logits(logits, labels):
    """The textbook definition: sum over label tokens of log softmax(logits at t - 1)[label_t]."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = labels[:, 1:]
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != -100)).sum(-1), (targets != -100).sum(-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_native_sequence_logps_equal_transformers_logits(family, checkpoints):
    model_dir = checkpoints(family)
    batch = padded_pairs()
    with torch.no_grad():
        logps, counts = native_model(model_dir).eval()(**batch, per_sequence_logps=True)
        logits = transformers_reference(model_dir)(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits
    expected, expected_counts = logps_from_logits(logits, batch["labels"])
    assert torch.equal(counts, expected_counts) and counts.tolist() == [4, 7, 2, 6]
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)


def test_native_and_generic_paths_agree_on_logps_and_their_gradients(checkpoints):
    model_dir = checkpoints("llama")
    generic = generic_model(model_dir)
    randomize_lora_B(generic, seed=3)
    model = native_model(model_dir)
    copy_lora_from_peft(generic, model)
    batch = padded_pairs()
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25])  # any loss of the log-probs
    results = []
    for m in (model, generic):
        logps, counts = m.train()(**batch, per_sequence_logps=True)
        (logps @ weights).backward()
        grads = {name.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p.grad
                 for name, p in m.named_parameters() if p.requires_grad}
        results.append((logps.detach(), counts, grads))
    (native_logps, native_counts, native_grads), (hf_logps, hf_counts, hf_grads) = results
    assert torch.equal(native_counts, hf_counts)
    torch.testing.assert_close(native_logps, hf_logps, rtol=1e-4, atol=1e-3)
    assert native_grads.keys() == hf_grads.keys()
    for name, grad in hf_grads.items():
        assert relative_error(native_grads[name], grad) <= 1e-3, name


def test_packed_samples_give_the_padded_rows_logps(checkpoints):
    model = native_model(checkpoints("llama")).eval()
    samples = [random_ids(1, n, seed=60 + n)[0] for n in (9, 4, 12)]
    packed = packed_batch(samples)
    with torch.no_grad():
        expected = [model(input_ids=s[None], labels=s[None], per_sequence_logps=True) for s in samples]
        with_boundaries = model(**packed, per_sequence_logps=True)
        positions_only = model(**{k: v for k, v in packed.items() if k != "cu_seqlens"}, per_sequence_logps=True)
    for got in (with_boundaries, positions_only):
        torch.testing.assert_close(got.logps, torch.cat([e.logps for e in expected]), rtol=1e-5, atol=1e-4)
        assert got.token_counts.tolist() == [n - 1 for n in (9, 4, 12)]


def test_triton_kernel_gives_the_references_logps_and_gradients(checkpoints):
    """The per-token path of the fused kernel inside the model, on the CPU under Triton's interpreter."""
    from finetune.lora import attach_lora
    from finetune.models.native import triton_ops

    batch = padded_pairs()
    results = []
    for ops in (None, triton_ops()):
        model = native.load_pretrained(checkpoints("llama"), CPU, ops=ops)
        torch.manual_seed(0)
        attach_lora(model, LoraConfig(r=4, lora_alpha=8.0))
        randomize_lora_B(model, seed=1)
        logps = model.train()(**batch, per_sequence_logps=True).logps
        (logps @ torch.tensor([1.0, -1.0, 0.5, 3.0])).backward()
        results.append((logps.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (reference_logps, reference_grads), (kernel_logps, kernel_grads) = results
    torch.testing.assert_close(kernel_logps, reference_logps, rtol=1e-5, atol=1e-4)
    for name, grad in reference_grads.items():
        assert relative_error(kernel_grads[name], grad) <= 1e-4, name


def test_native_adapter_disabled_computes_the_base(checkpoints):
    model_dir = checkpoints("llama")
    model = native_model(model_dir)
    randomize_lora_B(model, seed=5)
    model.train()  # the reference runs under no_grad, whatever the mode
    batch = padded_pairs()
    with torch.no_grad():
        adapted = model(**batch, per_sequence_logps=True).logps
        with model.adapter_disabled():
            base = model(**batch, per_sequence_logps=True).logps
        again = model(**batch, per_sequence_logps=True).logps
        logits = transformers_reference(model_dir)(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(base, logps_from_logits(logits, batch["labels"])[0], rtol=1e-5, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-2  # the adapter does change them
    assert torch.equal(again, adapted)  # and is back afterwards


def test_generic_adapter_disabled_computes_the_base(checkpoints):
    model_dir = checkpoints("llama")
    model = generic_model(model_dir)
    randomize_lora_B(model, seed=6)
    batch = padded_pairs()
    with torch.no_grad():
        adapted = model.eval()(**batch, per_sequence_logps=True).logps
        with model.adapter_disabled():
            base = model(**batch, per_sequence_logps=True).logps
        logits = quantized_base(model_dir).eval()(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(base, logps_from_logits(logits, batch["labels"])[0], rtol=1e-5, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-2
