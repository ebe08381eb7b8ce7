"""Native decoder for the Llama family: Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3.

The module tree repeats transformers' names (model.layers.N.self_attn.q_proj, ...), so a
checkpoint loads name for name (load.py) and adapters keep peft's keys. The linear weights are
4-bit (QuantizedWeight); embeddings, norms and the LM head stay unquantized in the compute dtype,
as in QLoRA.

The numerics come as one swappable set (`Ops`): the Triton kernels on CUDA with model.use_kernels,
their plain-PyTorch references elsewhere. The training forward never forms the logits: the LM
head and the loss are one (chunked) op. Attention is SDPA for whole and padded rows, and for
packed rows (samples back to back, boundaries in cu_seqlens or restarting position_ids) the
varlen kernel on CUDA; elsewhere (or in fp32, which flash attention lacks) a block-diagonal mask.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint, noop_context_fn

from finetune.adapter_format import copy_qlora_weights, lora_key, save_qlora_adapter
from finetune.config import ConfigError, LoraConfig
from finetune.data.samples import IGNORE_INDEX
from finetune.lora import QLoRALinear, SharedOperands, adapted_layers, linear_layers, project
from finetune.models.native import decoding, nf4_cache
from finetune.models.native.host_embedding import HostEmbedding
from finetune.models.native.kept_attention import MIN_ROW_TOKENS, KeptAttention
from finetune.models.native.parking import ActivationParking
from finetune.models.native.streaming import WeightStreamer
from finetune.models.sequence_logps import SequenceLogps, shifted_targets, sum_per_sequence
from finetune.models.source import checkpoint_files
from finetune.quant import QuantizedWeight, dequantize_bnb, dequantize_triton

# How each supported model_type departs from Llama; anything else goes to the generic path.
FAMILIES = {
    "llama": dict(),
    "mistral": dict(),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
}
ROPE_TYPES = ("default", "linear", "llama3")
# cuDNN ran ~2x flash attention on H100/H200; the rest are fallbacks for shapes they refuse.
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict  # transformers' rope_parameters: rope_type, rope_theta and the scaling's own keys
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: attend to at most this many latest tokens (Mistral, some Qwen layers), or None.
    windows: tuple = ()

    @classmethod
    def from_hf(cls, config) -> ModelArgs:
        family = FAMILIES[config.model_type]
        bias = bool(getattr(config, "attention_bias", False))
        layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            rope=_rope_parameters(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=family.get("qkv_bias", bias),
            o_bias=bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=family.get("qk_norm", False),
            windows=tuple(window if kind == "sliding_attention" else None for kind in layer_types),
        )


def _rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta})


def unsupported_reason(config, lora: LoraConfig | None = None, model_dir: Path | None = None) -> str | None:
    """Why the native path cannot run this model (None when it can)."""
    if model_dir is not None and checkpoint_files(Path(model_dir)) is None and not nf4_cache.is_cache(model_dir):
        return "it has no safetensors checkpoint"
    if config.model_type not in FAMILIES:
        return f"model_type {config.model_type!r} is not one of {sorted(FAMILIES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return f"rope_type {rope.get('rope_type')!r} is not one of {list(ROPE_TYPES)}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings are not supported"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout={config.attention_dropout} is not supported"
    if lora is not None and lora.use_dora:
        return "lora.use_dora=true (DoRA runs on the generic path only)"
    return None


def rope_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with Llama 3.1's or linear context scaling."""
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        # Wavelengths beyond the original context / low_freq_factor are stretched by `factor`,
        # those below context / high_freq_factor kept, and the band between blended linearly.
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        blend = (context / wavelength - low) / (high - low)
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq
        return torch.where(wavelength > context / low, inv_freq / factor,
                           torch.where(wavelength < context / high, inv_freq, blended))
    return inv_freq


@dataclass(frozen=True)
class Ops:
    """The numerical building blocks, swapped as one set."""

    rmsnorm: Callable  # (x, weight, eps) -> y
    rope_tables: Callable  # (position_ids (B, T), inv_freq (D/2,)) -> the tables `rope` takes, once per forward
    rope: Callable  # (q, k, *tables) -> (q, k); q, k (B, T, H, D)
    swiglu: Callable  # [gate | up] (..., 2F) -> silu(gate) * up (..., F); may reuse gate_up's memory in backward
    linear_cross_entropy: Callable  # (x, weight, shifted labels, num_items_in_batch=) -> loss
    dequantize: Callable  # (QuantizedWeight, out=None) -> (out, in) in its storage dtype
    lora_dropout: object = None  # finetune_kernels.lora_dropout, or None: masks drawn and stored by torch


def torch_ops() -> Ops:
    from finetune_kernels import reference

    return Ops(rmsnorm=reference.rmsnorm_reference, rope_tables=reference.rope_cos_sin_reference,
               rope=reference.rope_reference, swiglu=reference.swiglu_reference,
               linear_cross_entropy=reference.linear_cross_entropy_reference, dequantize=dequantize_bnb)


