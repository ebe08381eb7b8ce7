"""4-bit storage of frozen linear weights, through bitsandbytes' public quantize/dequantize API.

A weight W (out, in), already cast to the training dtype, is quantized blockwise exactly as
`bnb.nn.Linear4bit` does it (`bitsandbytes.functional.quantize_4bit`, blocks of 64, NF4 codes,
optionally double-quantized absmax), so the two model paths train against bit-identical
weights. Every tensor of the resulting QuantState is a buffer of `QuantizedWeight`, so that
`.to(device)`, `state_dict()` and memory accounting see them; the QuantState object bitsandbytes
and our Triton kernel take is rebuilt around those buffers on each call (no copies).
"""

from __future__ import annotations

import math

import torch
from torch import nn

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bitsandbytes' block for double-quantizing the absmax


class QuantizedWeight(nn.Module):
    """A frozen (out, in) weight stored as packed 4-bit codes plus its blockwise scales."""

    def __init__(self, packed: torch.Tensor, state):
        super().__init__()
        self.shape, self.dtype = torch.Size(state.shape), state.dtype
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        self.nested = state.nested
        if self.nested:
            self.nested_blocksize = state.state2.blocksize
            self.register_buffer("offset", state.offset)
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_code", state.state2.code)

    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True) -> QuantizedWeight:
        """Quantize on the weight's own device, as Linear4bit does when it is moved there."""
        import bitsandbytes.functional as bnb_functional

        packed, state = bnb_functional.quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
        )
        return cls(packed, state)

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype: torch.dtype, quant_type: str = "nf4",
              double_quant: bool = True, device: torch.device | str = "meta") -> QuantizedWeight:
        """The buffers `quantize` gives a (out, in) weight of `dtype`, without values (meta by default).

        bitsandbytes packs two codes a byte into ((n + 1) // 2, 1) and keeps one absmax per block of
        64; double quantization stores those as uint8 codes with one float32 absmax per 256 of them,
        beside their mean (`offset`). Under FSDP the processes but the first build the model so and
        receive the values from it; tests hold the layout against bitsandbytes'.
        """
        from bitsandbytes.functional import QuantState

        numel = math.prod(shape)
        blocks = -(-numel // BLOCKSIZE)
        code = torch.empty(16, dtype=torch.float32, device=device)  # the 4-bit type's 16 values
        packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device)
        if not double_quant:
            absmax = torch.empty(blocks, dtype=torch.float32, device=device)
            return cls(packed, QuantState(absmax, shape, code, BLOCKSIZE, quant_type, dtype))
        nested = QuantState(torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
                            code=torch.empty(256, dtype=torch.float32, device=device),  # 8-bit: 256 values
                            blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return cls(packed, QuantState(torch.empty(blocks, dtype=torch.uint8, device=device), shape, code, BLOCKSIZE,
                                      quant_type, dtype, offset=torch.empty((), dtype=torch.float32, device=device),
                                      state2=nested))

    def codes(self) -> torch.Tensor:
        """The packed codes as bytes (under FSDP they are stored as a float32 view of those bytes)."""
        return self.packed if self.packed.dtype == torch.uint8 else self.packed.view(torch.uint8)

    def quant_state(self):
        from bitsandbytes.functional import QuantState

        nested = None
        if self.nested:
            nested = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=getattr(self, "offset", None),
                          state2=nested)

    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight dequantized by `dequantize_with(self, out)`, set by whoever calls the module.

        Only FSDP calls it so (see NativeCausalLM.fsdp_wrap_policy): a call is what makes FSDP
        gather a unit's shards, and this module is a unit of its own there.
        """
        return self.dequantize_with(self, out)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, {self.quant_type}, stored for {self.dtype}, double_quant={self.nested}"


def dequantize_bnb(weight: QuantizedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """(out, in) in the weight's storage dtype, by bitsandbytes (its CPU path is vectorized C++).

    `out`, when given (that shape and dtype), receives the values: contiguous, or a view whose rows
    have unit stride, such as a block of a wider matrix (copy_ follows its strides).
    """
    import bitsandbytes.functional as bnb_functional

    # Not bitsandbytes' own out=: its CPU backend lacks that overload.
    values = bnb_functional.dequantize_4bit(weight.codes(), weight.quant_state(), quant_type=weight.quant_type)
    return values if out is None else out.copy_(values)


def dequantize_triton(weight: QuantizedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """As `dequantize_bnb`, bit for bit, in one Triton kernel (NF4 only), written straight into `out`."""
    if weight.quant_type != "nf4":
        return dequantize_bnb(weight, out)
    from finetune_kernels.nf4_dequant import nf4_dequantize_buffers

    nested = (weight.nested_code, weight.nested_absmax, weight.offset, weight.nested_blocksize) if weight.nested \
        else None
    return nf4_dequantize_buffers(weight.packed, weight.shape, weight.blocksize, weight.absmax, weight.code,
                                  weight.dtype, nested, out)
