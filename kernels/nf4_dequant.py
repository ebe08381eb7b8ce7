"""Dequantize bitsandbytes NF4 weights with one Triton kernel.

Storage (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``): the flattened weight ``w`` of
``numel`` elements is cut into blocks of ``blocksize`` consecutive elements (the last block may be
short). Element ``i`` is a 4-bit code ``c_i``; byte ``i // 2`` of the packed tensor holds
``c_{2j}`` in its high nibble and ``c_{2j+1}`` in its low nibble. With ``NF4`` the 16-entry
code book (``quant_state.code``) and ``absmax_b`` the fp32 scale of block ``b``:

    w_i = cast_to_dtype( fp32(NF4[c_i] * absmax_{i // blocksize}) )

Double quantization (``compress_statistics=True``, ``quant_state.nested``): the absmax values are
themselves stored as uint8 codes ``a_b``, blockwise-quantized in blocks of
``state2.blocksize`` (256) with the 256-entry dynamic code book ``state2.code``, the nested fp32
scales ``state2.absmax`` and the fp32 mean ``offset`` that was subtracted before quantizing:

    absmax_b = fp32( fp32(state2.code[a_b] * state2.absmax[b // 256]) + offset )

Every product and sum above is rounded to fp32 separately, exactly as bitsandbytes does, so the
kernel is launched with fp-contraction off: a fused multiply-add would round once and could differ
from bitsandbytes in the last bit.

The result may land in a row block of a wider matrix (``out`` a (rows, cols) view with row
stride ``ld >= cols``): element ``i`` then goes to row ``i // cols``, column ``i % cols``, i.e.
address ``i + (i // cols) (ld - cols)``. LoRA builds its combined [W | s B] matrix this way,
without a second copy of W.

The weight is frozen, so there is no backward: the result never requires grad.
"""

import math