def triton_ops() -> Ops:
    from finetune_kernels import lora_dropout
    from finetune_kernels.fused_linear_ce import fused_linear_cross_entropy
    from finetune_kernels.rmsnorm import rmsnorm
    from finetune_kernels.rope import apply_rope_tables, token_tables
    from finetune_kernels.swiglu import swiglu

    # The MLP's gate_up is read by nothing after SwiGLU's backward: its gradient may take its memory.
    return Ops(rmsnorm=rmsnorm, rope_tables=token_tables, rope=apply_rope_tables,
               swiglu=partial(swiglu, overwrite_in_backward=True), linear_cross_entropy=fused_linear_cross_entropy,
               dequantize=dequantize_triton, lora_dropout=lora_dropout)


@dataclass
class AttentionLayout:
    """Which keys each query sees; worked out once per forward and shared by every layer."""

    allowed: torch.Tensor | None = None  # (B, 1, T, T) bool; None: plain causal
    cu_seqlens: torch.Tensor | None = None  # (n + 1,) int32 sample boundaries, for the varlen kernel
    max_seqlen: int = 0
    # A packed row of this many samples of one length, which fill it: attended as that many rows.
    equal_samples: int = 0

    def attend(self, q, k, v, window: int | None, kept: KeptAttention | None = None) -> torch.Tensor:
        """q (B, T, Hq, D), k and v (B, T, Hkv, D) -> (B, T, Hq, D). `kept`: a recomputed layer's
        attention results, recorded in its first pass and replayed in its recompute, where the
        attention is plain causal (kept_attention.py)."""
        T = q.shape[1]
        if self.equal_samples:
            # Plain causal attention per sample is the same computation, and SDPA's cuDNN kernel runs it
            # about twice as fast as the varlen kernel (shared/BENCH.md), with no block-diagonal mask
            # off the GPU.
            rows = [t.reshape(self.equal_samples, T // self.equal_samples, *t.shape[2:]) for t in (q, k, v)]
            return AttentionLayout().attend(*rows, window, kept).reshape(q.shape)
        if self.cu_seqlens is not None:
            from torch.nn.attention.varlen import varlen_attn

            cu, n = self.cu_seqlens, self.max_seqlen
            q, k, v = q[0], k[0], v[0]  # (total_tokens, H, D)
            options = inspect.signature(varlen_attn).parameters
            # Newer torch's varlen_attn is not causal unless asked; torch 2.11's takes no such flag and
            # is made causal by the window (-1, 0) below.
            kwargs = {"is_causal": True} if "is_causal" in options else {}
            if "window_size" in options:
                kwargs["window_size"] = (window - 1 if window else -1, 0)
            elif window is not None and window < n:
                raise NotImplementedError("this torch's varlen_attn has no sliding window; upgrade torch")
            # torch 2.11's varlen_attn has no enable_gqa: share the kv heads explicitly there.
            if "enable_gqa" in options:
                kwargs["enable_gqa"] = True
            else:
                repeat = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            return varlen_attn(q, k, v, cu, cu, n, n, **kwargs)[None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        allowed = self.allowed
        if window is not None and window < T:
            allowed = _causal(T, q.device) if allowed is None else allowed
            allowed = allowed & _window(T, window, q.device)
        with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
            y = kept.attend(q, k, v) if allowed is None and kept is not None else None
            if y is None and allowed is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif y is None:
                # Not every kernel that takes a mask takes enable_gqa: share the kv heads explicitly.
                repeat = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return y.transpose(1, 2)


def _causal(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def _window(T: int, window: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(-(window - 1))


def plan_attention(input_ids, attention_mask, position_ids, cu_seqlens, use_varlen: bool):
    """Positions (B, T) and the attention layout: whole rows, padded rows, or packed samples."""
    B, T = input_ids.shape
    device = input_ids.device
    tokens = torch.arange(T, device=device)
    segments = None  # (B, T) sample index of each token in packed rows
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"a packed batch (cu_seqlens) is one row, got {B}")
        # Read while the boundaries are still in host memory (as batches arrive): on the GPU the
        # read would wait for every kernel queued before it.
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        max_seqlen = int(lengths.max())
        if int(cu_seqlens[0]) == 0 and int(cu_seqlens[-1]) == T and bool((lengths == max_seqlen).all()):
            # Documents cut to max_seq_len pack into rows like this.
            position_ids = position_ids if position_ids is not None else tokens[None] % max_seqlen
            return position_ids, AttentionLayout(equal_samples=len(lengths))
        cu_seqlens = cu_seqlens.to(device, torch.int32, non_blocking=True)
        segments = torch.searchsorted(cu_seqlens[1:], tokens, right=True)[None]
        if position_ids is None:
            position_ids = tokens - cu_seqlens[segments]
    elif attention_mask is None and position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
        # transformers' convention for packed rows without boundaries: positions restart at 0.
        segments = (position_ids == 0).cumsum(-1)
        if B == 1:
            starts = (position_ids[0] == 0).nonzero().flatten()
            cu_seqlens = F.pad(starts, (0, 1), value=T).to(torch.int32)
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

    if segments is not None:
        if use_varlen and B == 1:
            return position_ids, AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        same_sample = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        return position_ids, AttentionLayout(allowed=(same_sample & _causal(T, device))[:, None])
    if attention_mask is not None and not bool(attention_mask.all()):
        visible = attention_mask.bool()[:, None, None, :] & _causal(T, device)  # (B, 1, T, T)
        # A left-padding query sees no key at all; letting it see itself keeps its (unused) output finite.
        allowed = visible | torch.eye(T, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return position_ids, AttentionLayout(allowed=allowed)
    if position_ids is None:
        position_ids = tokens[None].expand(B, T)
    return position_ids, AttentionLayout()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x):
        return self.ops.rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None, ops: Ops):
        super().__init__()
        C, D = args.hidden_size, args.head_dim
        self.head_dim, self.window, self.ops = D, window, ops
        self.q_proj = QLoRALinear(C, args.num_attention_heads * D, args.qkv_bias, ops.dequantize, ops.lora_dropout)
        self.k_proj = QLoRALinear(C, args.num_key_value_heads * D, args.qkv_bias, ops.dequantize, ops.lora_dropout)
        self.v_proj = QLoRALinear(C, args.num_key_value_heads * D, args.qkv_bias, ops.dequantize, ops.lora_dropout)
        self.o_proj = QLoRALinear(args.num_attention_heads * D, C, args.o_bias, ops.dequantize, ops.lora_dropout)
        self.q_norm = RMSNorm(D, args.rms_norm_eps, ops) if args.qk_norm else None
        self.k_norm = RMSNorm(D, args.rms_norm_eps, ops) if args.qk_norm else None

    def forward(self, x, rope, layout: AttentionLayout, kept: KeptAttention | None = None):
        B, T, _ = x.shape
        replaying = kept is not None and kept.replaying
        # Replaying kept results, only what the projections save is made, not their GEMMs.
        qkv = project(x, (self.q_proj, self.k_proj, self.v_proj), output_unused=replaying)
        if kept is not None:
            qkv = kept.projections(qkv)
        q, k, v = qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)
        q = q.view(B, T, -1, self.head_dim)  # (B, T, Hq, D)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        # A copy, so that attention's saved v does not keep the whole q/k/v output alive.
        v = v.contiguous().view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rope(q, k, *rope)
        # (B, T, Hq, D); a decoding cache's layout (decoding.LayerCache) keeps nothing for a recompute.
        y = layout.attend(q, k, v, self.window) if kept is None else layout.attend(q, k, v, self.window, kept)
        # Replaying, the layer's residual is kept too: o_proj's output is unused.
        return project(y.reshape(B, T, -1), (self.o_proj,), output_unused=replaying)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops):
        super().__init__()
        C, F_, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = QLoRALinear(C, F_, bias, ops.dequantize, ops.lora_dropout)
        self.up_proj = QLoRALinear(C, F_, bias, ops.dequantize, ops.lora_dropout)
        self.down_proj = QLoRALinear(F_, C, bias, ops.dequantize, ops.lora_dropout)
        self.ops = ops
        self.recomputing = False  # set during DecoderLayer's recompute

    def forward(self, x, saving: SavedActivations | None = None):
        gate_up = project(x, (self.gate_proj, self.up_proj))
        hidden = self.ops.swiglu(gate_up)
        # down_proj's backward gets the SwiGLU output (F wide) from gate_up, which SwiGLU's backward
        # keeps anyway, rather than keeping a copy of its own. In a recompute (which activation
        # checkpointing runs without `saving`) its output is thrown away and nothing after it saves a
        # tensor: only what it saves is made, not its GEMM (a quarter of a layer's recompute).
        # Nothing reads the SwiGLU output after down_proj's backward (SwiGLU's reads gate_up), so its
        # gradient (F wide, like it) may take its memory there.
        with saving.rebuilt(hidden, self.ops.swiglu, gate_up) if saving is not None else contextlib.nullcontext():
            return project(hidden, (self.down_proj,), output_unused=self.recomputing, reuse_input=True)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None, ops: Ops):
        super().__init__()
        self.self_attn = Attention(args, window, ops)
        self.mlp = MLP(args, ops)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.mlp_chunk_tokens: int | None = None  # set by Decoder.set_mlp_chunking
        # A compiled layer's recompute must save what its compiled forward saved, so it runs whole.
        self.recompute_context_fn = self._recompute_contexts  # noop_context_fn once compiled

    def forward(self, x, rope, layout: AttentionLayout, saving: SavedActivations | None = None,
                kept: KeptAttention | None = None):
        """`kept`: a recomputed layer's attention results and residual (kept_attention.py).
        `saving` (training, outside activation checkpointing; its hooks active around the call):
        the projections' backward rebuilds the norms' and SwiGLU's outputs from the inputs those ops
        keep anyway, instead of keeping them too: about a third less activation memory per layer for
        three elementwise kernels in backward. torch.compile does not trace saved-tensor hooks: the
        decoder passes none to compiled layers (Decoder.compile_layers), which keep all."""
        attention = self._after_norm(self.input_layernorm, x,
                                     partial(self.self_attn, rope=rope, layout=layout, kept=kept), saving)
        if kept is not None and kept.replaying:
            h = kept.residual(x, attention)
        else:
            h = x + attention
            if kept is not None:
                kept.keep_residual(h)
        chunk = self.mlp_chunk_tokens
        tokens = h.shape[0] * h.shape[1]
        if chunk and tokens > chunk and self.training:
            # The MLP a chunk at a time: its gate/up/SwiGLU intermediates live for one chunk, not for
            # the whole (long) sequence. Under autograd each chunk is recomputed in its own backward;
            # without (a recomputed layer's first pass) nothing is kept anyway.
            rows = h.reshape(tokens, h.shape[-1])
            if torch.is_grad_enabled():
                parts = [checkpoint(self._mlp, part, use_reentrant=False, context_fn=self.recompute_context_fn)
                         for part in rows.split(chunk)]
            else:
                parts = [self._mlp(part) for part in rows.split(chunk)]
            return h + torch.cat(parts).view_as(h)
        return h + self._mlp(h, saving)

    def _recompute_contexts(self):
        """(first pass, recompute) contexts, as torch.utils.checkpoint's context_fn, for this layer
        (RecomputedLayer) or its MLP chunks: the recompute tells the MLP that its output is unused."""
        return contextlib.nullcontext(), self._recomputing()

    @contextlib.contextmanager
    def _recomputing(self):
        self.mlp.recomputing = True
        try:
            yield
        finally:
            self.mlp.recomputing = False

    def _mlp(self, h, saving: SavedActivations | None = None):
        return self._after_norm(self.post_attention_layernorm, h, partial(self.mlp, saving=saving), saving)

    @staticmethod
    def _after_norm(norm: RMSNorm, x, block: Callable, saving: SavedActivations | None):
        normed = norm(x)
        if saving is None:
            return block(normed)
        with saving.rebuilt(normed, norm, x):
            return block(normed)


