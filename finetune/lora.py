"""LoRA over 4-bit storage, with peft's module names (its adapter files: finetune.adapter_format).

For token rows x (N, in), the frozen weight W (out, in) held as NF4 codes, A (r, in), B (out, r),
the scaling s (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) and dropout written as a
mask d (0 or 1 / (1 - p) per element; all ones without dropout), with xd = x * d, xa = xd A^T:

    y  = x W^T + b + s xa B^T
    dx = dy W + s ((dy B) A) * d
    dA = s (dy B)^T xd
    dB = s dy^T xa

Layers that read the same input (q/k/v, gate/up) run as one group; a layer alone is a group of
one. With W the group's weights stacked as row blocks (sum out, in), R the sum of its adapters'
ranks and A their stacked (R, in) matrices, the LoRA terms become one block-diagonal matrix
S = s B_bd (sum out, R): layer i's rows and ranks hold s_i B_i, everything else is zero (a layer
without an adapter has only zero rows; R is padded with zero ranks to a multiple of 8, so that
the rows below stay 16-byte aligned for tensor-core GEMMs). Written side by side with W it gives

    Wc = [W | S]  (sum out, in + R),   X' = [x | xa]  (N, in + R)
    y  = X' Wc^T + b                   one GEMM: no pass over y of its own to add the LoRA term
    dy Wc = [dy W | (dy S)]            one GEMM: the base gradient and every layer's s_i dy B_i
    dx = dy W + ((dy S)_i A_i) * d_i summed over layers,  dA_i = (dy S)_i^T xd_i,
    dB_i = s_i (dy^T xa)_ii            layer i's diagonal block of one (sum out, R) GEMM

Building X' copies x (in columns per token) to spare an in-place add over y (sum out columns),
which is worth it where in <= sum out (q/k/v, gate/up, o_proj); backward there gets dx and
every s_i dy B_i from the one GEMM dy Wc, dx copied out of it to be contiguous. Elsewhere
(down_proj, whose in is several times its out) forward is y = x W^T + b plus one addmm of
xa S^T, and backward takes dy W and dy S as two GEMMs: copying the wide dx out of dy Wc would
cost more than reading dy twice. There dx may also land in x's own memory once A's gradients have
read x (project's reuse_input, for an input nothing else reads after: the SwiGLU output), so the
backward does not hold two tensors that wide.

Backward saves x, xa (N, R: small), the stacked A, S (small) and, unless the layers have fused
dropout kernels (finetune_kernels.lora_dropout, which redraw each mask from a seed), the dropout
masks (one byte per element and adapted layer), never W: it is dequantized again in backward, so
a group's weights exist in full precision only while its own matmuls run. X' is not saved either: x is often held
anyway by whoever made it (attention keeps its output, o_proj's input), and X' would be a
second copy. A group without adapters saves nothing at all. The one exception is a group under
activation checkpointing (`keep_dequantized`), whose recompute hands its Wc (or W) to the
backward that immediately follows.

A and B are fp32 parameters (peft's choice too), cast to the compute dtype once per forward;
their gradients come back in fp32.
"""

from __future__ import annotations

import math
import re
from itertools import accumulate
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import ConfigError, LoraConfig
from finetune.quant import QuantizedWeight