import torch
import triton
import triton.language as tl

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Enough elements per program to keep memory transactions wide, few enough to stay in registers.
ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _round_fp32_to_bf16(values):
    # Round-to-nearest-even spelled out in integer ops: Triton's interpreter truncates on a plain
    # .to(tl.bfloat16), and bit-exactness with bitsandbytes is this kernel's contract on CPU too.
    bits = values.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    out_ptr,
    numel,
    num_blocks,
    row_len,
    row_gap,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    ROW_STRIDED: tl.constexpr,
    WHOLE_BLOCKS_PER_ROW: tl.constexpr,
):
    # int64 so that element offsets of the largest embedding matrices cannot overflow.
    block_ids = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block_valid = block_ids < num_blocks

    if NESTED:
        absmax_codes = tl.load(absmax_ptr + block_ids, mask=block_valid, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block_ids // NESTED_BLOCKSIZE, mask=block_valid, other=0.0)
        absmax = tl.load(nested_code_ptr + absmax_codes) * nested_scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block_ids, mask=block_valid, other=0.0)

    # BLOCKSIZE is even, so every block starts on a byte boundary and holds BLOCKSIZE // 2 bytes.
    byte_ids = block_ids[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    first_element = byte_ids * 2
    packed = tl.load(packed_ptr + byte_ids, mask=first_element < numel, other=0).to(tl.int32)
    # join + reshape interleaves (high, low) so that element 2j comes from the high nibble.
    nibbles = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCKS_PER_PROGRAM, BLOCKSIZE))
    values = tl.load(code_ptr + nibbles) * absmax[:, None]

    if out_ptr.dtype.element_ty == tl.bfloat16:
        values = _round_fp32_to_bf16(values)
    element_ids = block_ids[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out_ids = element_ids
    if ROW_STRIDED:
        # row_gap = ld - row_len elements are skipped after each row of the destination.
        if WHOLE_BLOCKS_PER_ROW:
            # No block straddles two rows: one division per block rather than per element.
            rows = block_ids * BLOCKSIZE // row_len
            out_ids = element_ids + (rows * row_gap)[:, None]
        else:
            out_ids = element_ids + element_ids // row_len * row_gap
    tl.store(out_ptr + out_ids, values.to(out_ptr.dtype.element_ty), mask=element_ids < numel)


def nf4_dequantize_buffers(
    packed: torch.Tensor,
    shape: torch.Size,
    blocksize: int,
    absmax: torch.Tensor,
    code: torch.Tensor,
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel on the QuantState's tensors themselves, with no QuantState object in between.

    ``nested`` is ``(state2.code, state2.absmax, offset, state2.blocksize)`` for double-quantized
    absmax (then ``absmax`` holds its uint8 codes). This is the training loop's per-matmul call,
    kept to plain arguments because its host-side cost is paid hundreds of times per step.
    ``out`` (``shape`` and ``dtype``) is contiguous, or a 2-D view with unit column stride and a
    row stride of at least ``shape[1]`` (a row block of a wider matrix).
    """
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of {SUPPORTED_BLOCKSIZES}")
    # Params4bit may store the codes in another dtype (quant_storage); the bytes are the same.
    packed = packed.contiguous().view(torch.uint8).reshape(-1)
    numel = math.prod(shape)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed tensor has {packed.numel()} bytes, expected {(numel + 1) // 2}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    row_strided = not out.is_contiguous()
    if (out.shape != shape or out.dtype != dtype
            or row_strided and not (out.dim() == 2 and out.stride(1) == 1 and out.stride(0) >= shape[1])):
        raise ValueError(f"out must be a {tuple(shape)} {dtype} tensor, contiguous or with rows of unit stride, "
                         f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}")
    # Constants when contiguous, so that Triton compiles that variant once, whatever the shape.
    row_len, row_gap = (shape[1], out.stride(0) - shape[1]) if row_strided else (1, 0)
    num_blocks = triton.cdiv(numel, blocksize)
    blocks_per_program = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    code = code.to(device=packed.device, dtype=torch.float32)
    if nested is not None:
        nested_code, nested_absmax, offset, nested_blocksize = nested
        nested_code, nested_absmax, offset = nested_code.float(), nested_absmax.float(), offset.float().reshape(1)
    else:
        absmax = absmax.float()
        # Never read: the NESTED=False specialization compiles those loads away.
        nested_code = nested_absmax = offset = code
        nested_blocksize = 1
    _nf4_dequantize_kernel[(triton.cdiv(num_blocks, blocks_per_program),)](
        packed,
        absmax,
        code,
        nested_code,
        nested_absmax,
        offset,
        out,
        numel,
        num_blocks,
        row_len,
        row_gap,
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=nested is not None,
        ROW_STRIDED=row_strided,
        WHOLE_BLOCKS_PER_ROW=row_len % blocksize == 0,
        enable_fp_fusion=False,
    )
    return out


def nf4_dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``packed`` (e.g. ``Params4bit.data``) with its bitsandbytes ``QuantState``.

    Bit-exact with ``bitsandbytes.functional.dequantize_4bit``. ``dtype`` defaults to
    ``quant_state.dtype`` (bf16, fp16 or fp32). ``out`` (the weight's shape and ``dtype``;
    contiguous, or a 2-D view whose rows have unit stride) receives the result instead of a new
    tensor: several weights can be dequantized into blocks of one matrix and multiplied in a
    single GEMM.
    """
    if quant_state.quant_type != "nf4":
        raise ValueError(f"expected an nf4 QuantState, got quant_type={quant_state.quant_type!r}")
    nested = None
    if quant_state.nested:
        state2 = quant_state.state2
        nested = (state2.code, state2.absmax, quant_state.offset, state2.blocksize)
    return nf4_dequantize_buffers(packed, quant_state.shape, quant_state.blocksize, quant_state.absmax,
                                  quant_state.code, dtype or quant_state.dtype, nested, out)
