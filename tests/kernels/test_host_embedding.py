import pytest
import torch

pytest.importorskip("triton")
from finetune_kernels.host_embedding import gather_rows  # noqa: E402
from finetune_kernels.reference import host_embedding_reference  # noqa: E402

# Widths around the kernel's 1024-column block (a partial block, exactly one, one and a bit), and
# id shapes of one token, a row, and a batch of rows.
SHAPES = [((37, 70), (1,)), ((1000, 1024), (3, 5)), ((5, 1031), (2, 7))]


def host_table(shape, dtype, device, seed=0):
    """A random table in host memory: pinned where a GPU reads it."""
    torch.manual_seed(seed)
    table = torch.randn(shape).to(dtype)
    return table.pin_memory() if device.type == "cuda" else table


@pytest.mark.parametrize("shape,ids_shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_match_the_reference_exactly(device, shape, ids_shape, dtype):
    table = host_table(shape, dtype, device)
    ids = torch.randint(0, shape[0], ids_shape, generator=torch.Generator().manual_seed(1)).to(device)
    out = gather_rows(table, ids)
    assert out.device == ids.device and out.dtype == dtype and out.shape == (*ids_shape, shape[1])
    # A lookup copies values: bit for bit, no tolerance.
    assert torch.equal(out, host_embedding_reference(table, ids))


def test_ids_outside_the_table_read_as_zeros_not_stray_memory(device):
    table = host_table((11, 33), torch.float32, device)
    ids = torch.tensor([[0, 10, 11, -1, 2**40, 5]], device=device)
    out = gather_rows(table, ids)
    assert torch.equal(out, host_embedding_reference(table, ids))
    assert out[0, 2:5].abs().sum() == 0 and out[0, 1].abs().sum() > 0


def test_no_ids_give_no_rows(device):
    out = gather_rows(host_table((4, 8), torch.float32, device), torch.empty(0, 3, dtype=torch.long, device=device))
    assert out.shape == (0, 3, 8)


@pytest.mark.gpu
def test_a_pageable_table_is_refused_for_the_gpu(cuda):
    with pytest.raises(ValueError, match="pinned"):
        gather_rows(torch.zeros(4, 8), torch.zeros(2, dtype=torch.long, device=cuda))