class RecomputedLayer(torch.autograd.Function):
    """A decoder layer under activation checkpointing: run without autograd in forward, keeping only
    its input x, and run again with autograd in backward, whose gradients then flow through it.

    The first pass builds no autograd graph and saves nothing but x, so the host queues it with
    less work than torch.utils.checkpoint's non-reentrant form, which records the whole graph and
    runs a pack hook for every tensor an op saves (CPU stand-in: a 32-layer model with tiny dims,
    every layer recomputed, 15-28% less host time a step); the recompute's own backward runs nested
    in the step's (the reentrant form). Gradients reach the layer's adapters through that nested
    backward, so the step must be a `.backward()`, not `torch.autograd.grad` (as in training), and
    under DDP each layer runs once a backward (as every objective here does). `rng`: the CPU and
    device generator states before the first pass (_rng_states), replayed for the recompute when
    the layer draws random numbers (LoRA dropout); None when it draws none. `keep_attention`: the
    first pass also keeps the q/k/v projections, attention's output and log-sum-exp and the layer's
    residual, saved beside x, so that the recompute runs neither attention's forward nor the q/k/v
    and o_proj GEMMs (kept_attention.py).
    """

    @staticmethod
    def forward(ctx, x, anchor, layer, rope, layout, rng, keep_attention):
        ctx.layer, ctx.rope, ctx.layout, ctx.rng = layer, rope, layout, rng
        kept = KeptAttention() if keep_attention else None
        with torch.no_grad():
            y = layer(x, rope, layout, kept=kept)
        kept_tensors, ctx.extras = kept.to_save() if kept is not None else ((), ())
        ctx.backward_kernel = kept.backward_kernel if kept is not None else None
        ctx.save_for_backward(x, *kept_tensors)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *kept_tensors = ctx.saved_tensors
        kept = KeptAttention.replay(kept_tensors, ctx.extras, ctx.backward_kernel) if kept_tensors else None
        x = x.detach().requires_grad_(ctx.needs_input_grad[0])
        _, recompute = ctx.layer.recompute_context_fn()
        with _replayed(ctx.rng), torch.enable_grad(), recompute:
            y = ctx.layer(x, ctx.rope, ctx.layout, kept=kept)
        if y.requires_grad:
            torch.autograd.backward(y, grad_y)
        return x.grad, None, None, None, None, None, None


