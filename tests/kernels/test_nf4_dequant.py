import copy

import pytest
import torch

pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from finetune_kernels.nf4_dequant import nf4_dequantize  # noqa: E402
from finetune_kernels.reference import nf4_dequantize_reference  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize(shape, dtype, blocksize, nested, device, seed=0):
    torch.manual_seed(seed)
    weight = (3 * torch.randn(shape)).to(device=device, dtype=dtype)
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4"
    )


# Odd row counts; each row a whole number of 64-blocks. (7, 9) has an odd element count, so the
# last byte carries a padding nibble.
@pytest.mark.parametrize("shape", [(3, 64), (67, 192), (130, 320), (7, 9)])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_with_bitsandbytes(device, shape, nested, dtype):
    packed, quant_state = _quantize(shape, dtype, 64, nested, device)
    expected = bnb_functional.dequantize_4bit(packed, quant_state)
    assert torch.equal(nf4_dequantize(packed, quant_state), expected)
    assert torch.equal(nf4_dequantize_reference(packed, quant_state), expected)


# bitsandbytes 0.50's CPU C kernel restarts blocks at every row when a row is not a whole number
# of blocks, which does not invert its own quantize_4bit (blocks run over the flattened tensor,
# as on CUDA). For those shapes the oracle is bitsandbytes on the same data quantized as 1-D.
@pytest.mark.parametrize("shape", [(5, 96), (7, 18), (3, 5), (67, 192)])
@pytest.mark.parametrize("blocksize", [32, 128, 256])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_bit_exact_other_blocksizes(device, shape, blocksize, nested):
    packed, quant_state = _quantize(shape, torch.bfloat16, blocksize, nested, device)
    flat_packed, flat_state = _quantize((shape[0] * shape[1],), torch.bfloat16, blocksize, nested, device)
    assert torch.equal(packed.reshape(-1), flat_packed.reshape(-1))
    expected = bnb_functional.dequantize_4bit(flat_packed, flat_state).reshape(shape)
    assert torch.equal(nf4_dequantize(packed, quant_state), expected)


# A row block of a wider matrix, as LoRA's combined [W | s B] holds it: rows land `ld` apart at a
# column offset. (67, 192) rows are whole 64-blocks (one row per block); the others have blocks
# straddling rows and, (7, 9) and (3, 5), a padding nibble. The oracle is bitsandbytes on the same
# data quantized as 1-D (see test_bit_exact_other_blocksizes), valid for every shape.
@pytest.mark.parametrize("shape,blocksize", [((67, 192), 64), ((5, 96), 64), ((7, 9), 64), ((3, 5), 32)])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_writes_into_a_row_strided_view_bit_exact(device, shape, blocksize, nested, dtype):
    rows, cols = shape
    packed, quant_state = _quantize(shape, dtype, blocksize, nested, device)
    flat_packed, flat_state = _quantize((rows * cols,), dtype, blocksize, nested, device)
    expected = bnb_functional.dequantize_4bit(flat_packed, flat_state).reshape(shape)
    wide = torch.full((rows + 3, cols + 5), 7.0, dtype=dtype, device=device)
    view = wide[1:1 + rows, 2:2 + cols]
    assert not view.is_contiguous()
    assert nf4_dequantize(packed, quant_state, out=view) is view
    assert torch.equal(view, expected)
    untouched = torch.ones_like(wide, dtype=torch.bool)
    untouched[1:1 + rows, 2:2 + cols] = False
    assert bool((wide[untouched] == 7.0).all())


def test_out_without_unit_column_stride_is_refused(device):
    packed, quant_state = _quantize((67, 192), torch.bfloat16, 64, True, device)
    column_major = torch.empty(192, 67, dtype=torch.bfloat16, device=device).T
    with pytest.raises(ValueError, match="unit stride"):
        nf4_dequantize(packed, quant_state, out=column_major)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_output_dtype_override(device, out_dtype):
    packed, quant_state = _quantize((67, 192), torch.bfloat16, 64, True, device)
    state_with_dtype = copy.copy(quant_state)
    state_with_dtype.dtype = out_dtype
    expected = bnb_functional.dequantize_4bit(packed, state_with_dtype)
    assert torch.equal(nf4_dequantize(packed, quant_state, out_dtype), expected)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_params4bit_plugs_in(device, quant_storage):
    torch.manual_seed(0)
    weight = torch.randn(67, 192, dtype=torch.bfloat16)
    param = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=True, quant_storage=quant_storage
    ).to(device)
    expected = bnb_functional.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(nf4_dequantize(param, param.quant_state), expected)


def test_result_is_a_constant_inside_autograd(device):
    packed, quant_state = _quantize((67, 192), torch.float32, 64, True, device)
    x = torch.randn(5, 192, device=device, requires_grad=True)
    weight = nf4_dequantize(packed, quant_state)
    assert not weight.requires_grad
    (x @ weight.T).sum().backward()
    # Default fp32 tolerances: both sides sum the same 67 values, only the order may differ.
    torch.testing.assert_close(x.grad, weight.sum(0).expand(5, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_bit_exact_with_bitsandbytes_cuda(cuda, nested, blocksize):
    packed, quant_state = _quantize((4096 + 3, 1408), torch.bfloat16, blocksize, nested, cuda)
    expected = bnb_functional.dequantize_4bit(packed, quant_state)
    assert torch.equal(nf4_dequantize(packed, quant_state), expected)
