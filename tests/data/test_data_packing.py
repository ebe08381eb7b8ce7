"""Packed micro-batches are exactly equivalent to running their samples one by one: same loss,
and no sample sees another (checked on a tiny fp32 Llama through transformers' own masking)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.config import DataConfig
from finetune.data import (IGNORE_INDEX, Sample, TokenizedSplit, collate, collate_packed, count_tokens, model_inputs,
                           train_batches)
from finetune.data.batches import pack

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=request.param)
    model = LlamaForCausalLM(config).float()
    model.train()  # training mode is where transformers would otherwise keep a KV cache
    return model


def random_samples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        ids = torch.randint(0, 64, (length,), generator=generator).tolist()
        # Mask a random prompt-like prefix, as chat samples have.
        prompt = int(torch.randint(0, length - 1, (1,), generator=generator))
        samples.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], []))
    return samples


def targets(batch) -> int:
    # What the training loop normalizes by: labels that some position predicts.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_packed_layout_restarts_positions_and_masks_each_first_label():
    batch = collate_packed(random_samples([3, 5, 2]))
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 3, 8, 10]
    assert batch["labels"][0, [0, 3, 8]].tolist() == [IGNORE_INDEX] * 3
    assert "attention_mask" not in batch and count_tokens(batch) == 10


def test_boundaries_go_only_to_models_that_take_them():
    batch = collate_packed(random_samples([3, 5]))
    without = model_inputs(batch, CPU, packed_boundaries=False)
    assert "cu_seqlens" not in without and without["use_cache"] is False
    taken = model_inputs(batch, CPU, packed_boundaries=True)["cu_seqlens"]
    # Left in host memory: the native model reads the longest sample there without a GPU sync.
    assert taken.tolist() == [0, 3, 8] and taken.device.type == "cpu"
    # A padded batch has no boundaries to give, whichever model takes it.
    padded = model_inputs(collate(random_samples([3, 5]), pad_id=0), CPU, packed_boundaries=True)
    assert "cu_seqlens" not in padded and padded["attention_mask"].shape == (2, 5)


def test_packed_loss_equals_the_token_mean_over_samples_run_one_by_one(model):
    samples = random_samples([7, 12, 3, 9, 20])
    packed = collate_packed(samples)
    loss = model(**model_inputs(packed, CPU, packed_boundaries=False), num_items_in_batch=targets(packed)).loss
    summed = 0.0
    for sample in samples:
        alone = collate_packed([sample])
        # num_items_in_batch=1 returns the summed token loss.
        summed += model(**model_inputs(alone, CPU, packed_boundaries=False), num_items_in_batch=1).loss
    assert targets(packed) == sum(targets(collate_packed([s])) for s in samples)
    torch.testing.assert_close(loss, summed / targets(packed), rtol=1e-6, atol=1e-6)


def test_a_sample_never_changes_its_neighbours_logits(model):
    samples = random_samples([6, 10, 8])
    changed = [samples[0], Sample([(i + 1) % 64 for i in samples[1].input_ids], samples[1].labels, []), samples[2]]
    with torch.no_grad():
        before = model(**model_inputs(collate_packed(samples), CPU, packed_boundaries=False)).logits[0]
        after = model(**model_inputs(collate_packed(changed), CPU, packed_boundaries=False)).logits[0]
    unchanged = torch.cat([torch.arange(0, 6), torch.arange(16, 24)])
    torch.testing.assert_close(after[unchanged], before[unchanged], rtol=0, atol=0)
    assert not torch.equal(after[6:16], before[6:16])


def test_best_fit_decreasing_fills_bins_without_overflow_or_loss():
    lengths = np.random.default_rng(0).integers(1, 100, size=500)
    bins = pack(lengths, 256, np.random.default_rng(1).permutation(500))
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[b]) <= 256 for b in bins)
    assert sum(lengths) / (256 * len(bins)) > 0.95


def test_packed_train_batches_cover_an_epoch_within_the_token_budget():
    from datasets import Dataset

    samples = random_samples(np.random.default_rng(0).integers(2, 16, size=40).tolist())
    split = TokenizedSplit(Dataset.from_dict({
        "input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples],
        "messages": ["[]"] * len(samples), "length": [len(s.input_ids) for s in samples]}))
    data = DataConfig(path="unused", packing=True, max_seq_len=16)
    batches = train_batches(split, data, micro_batch_size=2, pad_id=0, seed=0)
    seen, epoch_tokens = [], sum(len(s.input_ids) for s in samples)
    while sum(len(ids) for ids in seen) < epoch_tokens:
        batch = next(batches)
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 2 * 16
        bounds = batch["cu_seqlens"].tolist()
        seen += [batch["input_ids"][0, a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    assert sorted(seen) == sorted(s.input_ids for s in samples)