def _rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), device, torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed(rng: tuple | None):
    """The generators set back to `rng` (_rng_states) inside, and to their state on entry after."""
    if rng is None:
        yield
        return
    cpu, device, device_state = rng
    with torch.random.fork_rng(devices=[device] if device_state is not None else []):
        torch.set_rng_state(cpu)
        if device_state is not None:
            torch.cuda.set_rng_state(device_state, device)
        yield


class SavedActivations:
    """Saved-tensor hooks for one training layer outside activation checkpointing: what ops save
    for backward is kept, or rebuilt in backward where `rebuilt` says how, or parked in host memory
    when `park` (ActivationParking.layer's hooks) is given. Not for use under activation
    checkpointing, whose own hooks these would displace.
    """

    def __init__(self, park: tuple[Callable, Callable] | None = None):
        self.park = park
        self.rebuilds: dict[tuple, tuple[Callable, tuple[torch.Tensor, ...]]] = {}
        # While the layer runs forward, parking: each storage (or a view of under half of one) parked
        # once however many ops save it, keyed by ("storage", its address) or by the view's identity.
        # What was parked is held too, so that its memory (and identity) cannot pass to another.
        self.parked: dict[tuple, tuple[torch.Tensor, object]] = {}

    @contextlib.contextmanager
    def hooks(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self.parked.clear()

    @contextlib.contextmanager
    def rebuilt(self, tensor: torch.Tensor, op: Callable[..., torch.Tensor], *inputs: torch.Tensor):
        """Ops run inside that save `tensor` (= op(*inputs)) keep the op and its inputs in its place,
        and backward runs it again (without autograd) when it needs the tensor back. For a cheap op
        whose inputs are saved anyway: the output's memory is freed after forward."""
        identity = _view_identity(tensor)
        self.rebuilds[identity] = op, inputs
        try:
            yield
        finally:
            del self.rebuilds[identity]

    def _pack(self, saved: torch.Tensor):
        rebuild = self.rebuilds.get(_view_identity(saved))
        if rebuild is not None:
            op, inputs = rebuild
            return _Rebuild(op, tuple(self._keep(t) for t in inputs))
        return self._keep(saved)

    def _keep(self, tensor: torch.Tensor):
        if self.park is None:
            return tensor
        storage = tensor.untyped_storage()
        whole = ("storage", storage.data_ptr())
        if whole not in self.parked and 2 * tensor.numel() * tensor.element_size() >= storage.nbytes():
            # Ops save different views of one tensor (attention's output as its kernel keeps it, and
            # the same bytes as o_proj's input): its storage is parked once, for all of them. A view
            # of less than half its storage parks alone.
            flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            self.parked[whole] = flat, self.park[0](flat)
        if whole in self.parked:
            return _ParkedView(self.parked[whole][1], tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
                               tensor.dtype)
        identity = _view_identity(tensor)
        if identity not in self.parked:
            self.parked[identity] = tensor, self.park[0](tensor)
        return self.parked[identity][1]

    def _unpack(self, packed):
        if isinstance(packed, _Rebuild):
            with torch.no_grad():
                return packed.op(*(self._restore(t) for t in packed.inputs))
        return self._restore(packed)

    def _restore(self, packed) -> torch.Tensor:
        if self.park is None:
            return packed
        if isinstance(packed, _ParkedView):
            storage = self.park[1](packed.storage).untyped_storage()
            return torch.empty(0, dtype=packed.dtype, device=storage.device).set_(storage, packed.offset, packed.shape,
                                                                                  packed.stride)
        return self.park[1](packed)


@dataclass(frozen=True)
class _ParkedView:
    """A saved tensor as a view of its parked storage (a flat byte tensor, as the park hook packed it)."""

    storage: object
    offset: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _view_identity(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


@dataclass(frozen=True)
class _Rebuild:
    op: Callable[..., torch.Tensor]
    inputs: tuple


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops, device: torch.device):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(args, window, ops) for window in args.windows)
        self.ops = ops
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.register_buffer("inv_freq", rope_frequencies(args.head_dim, args.rope).to(device), persistent=False)
        self.use_varlen = False  # set by the loader: CUDA with a 16-bit compute dtype
        self.checkpointed_layers = 0  # how many layers recompute in backward: set_checkpointing
        self.parked_layers = 0  # how many keep what they save in host memory: set_checkpointing
        self.layer_roles: list[str] = ["keep"] * len(self.layers)  # per layer: "recompute", "park" or "keep"
        self.park_checkpoints = False
        # Recomputed layers keep attention's results where their inputs are parked (kept_attention.py).
        self.keep_attention = True
        # An input of every RecomputedLayer that needs a gradient, so that a layer whose input does
        # not (the first: embeddings are frozen) still has an output that does, for its adapters.
        self.recompute_anchor = torch.empty(0, requires_grad=True)
        self.linears: list[QLoRALinear] | None = None  # every layer's projections, listed on first use
        self.parking: ActivationParking | None = None  # when anything parks
        self.layers_compiled = False  # compile_layers
        self.streamer: WeightStreamer | None = None  # set by stream_weights
        # LoRA operands a recomputed layer's first pass makes for its recompute (lora.SharedOperands).
        self.shared_operands = SharedOperands()

    def compile_layers(self) -> None:
        """torch.compile each decoder layer (model.compile). Compiled layers keep all they save."""
        for layer in self.layers:
            layer.compile()
            layer.recompute_context_fn = noop_context_fn
        self.layers_compiled = True

    def set_mlp_chunking(self, tokens: int | None) -> None:
        """Training runs each layer's MLP over at most `tokens` tokens at a time (None: all at once)."""
        for layer in self.layers:
            layer.mlp_chunk_tokens = tokens

    def stream_weights(self, device: torch.device) -> None:
        """Keep the layers' 4-bit weights in pinned host memory and bring each to `device` just before use."""
        if device.type != "cuda":
            raise ConfigError("weight streaming (hardware.offload=weights or all) needs a CUDA device: on the CPU "
                              "the weights are in host memory already.")
        self.streamer = WeightStreamer(self.layers, device)

    def set_checkpointing(self, layers: int, offload: bool = False, parked: int = 0) -> None:
        """Recompute `layers` decoder layers in backward (ModelConfig.checkpointed_layers says how
        many, and checks the range); `offload` parks their inputs in host memory; up to `parked`
        other layers are not recomputed and park everything they save (parking.py). The rest keep
        what they save on the GPU; they come last.

        Parked layers are spread evenly among the recomputed ones, starting with layer 0: a parked
        layer's copies (a whole layer's activations) then run behind recomputed layers' compute,
        which moves only an input, instead of queueing behind each other; and the last layer,
        whose backward comes first, recomputes rather than waiting for its activations to return.
        """
        parked = min(parked, len(self.layers) - layers)
        self.checkpointed_layers, self.park_checkpoints, self.parked_layers = layers, offload, parked
        self.parking = ActivationParking() if offload or parked else None
        spread = layers + parked
        parked_at = {index * spread // parked for index in range(parked)}
        self.layer_roles = ["keep" if index >= spread else "park" if index in parked_at else "recompute"
                            for index in range(len(self.layers))]
        for role, layer in zip(self.layer_roles, self.layers):
            for linear in linear_layers(layer).values():
                linear.keep_dequantized = role == "recompute"
            # Except gate/up (2 F x C, the layer's largest): kept, they would be held from the
            # recompute through down_proj's backward, the step's memory peak (235 MB for an 8B).
            # Dequantized again for their own backward instead: one more pass over their codes.
            layer.mlp.gate_proj.keep_dequantized = layer.mlp.up_proj.keep_dequantized = False
            for first in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
                first.shared_operands = self.shared_operands if role == "recompute" else None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None,
                cache: decoding.KVCache | None = None, shared: bool = False, decode_width: int | None = None):
        """`cache`: decoding (decoding.py); the new tokens' keys and values join it, positions follow on
        (`shared`: one row of tokens that every row of the cache continues with; `decode_width`: one
        token per row at the cache's slot, attending to that many slots: KVCache.extend_one)."""
        if cache is None:
            position_ids, layout = plan_attention(input_ids, attention_mask, position_ids, cu_seqlens,
                                                  self.use_varlen)
        elif decode_width is not None:
            position_ids = cache.extend_one(decode_width)
        else:
            position_ids = cache.extend(attention_mask, input_ids.shape[1], rows=1 if shared else None)
        rope = self.ops.rope_tables(position_ids, self.inv_freq)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        training = self.training and torch.is_grad_enabled()
        roles = self.layer_roles if training else ["keep"] * len(self.layers)
        # Recomputed layers replay the random draws of their first pass (LoRA dropout) in the recompute.
        if self.linears is None:
            self.linears = list(linear_layers(self).values())
        draws_random = training and "recompute" in roles and any(
            linear.lora_dropout > 0 and linear.lora_A is not None and linear.adapter_enabled for linear in self.linears)
        # Not for compiled layers (a dict read inside them would break their graphs), weight streaming
        # (whose memory is too tight to hold more) or FSDP units (DecoderLayer wrapped), whose LoRA
        # weights are gathered per use.
        self.shared_operands.start(enabled=training and "recompute" in roles and not self.layers_compiled
                                   and self.streamer is None and type(self.layers[0]) is DecoderLayer)
        streamer = self.streamer
        # Attention's results are kept where they wait in host memory and attention is a large share
        # of the recompute (kept_attention.py); compiled layers always recompute whole.
        span = input_ids.shape[1] // (layout.equal_samples or 1) if cache is None else 0
        keep_attention = (self.keep_attention and self.park_checkpoints and span >= MIN_ROW_TOKENS
                          and not self.layers_compiled)
        for index, layer in enumerate(self.layers):
            if streamer is not None:
                # Decoding runs the layers again right after the last one: start bringing layer 0.
                upcoming = 0 if cache is not None and index + 1 == len(self.layers) else index + 1
                streamer.acquire(index, upcoming)
            if roles[index] == "recompute":
                # A checkpointed layer keeps only its input x; offloading parks it in pinned host memory.
                run = (x, self.recompute_anchor, layer, rope, layout, _rng_states(x.device) if draws_random else None,
                       keep_attention)
                if self.park_checkpoints:
                    with self.parking.layer(index) as park, torch.autograd.graph.saved_tensors_hooks(*park):
                        x = RecomputedLayer.apply(*run)
                else:
                    x = RecomputedLayer.apply(*run)
            elif training and not self.layers_compiled:
                with self.parking.layer(index, layer, rope) if roles[index] == "park" else contextlib.nullcontext() as park:
                    saving = SavedActivations(park)
                    with saving.hooks():
                        x = layer(x, rope, layout, saving=saving)
            else:
                x = layer(x, rope, layout if cache is None else cache.layer(index))
            if streamer is not None:
                x = streamer.before_backward(x, index)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class NativeCausalLM(nn.Module):
    """The frozen 4-bit decoder plus LoRA; meets `finetune.models.protocol.TrainableModel`."""

    takes_packed_boundaries = True
    cuda_graph_decoding = True  # decoding.DecodeSteps replays graphs on CUDA (False: eager steps, for comparison)

    def __init__(self, args: ModelArgs, ops: Ops, device: torch.device, name_or_path: str = ""):
        super().__init__()
        self.args, self.ops, self.name_or_path = args, ops, name_or_path
        self.model = Decoder(args, ops, device)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cu_seqlens=None,
                num_items_in_batch=None, use_cache=None, per_sequence_logps=False) -> CausalLMOutput | SequenceLogps:
        """Loss (summed token CE / num_items_in_batch, or the mean) when labels are given, else logits;
        with per_sequence_logps, `sequence_logps`.

        labels[t + 1] is the target at position t (transformers' shift); IGNORE_INDEX is skipped.
        use_cache is accepted for transformers-style callers and ignored (decoding uses `generate`).
        """
        if per_sequence_logps:
            return self.sequence_logps(input_ids, labels, attention_mask, position_ids, cu_seqlens)
        hidden = self.model(input_ids, attention_mask, position_ids, cu_seqlens)  # (B, T, C)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden))
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        loss = self.ops.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                             num_items_in_batch=num_items_in_batch)
        return CausalLMOutput(loss=loss)

    def generate(self, input_ids, attention_mask=None, generation_config=None, streamer=None, stopping_criteria=None,
                 **kwargs) -> torch.Tensor:
        """transformers' `generate` (greedy or sampled, KV-cached): see decoding.generate."""
        return decoding.generate(self, input_ids, attention_mask, generation_config, streamer, stopping_criteria,
                                 **kwargs)

    def new_cache(self, batch: int, max_len: int) -> decoding.KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens, beside the unquantized weights."""
        # The LM head, not the input embeddings: those may stay in host memory (host_embeddings).
        args, head = self.args, self.lm_head.weight
        return decoding.KVCache(args.num_hidden_layers, batch, args.num_key_value_heads, args.head_dim, max_len,
                                head.dtype, head.device)

    def host_embeddings(self) -> None:
        """Keep the input embedding table in host memory (pinned where the model is on CUDA); each
        forward reads the rows it needs (host_embedding.py). Not for a tied LM head, which reads
        the whole table every step."""
        if self.args.tie_word_embeddings:
            raise ConfigError("the input embeddings are tied to the LM head, which needs all of them on the GPU "
                              "every step; they cannot stay in host memory.")
        self.model.embed_tokens = HostEmbedding.from_embedding(self.model.embed_tokens,
                                                               pin=self.lm_head.weight.device.type == "cuda")

    def sequence_logps(self, input_ids, labels, attention_mask=None, position_ids=None,
                       cu_seqlens=None) -> SequenceLogps:
        """Per-sequence summed label log-probs from the fused LM head + cross-entropy: per-token
        losses (N,) come out, the (N, vocab) logits are never formed."""
        hidden = self.model(input_ids, attention_mask, position_ids, cu_seqlens)  # (B, T, C)
        targets = shifted_targets(labels)  # (B, T)
        token_losses = self.ops.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                                     reduction="none")  # (B * T,) fp32, 0 where ignored
        return sum_per_sequence(-token_losses.view_as(targets), targets, cu_seqlens, position_ids)

    @contextlib.contextmanager
    def adapter_disabled(self):
        layers = linear_layers(self).values()
        for layer in layers:
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.adapter_enabled = True

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask, cache: decoding.KVCache,
                          shared: bool = False) -> torch.Tensor:
        """Feed the next tokens (B, T) through `cache`; the logits (B, V) after the last of them.

        `shared`: input_ids is one row (1, T) that every row of the cache continues with.
        """
        hidden = self.model(input_ids, attention_mask, cache=cache, shared=shared)  # (B, T, C)
        return self.lm_head(hidden[:, -1])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: decoding.KVCache, width: int) -> torch.Tensor:
        """One token per row (B, 1) into the cache's slot `cache.slot`, attending to its first `width`
        slots; the logits (B, V). Fixed shapes and no host synchronization: decoding.DecodeSteps
        captures it as a CUDA graph."""
        hidden = self.model(tokens, cache=cache, decode_width=width)  # (B, 1, C)
        return self.lm_head(hidden[:, -1])

    def fsdp_wrap_policy(self) -> ModuleWrapPolicy:
        """Make the 4-bit codes shardable and say how to wrap; returns FSDP's auto_wrap_policy.

        FSDP shards parameters, not buffers: each weight's packed codes become a frozen float32
        parameter over the same bytes (FSDP only copies them; the kernels read them as bytes
        again). Each weight is a unit of its own, so no unit mixes frozen codes with trainable
        LoRA weights: FSDP gives a unit one gradient buffer over all of its parameters, and codes
        beside LoRA would get float32 gradients as large as themselves. Their layer reads them by
        calling the unit (`QuantizedWeight.forward`), which is when FSDP gathers them, in forward,
        recompute and backward alike. A decoder layer's unit keeps its fp32 LoRA weights and its
        biases (stored in float32 here: exact, they are bf16 values cast back per use). Norms
        (the compute dtype) get units of their own; the embeddings and LM head stay in the root.
        """
        for name, linear in linear_layers(self).items():
            weight = linear.weight
            packed = weight.packed
            if packed.numel() % 4:
                raise ConfigError(f"FSDP: {name} holds {packed.numel()} bytes of 4-bit codes, not a multiple "
                                  "of 4, so they cannot be sharded as float32; use DDP for this model.")
            del weight._buffers["packed"]
            weight.packed = nn.Parameter(packed.reshape(-1).view(torch.float32), requires_grad=False)
            weight.dequantize_with, linear.dequantize = linear.dequantize, _call_weight_unit
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.float(), requires_grad=False)
        return ModuleWrapPolicy({QuantizedWeight, DecoderLayer, RMSNorm})

    def save_pretrained(self, directory, state_dict: dict | None = None) -> None:
        """The adapter in peft's format: adapter_config.json + adapter_model.safetensors.

        `state_dict`: the model's full state gathered from FSDP shards, to take the LoRA weights from.
        """
        save_qlora_adapter(self, Path(directory), self.name_or_path, state_dict)

    def load_adapter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Resume: saved LoRA tensors (peft's keys) copied into the existing adapters in place."""
        copy_qlora_weights(self, weights)

    def fsdp_param_init(self, device: torch.device):
        return partial(materialize_empty, device=device)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {lora_key(name, which): getattr(layer, which)
                for name, layer in adapted_layers(self).items() for which in ("lora_A", "lora_B")}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_adapter_weights(state)

    def save_adapter(self, directory: Path, gathered_state: dict[str, torch.Tensor] | None = None) -> None:
        self.save_pretrained(directory, gathered_state)

    def param_count(self) -> int:
        # The 4-bit codes are buffers here (parameters once FSDP-ready, counted by their shape alone).
        codes = {id(layer.weight.packed) for layer in linear_layers(self).values()}
        dense = sum(p.numel() for p in self.parameters() if id(p) not in codes)
        embeddings = self.model.embed_tokens
        on_host = embeddings.table.numel() if isinstance(embeddings, HostEmbedding) else 0
        return dense + on_host + sum(layer.weight.shape.numel() for layer in linear_layers(self).values())

    def memory_footprint(self) -> int:
        tensors = {t.data_ptr(): t for t in (*self.parameters(), *self.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def _call_weight_unit(weight, out=None):
    # `weight` is FSDP's unit around a QuantizedWeight: calling it gathers the codes for the call.
    return weight(out=out)


def materialize_empty(module: nn.Module, device: torch.device) -> None:
    """FSDP's param_init_fn for a model from empty_pretrained: storage on `device` for the meta
    tensors `module` holds itself (not its children's; FSDP calls this once per module).

    The values are left unset: FSDP broadcasts the first process's right after. Parameters keep
    their Python objects (their contents are swapped in), so the optimizer, built over them before
    FSDP wraps the model, and a tied LM head still point at them.
    """
    for param in module.parameters(recurse=False):
        if param.is_meta:
            filled = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
            torch.utils.swap_tensors(param, filled)
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_meta:
            module._buffers[name] = torch.empty_like(buffer, device=device)