def dequantize_rows(layers: Sequence[QLoRALinear], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layers' weights stacked as one (sum out, in) matrix in `dtype`.

    `out`, when given, receives them; it may be the first columns of a wider matrix.
    """
    first = layers[0]
    if out is None:
        if len(layers) == 1 and first.weight.dtype == dtype:
            return first.dequantize(first.weight)
        out = torch.empty(sum(layer.out_features for layer in layers), first.in_features, dtype=dtype,
                          device=first.weight.packed.device)
    row = 0
    for layer in layers:
        block = out[row:row + layer.out_features]
        if layer.weight.dtype == dtype:
            layer.dequantize(layer.weight, out=block)
        else:
            block.copy_(layer.dequantize(layer.weight))
        row += layer.out_features
    return out


def combined_weight(layers: Sequence[QLoRALinear], lora_block: torch.Tensor) -> torch.Tensor:
    """Wc = [W | S] (sum out, in + R) in the dtype of S, the group's `lora_block`."""
    width = layers[0].in_features
    combined = torch.empty(lora_block.shape[0], width + lora_block.shape[1], dtype=lora_block.dtype,
                           device=lora_block.device)
    dequantize_rows(layers, lora_block.dtype, out=combined[:, :width])
    combined[:, width:] = lora_block
    return combined


# Where lora_params start among forward's arguments (needs_input_grad's indices).
_FIRST_PARAM = 6


class QLoRAGroupFunction(torch.autograd.Function):
    """x (..., in) -> the group's outputs side by side (..., sum out); lora_params = A1, B1, A2, B2, ...

    (A_i, B_i) is (None, None) for a layer without an adapter. A and B are cast to the compute
    dtype once per forward (A stacked, B scaled into S), and those copies (not the fp32
    parameters) are what backward reads. The flags are project's keywords: `keep_weight` saves the
    dequantized weight for backward; `output_unused` makes only what backward reads; `reuse_input`
    lets backward write dx over the saved x (an input that nothing reads after this group's
    backward). They are separate arguments, not one tuple: torch 2.11's dynamo passes a NamedTuple
    argument of an autograd.Function to it wrongly (compiled layers failed with it).
    """

    @staticmethod
    def forward(ctx, x, layers: tuple[QLoRALinear, ...], dropout_p: float, keep_weight: bool, output_unused: bool,
                reuse_input: bool, *lora_params):
        adapted = [i for i in range(len(layers)) if lora_params[2 * i] is not None]
        ctx.layers, ctx.dropout_p, ctx.keep_weight, ctx.adapted = layers, dropout_p, keep_weight, adapted
        # Compiled code would trace the write into x as a copy: no memory saved, so none is made.
        ctx.reuse_input = reuse_input and not torch.compiler.is_compiling()
        bias = _stacked_bias(layers, x)
        # output_unused: only what backward reads is made; the output is left unwritten.
        unwritten = x.new_empty(*x.shape[:-1], sum(layer.out_features for layer in layers)) if output_unused else None
        if not adapted:
            weight = dequantize_rows(layers, x.dtype) if keep_weight or not output_unused else None
            ctx.save_for_backward(*((weight,) if keep_weight else ()))
            return unwritten if output_unused else F.linear(x, weight, bias)
        lora_As = [lora_params[2 * i] for i in adapted]
        ctx.param_dtype = lora_As[0].dtype
        ctx.rows = _slices(layer.out_features for layer in layers)
        ctx.ranks = _slices(A.shape[0] for A in lora_As)
        x_rows = x.reshape(-1, x.shape[-1])
        shared = layers[0].shared_operands
        ctx.shared = shared if shared is not None and shared.enabled else None
        made = ctx.shared.entries.get(layers) if ctx.shared is not None else None
        if made is not None and made[0].dtype == x.dtype:
            lora_A, lora_block = made
        else:
            # Zero ranks up to a multiple of 8 keep the rows of [x | xa], Wc and dy Wc 16-byte aligned,
            # which cuBLAS's tensor-core GEMMs want (r=4 on q/k/v would make in + 12 columns).
            pad = -ctx.ranks[-1].stop % 8
            if pad:
                lora_As = [*lora_As, lora_As[0].new_zeros(pad, x.shape[-1])]
            lora_A = (torch.cat(lora_As) if len(lora_As) > 1 else lora_As[0]).to(x.dtype)  # (R + pad, in)
            lora_block = _lora_block(layers, adapted, lora_params[1::2], ctx.rows, ctx.ranks, lora_A.shape[0],
                                     x.dtype)  # S
            if ctx.shared is not None:
                ctx.shared.entries[layers] = lora_A, lora_block
        pad = lora_A.shape[0] - ctx.ranks[-1].stop
        masks, ctx.seed = [], None
        fused = layers[0].fused_dropout
        if dropout_p > 0 and fused is not None and len({r.stop - r.start for r in ctx.ranks}) == 1:
            # Layer l's mask comes from seed + l, redrawn by each kernel that needs it: none is stored.
            # Drawn from the CPU generator, whose state activation checkpointing replays for the recompute.
            ctx.seed = int(torch.randint(2**62, ()))
            xa = (x_rows.new_zeros if pad else x_rows.new_empty)(x_rows.shape[0], lora_A.shape[0])
            fused.dropout_down(x_rows, lora_A[:ctx.ranks[-1].stop], ctx.ranks[0].stop, ctx.seed, dropout_p, out=xa)
        elif dropout_p > 0:
            # One mask per layer, drawn in layer order, as separate dropout modules would.
            masks = [torch.rand_like(x_rows) >= dropout_p for _ in adapted]
            xa = (x_rows.new_zeros if pad else x_rows.new_empty)(x_rows.shape[0], lora_A.shape[0])
            for mask, r in zip(masks, ctx.ranks):  # each straight into its own columns: no cat
                torch.mm(x_rows * mask / (1 - dropout_p), lora_A[r].T, out=xa[:, r])
        else:
            xa = x_rows @ lora_A.T  # (N, R)
        # [x | xa] copies x to spare an add over y: worth it where y is at least as wide as x.
        ctx.fold = layers[0].in_features <= lora_block.shape[0]
        if output_unused:
            weight = (combined_weight(layers, lora_block) if ctx.fold else dequantize_rows(layers, x.dtype)) \
                if keep_weight else None
            y = unwritten
        elif ctx.fold:
            weight = combined_weight(layers, lora_block)
            y = F.linear(torch.cat([x_rows, xa], -1), weight, bias)  # X' Wc^T + b: (N, sum out)
        else:
            weight = dequantize_rows(layers, x.dtype)
            y = F.linear(x_rows, weight, bias).addmm_(xa, lora_block.T)
        ctx.save_for_backward(*((weight,) if keep_weight else ()), x, xa, lora_A, lora_block, *masks)
        return y if output_unused else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        layers, adapted, p = ctx.layers, ctx.adapted, ctx.dropout_p
        needs_x = ctx.needs_input_grad[0]
        grad_params = [None] * (2 * len(layers))
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1])
        saved = ctx.saved_tensors  # read once: checkpointing allows a single unpack
        weight, saved = (saved[0], saved[1:]) if ctx.keep_weight else (None, saved)
        grad_x = None
        if not adapted:
            if needs_x:
                grad_x = grad_rows @ (weight if weight is not None else dequantize_rows(layers, grad_y.dtype))
                grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1])
            return grad_x, None, None, None, None, None, *grad_params
        x, xa, lora_A, lora_block, *masks = saved
        if ctx.shared is not None:
            # This backward is the operands' last reader in the step.
            ctx.shared.entries.pop(layers, None)
        x_rows = x.reshape(-1, x.shape[-1])
        wants_A = {i: ctx.needs_input_grad[_FIRST_PARAM + 2 * i] for i in adapted}
        wants_B = {i: ctx.needs_input_grad[_FIRST_PARAM + 1 + 2 * i] for i in adapted}
        fused, rank, width = layers[0].fused_dropout, ctx.ranks[0].stop, ctx.ranks[-1].stop  # padding excluded
        # grad_xa: (dy S) (N, R), each layer's s_i dy B_i side by side like xa.
        if needs_x and ctx.fold:
            grads = grad_rows @ (weight if weight is not None else combined_weight(layers, lora_block))
            grad_x, grad_xa = grads[:, :x.shape[-1]], grads[:, x.shape[-1]:]
        elif needs_x or any(wants_A.values()):
            grad_xa = grad_rows @ lora_block
        # A's gradients first: they are the last to read x, whose memory dx may then take.
        if any(wants_A.values()):
            if masks:
                # Masked and scaled in the compute dtype, in the forward's order.
                for mask, i, r in zip(masks, adapted, ctx.ranks):
                    if wants_A[i]:
                        grad_params[2 * i] = (grad_xa[:, r].T @ (x_rows * mask / (1 - p))).to(ctx.param_dtype)
            else:
                grad_A = (fused.dropout_grad_a(grad_xa[:, :width], x_rows, rank, ctx.seed, p) if ctx.seed is not None
                          else grad_xa.T @ x_rows).to(ctx.param_dtype)  # (R, in)
                for i, r in zip(adapted, ctx.ranks):
                    if wants_A[i]:
                        grad_params[2 * i] = grad_A[r]
        if needs_x and not ctx.fold:
            base = weight if weight is not None else dequantize_rows(layers, grad_y.dtype)
            grad_x = torch.mm(grad_rows, base, out=x_rows if ctx.reuse_input else None)
        if needs_x:
            if ctx.seed is not None:
                fused.dropout_grad_x(grad_x, grad_xa, lora_A[:width], rank, ctx.seed, p)
            elif masks:
                for mask, r in zip(masks, ctx.ranks):
                    grad_x.add_((grad_xa[:, r] @ lora_A[r]) * mask / (1 - p))
            else:
                grad_x.addmm_(grad_xa, lora_A)
        if any(wants_B.values()):
            # One GEMM rather than one per layer; its off-diagonal blocks (one layer's dy against
            # another's xa) are wasted work, small at LoRA ranks.
            grad_B = grad_rows.T @ xa  # (sum out, R)
            for i, r in zip(adapted, ctx.ranks):
                if wants_B[i]:
                    grad_params[2 * i + 1] = _scaled(grad_B[ctx.rows[i], r], layers[i].scaling, ctx.param_dtype)
        if grad_x is not None:
            # Contiguous for the kernels downstream; under dy Wc a copy out of the wider result.
            grad_x = grad_x.contiguous().view(*grad_y.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, None, None, None, *grad_params


class SharedOperands:
    """Each group's LoRA operands in the compute dtype (the stacked, padded A and the block S), made
    by the group's first forward and reused by its later ones until its backward: a recomputed
    layer runs forward twice a step (the first pass and the recompute), so this spares the
    recompute a cast, a concatenation and a block of small kernels per group (~770 launches a
    step for an 8B with every layer recomputed) for holding them meanwhile (~4 MB a layer at r=16).

    Entries are keyed by the group (its tuple of layers). The owner calls `start` before each forward of
    the model: the adapters may have changed since the last one, and whether they did cannot be
    read off the parameters (bitsandbytes' optimizers write them through raw pointers, which bump
    no version counter).
    """

    def __init__(self):
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.enabled = False

    def start(self, enabled: bool) -> None:
        self.entries.clear()
        self.enabled = enabled


def _slices(sizes: Iterable[int]) -> list[slice]:
    bounds = [0, *accumulate(sizes)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _stacked_bias(layers, x: torch.Tensor) -> torch.Tensor | None:
    """The layers' biases side by side in x's dtype (zeros for a layer without one), or None."""
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return None
    if len(layers) == 1:
        return biases[0].to(x.dtype)
    return torch.cat([torch.zeros(layer.out_features, dtype=x.dtype, device=x.device) if b is None
                      else b.to(x.dtype) for layer, b in zip(layers, biases)])


def _lora_block(layers, adapted, lora_Bs, rows, ranks, width: int, dtype: torch.dtype) -> torch.Tensor:
    """S (sum out, width): layer i's rows and ranks hold s_i B_i, zeros elsewhere (padding included)."""
    device = lora_Bs[adapted[0]].device
    # A lone layer's unpadded block is all s B: nothing to zero.
    whole = len(layers) == 1 and width == ranks[-1].stop
    block = (torch.empty if whole else torch.zeros)(rows[-1].stop, width, dtype=dtype, device=device)
    for i, r in zip(adapted, ranks):
        # Scaled in fp32 and rounded to the compute dtype once, by one kernel.
        torch.mul(lora_Bs[i], layers[i].scaling, out=block[rows[i], r])
    return block


def _scaled(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """t * scale, rounded to t's dtype and then cast to `dtype`, by one kernel."""
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def project(x: torch.Tensor, layers: Sequence[QLoRALinear], output_unused: bool = False,
            reuse_input: bool = False) -> torch.Tensor:
    """The outputs of layers that all read `x`, side by side on the last dim, as one GEMM.

    Split the result with `torch.split` (whose backward concatenates the gradients into the one
    buffer this group's backward reads) rather than by slicing. `output_unused`: the caller needs
    only what backward saves (activation checkpointing's recompute of a layer's last projection,
    whose output is thrown away), so the GEMM is skipped and the result is uninitialized memory.
    `reuse_input`: nothing reads `x` after this group's backward, which may then write x's gradient
    over it (where x is wider than the output, as down_proj's input: its backward peaks lower).
    """
    active = [layer.lora_A is not None and layer.adapter_enabled for layer in layers]
    rates = {layer.lora_dropout if layer.training else 0.0 for layer, on in zip(layers, active) if on}
    if len(rates) > 1:
        raise ValueError(f"layers projected together must share one lora_dropout, got {sorted(rates)}")
    dropout_p = rates.pop() if rates else 0.0
    if dropout_p == 0 and _fused_4bit_applies(x, layers):
        return _project_few_rows(x, layers, active)
    lora_params = [t for layer, on in zip(layers, active)
                   for t in ((layer.lora_A, layer.lora_B) if on else (None, None))]
    keep_weight = all(layer.keep_dequantized for layer in layers)
    return QLoRAGroupFunction.apply(x, tuple(layers), dropout_p, keep_weight, output_unused, reuse_input,
                                    *lora_params)


# Up to this many token rows (decoding steps), inference multiplies by the 4-bit weights directly
# (bitsandbytes' matmul_4bit: its fused kernel on CUDA reads the codes, not a dequantized copy), so
# a step reads half a byte per weight instead of writing and reading two more.
FUSED_4BIT_MAX_ROWS = 8


def _fused_4bit_applies(x: torch.Tensor, layers: Sequence[QLoRALinear]) -> bool:
    """Few rows, no autograd, and weights stored in x's dtype (the kernel dequantizes straight into
    it: for another storage dtype it would skip the rounding to that dtype training saw). Never for
    FSDP units, whose codes are gathered only by calling them."""
    return (x.numel() <= FUSED_4BIT_MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and all(layer.weight.dtype == x.dtype and not isinstance(layer.weight.packed, nn.Parameter)
                    for layer in layers))


def _project_few_rows(x: torch.Tensor, layers: Sequence[QLoRALinear], active: list[bool]) -> torch.Tensor:
    import bitsandbytes as bnb

    outputs = []
    for layer, adapter_on in zip(layers, active):
        weight = layer.weight
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = bnb.matmul_4bit(x, weight.codes().t(), quant_state=weight.quant_state(), bias=bias)
        if adapter_on:
            lora_B = _scaled(layer.lora_B, layer.scaling, x.dtype)  # s B rounded once, as in training
            y = y + F.linear(F.linear(x, layer.lora_A.to(x.dtype)), lora_B)
        outputs.append(y)
    return torch.cat(outputs, -1) if len(outputs) > 1 else outputs[0]


class QLoRALinear(nn.Module):
    """A frozen 4-bit linear layer with an optional LoRA adapter (peft's names: lora_A, lora_B).

    `weight` arrives after construction (the model is built empty, then filled while loading).
    `dequantize(weight, out=None)` gives the weight in its storage dtype. `fused_dropout`, when
    given, is a module with finetune_kernels.lora_dropout's functions, which apply LoRA dropout
    inside the low-rank products instead of through stored masks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dequantize: Callable[..., torch.Tensor], fused_dropout=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dequantize, self.fused_dropout = dequantize, fused_dropout
        self.weight: QuantizedWeight | None = None
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        # The rank is kept apart from lora_A's shape, which FSDP flattens and shards between steps.
        self.r, self.lora_alpha, self.use_rslora, self.lora_dropout = 0, 0.0, False, 0.0
        # Keep the dequantized weight from forward for backward. Only for layers under activation
        # checkpointing: the first forward's saved tensors are dropped anyway, and the recompute
        # runs right before this layer's backward, so one layer's weights are held briefly and
        # each weight is dequantized twice per step instead of three times (Decoder.set_checkpointing
        # leaves gate/up out).
        self.keep_dequantized = False
        # False computes the frozen base alone, adapter kept (preference objectives' reference model).
        self.adapter_enabled = True
        # Set on a group's first layer whose forward runs more than once a step (a recomputed layer's).
        self.shared_operands: SharedOperands | None = None

    @property
    def scaling(self) -> float:
        r = self.r
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)

    def add_lora(self, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                 device: torch.device) -> None:
        # Initialized on the CPU like peft (kaiming-uniform A, zero B), so a seed gives the same
        # adapter on any device.
        lora_A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.r, self.lora_alpha, self.use_rslora, self.lora_dropout = r, lora_alpha, use_rslora, lora_dropout

    def remove_lora(self) -> None:
        self.lora_A = self.lora_B = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, (self,))

    def extra_repr(self) -> str:
        lora = f", lora r={self.r} scaling={self.scaling:g}" if self.lora_A is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{lora}"


def compute_device(model: nn.Module) -> torch.device:
    """Where adapters belong: with the model's unquantized weights (its 4-bit ones may stream from host memory).

    The meta device for a model built empty (native.empty_pretrained), which FSDP fills.
    """
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("meta"))


FSDP_WRAPPED = "_fsdp_wrapped_module."


def linear_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """The model's QLoRA layers by their checkpoint names (also inside FSDP units, whose marker is dropped)."""
    return {name.replace(FSDP_WRAPPED, ""): module for name, module in model.named_modules()
            if isinstance(module, QLoRALinear)}


def adapted_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {name: module for name, module in linear_layers(model).items() if module.lora_A is not None}


def select_targets(names: list[str], target_modules) -> list[str]:
    """peft's matching: "all-linear", a regex matched against the full name, or a list of name suffixes."""
    if target_modules == "all-linear":
        return list(names)
    if isinstance(target_modules, str):
        selected = [name for name in names if re.fullmatch(target_modules, name)]
        if not selected:
            raise ConfigError(f"lora.target_modules={target_modules!r} matches no linear layer; "
                              f"this model has {_leaf_names(names)}.")
        return selected
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ConfigError(f"lora.target_modules names {unmatched}, which this model does not have; "
                          f"its linear layers are {_leaf_names(names)}.")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]


def _leaf_names(names) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def attach_lora(model: nn.Module, lora: LoraConfig) -> None:
    """Freeze everything, then give each targeted layer a fresh trainable adapter."""
    if lora.use_dora:
        raise ConfigError("lora.use_dora=true is not supported by model.impl=native; "
                          "use model.impl=hf (or auto, which picks hf for DoRA).")
    model.requires_grad_(False)
    layers = linear_layers(model)
    for name in select_targets(list(layers), lora.target_modules):
        layers[name].add_lora(lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_rslora, compute_device(model))
