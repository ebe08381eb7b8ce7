"""The input embeddings in host memory (model.host_embeddings, host_embedding.py): the same numbers
as the table on the device, the table off it, and never for a tied LM head."""

import pytest
import torch
from torch import nn

from finetune.config import ConfigError
from finetune.models import native
from finetune.models.native.host_embedding import HostEmbedding
from finetune.models.native.load import MemoryLayout
from finetune.models.source import ModelSource
from test_native import bf16_config, checkpoints, cuda, random_ids, randomize_lora_B, run_config  # noqa: F401

CPU = torch.device("cpu")


def build(model_dir, host: bool, cfg=None, device=CPU, dtype=torch.float32):
    cfg = cfg or run_config(model_dir)
    torch.manual_seed(0)  # the same LoRA A for each
    return native.build(cfg, ModelSource.from_directory(model_dir), dtype, device, MemoryLayout(host_embeddings=host))


def train_step(model, ids):
    """Loss and the LoRA gradients of one step, the adapters' B made non-zero first."""
    randomize_lora_B(model, seed=3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_training_and_generation_match_the_table_on_the_device(checkpoints):
    model_dir = checkpoints("llama")
    on_device, on_host = build(model_dir, False), build(model_dir, True)
    assert isinstance(on_host.model.embed_tokens, HostEmbedding)
    assert isinstance(on_device.model.embed_tokens, nn.Embedding)
    # Neither a parameter nor a buffer: no optimizer, state dict or .to(device) sees the table...
    assert not any("embed_tokens" in name for name, _ in (*on_host.named_parameters(), *on_host.named_buffers()))
    # ...yet it counts among the model's parameters.
    assert on_host.param_count() == on_device.param_count()
    ids = random_ids(2, 16)
    (loss, grads), (host_loss, host_grads) = train_step(on_device, ids), train_step(on_host, ids)
    assert torch.equal(host_loss, loss)
    assert grads.keys() == host_grads.keys() and all(torch.equal(host_grads[k], grads[k]) for k in grads)
    prompt = random_ids(1, 7, seed=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
    expected = on_device.eval().generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(on_host.eval().generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs),
                       expected)


def test_a_tied_lm_head_keeps_the_table_on_the_device(checkpoints):
    model = build(checkpoints("llama_tied"), True)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ConfigError, match="tied to the LM head"):
        model.host_embeddings()


@pytest.mark.gpu
def test_gpu_the_table_leaves_the_gpu_and_the_step_is_the_same(checkpoints, cuda):
    model_dir = checkpoints("llama")
    ids = random_ids(2, 64, seed=2).to(cuda)
    results, held = [], []
    for host in (False, True):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(cuda)
        model = build(model_dir, host, bf16_config(model_dir), cuda, torch.bfloat16)
        held.append(torch.cuda.memory_allocated(cuda) - before)
        results.append(train_step(model, ids))
    table = model.model.embed_tokens.table
    assert table.is_pinned()
    # 300 x 64 bf16 values: 38,400 bytes, a whole number of the allocator's 512-byte blocks.
    assert held[0] - held[1] == table.numel() * table.element_size()
    (loss, grads), (host_loss, host_grads) = results
    assert torch.equal(host_loss, loss) and all(torch.equal(host_grads[k], grads[k]) for k in grads)
