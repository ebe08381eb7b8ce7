"""The memory plan of a run: what a QLoRA step keeps on the GPU, and what moves to host memory.

Everything is counted from the architecture's sizes (its config.json, or the table of known
architectures for a hub id), so `train.dry_run=true` loads no weights and needs no network. All
figures are bytes; the printed plan shows GiB (2**30) and GB (1e9) side by side. Notation, per
decoder layer: C hidden size, F MLP size, qd = query heads x head_dim, kvd = key/value heads x
head_dim, L layers, V vocabulary, r LoRA rank, b bytes of the compute dtype, N tokens per micro-batch.

What a step holds on the GPU:
  - frozen weights: the seven linear projections of each layer in NF4 (half a byte per weight plus
    the blockwise constants bitsandbytes keeps, see `nf4_tensor_bytes`); embeddings, LM head and
    norms unquantized, as in QLoRA;
  - LoRA: the fp32 adapters (peft's default: `autocast_adapter_dtype=True` upcasts adapters of a
    16-bit base to fp32; finetune.lora does the same), their fp32 gradients, the optimizer states;
  - one dequantized weight at a time (each layer's weight exists in full precision only while its
    own matmul runs, in forward and again in backward);
  - activations, linear in N (see `activation_bytes_per_token`), and the loss: a chunk of logits on
    the native path's fused linear + cross-entropy, the full logits on the generic path, which
    also materializes one layer's attention scores (quadratic in the sequence length);
  - the CUDA runtime, and the allocator's fragmentation.

When that does not fit, two things can leave the GPU (hardware.offload): checkpointed layer inputs
wait in pinned host memory until backward, and the NF4 layer weights stream from pinned host
memory a few layers ahead of the compute. `plan_for_run` picks the cheapest choice that fits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from finetune.config import (ConfigError, Dtype, HardwareConfig, ModelImpl, ObjectiveName, OffloadMode, Optimizer,
                             RunConfig)
from finetune.lora import select_targets
from finetune.models import MemoryLayout, choose_impl
from finetune.models.native.kept_attention import MIN_ROW_TOKENS as KEPT_ATTENTION_MIN_ROW_TOKENS
from finetune.models.native.parking import LAYERS_IN_FLIGHT
from finetune.models.native.streaming import SLOTS
from finetune.models.source import ModelSource, locate_source
from finetune.plan.perf import (ASSUMED_MFU, ASSUMED_PEAK_TFLOPS, DEFAULT_HOST_LINK_GBPS,
                                PARKING_BYTES_PER_FORWARD_FLOP, PARKING_COST, LayerFlops)

GiB = 2**30
GB = 10**9

# A "24 GB" consumer card (RTX 3090/4090): the budget assumed where no CUDA device answers and
# hardware.gpu_memory_gb is unset, e.g. when planning on a laptop.
DEFAULT_GPU_GIB = 24.0
# Outside PyTorch's allocator: the CUDA context (about 0.5 GiB with torch 2.x on Hopper) plus
# cuBLAS, cuDNN and Triton workspaces and loaded kernels.
RUNTIME_BYTES = 1 * GiB
# The caching allocator reserves more than it hands out (block rounding, split blocks that cannot
# be reused for a larger request); 5% above the allocated peak covers a steady training loop.
FRAGMENTATION = 0.05
OVERHEAD_ITEMS = ("allocator fragmentation", "CUDA context + workspaces")
# model.mlp_chunk_tokens unset where nothing fits without chunks: Llama-3.1-8B trained 1 x 131072
# under a 24 GiB cap in 8,192-token chunks (18.3 GiB on an H100, issue #17).
AUTO_MLP_CHUNK_TOKENS = 8192
# The shortest sequence where parked layers (model.parked_layers, with MLP chunks) were measured to
# beat recomputing: Llama-3-8B at 1 x 32768 on an H100, 1.11x with all 32 layers parked; at
# 2 x 2048 the copies outlasted the compute (0.60x). The dry run suggests them from here on.
PARKING_PAYS_FROM_TOKENS = 32768
# Pinned memory is locked in RAM: what the plan parks for speed, or suggests parking, keeps to half
# the machine's, for everything else.
PARKING_RAM_SHARE = 0.5
# With activation offload the GPU still holds two layer inputs: in forward the current input and
# the output being copied out, in backward the one being recomputed and the next one copied back.
OFFLOADED_CHECKPOINTS_ON_GPU = 2
# Streamed weight transfers per micro-batch: forward, then backward; each layer's recompute runs
# right before its own backward, so one copy serves both.
TRANSFERS_PER_MICRO_BATCH = 2
# A loss on full logits (the generic path, or the native one without its kernels), bytes per
# (token, vocabulary entry): forward holds bf16 logits, their fp32 upcast (transformers'
# ForCausalLMLoss) and the fp32 log-probs, 2 + 4 + 4; backward the saved log-probs, their gradient
# and the logits' fp32 gradient, 4 + 4 + 4, the peak.
FULL_LOGITS_BYTES = 12
# The generic path's attention keeps its scores: bytes per (head, query, key) of one layer.
# BENCH.md's generic-path peaks grow faster than the token count (17.8 GiB at 2 x 2048 tokens, 48.6
# at 1 x 8192, Llama-3-8B on an H200); with everything else counted as below, the two rows give
# ~12.5 bytes per score (the math SDPA kernel's bf16 scores, fp32 softmax and their gradients)
# and a per-token residue within 5% of the derived one. The plan then allocates 17.6 and 48.1 GiB.
HF_ATTENTION_SCORE_BYTES = 12.5
# bitsandbytes' 8-bit optimizers keep 32-bit states for tensors smaller than this
# (`min_8bit_size`), and one fp32 absmax per 256-element block per state for the others.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCK = 256

DTYPE_BYTES = {Dtype.bfloat16: 2, Dtype.float16: 2, Dtype.float32: 4}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Cheapest first: each step down costs host-link traffic the one before it does not.
OFFLOAD_ORDER = (OffloadMode.none, OffloadMode.activations, OffloadMode.weights, OffloadMode.all)
STREAMS_WEIGHTS = (OffloadMode.weights, OffloadMode.all)
PARKS_ACTIVATIONS = (OffloadMode.activations, OffloadMode.all)


# ---------------------------------------------------------------- sizes from the architecture

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def projection_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear projection of one decoder layer."""
    C, F = arch["hidden_size"], arch["intermediate_size"]
    qd, kvd = _attention_dims(arch)
    return {"q_proj": (C, qd), "k_proj": (C, kvd), "v_proj": (C, kvd), "o_proj": (qd, C),
            "gate_proj": (C, F), "up_proj": (C, F), "down_proj": (F, C)}


# The native decoder's projection groups, which share one input and one set of LoRA operands.
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def lora_operand_bytes(arch: dict, r: int, targets, dtype_bytes: int) -> int:
    """One layer's LoRA operands in the compute dtype (lora.SharedOperands): per group the stacked A
    (R, in) and the block S (sum out, R), R the group's ranks padded to a multiple of 8."""
    shapes, total = projection_shapes(arch), 0
    for group in PROJECTION_GROUPS:
        ranks = r * sum(name in targets for name in group)
        if ranks:
            ranks += -ranks % 8
            total += ranks * (shapes[group[0]][0] + sum(shapes[name][1] for name in group))
    return total * dtype_bytes


def _attention_dims(arch: dict) -> tuple[int, int]:
    heads = arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
    return heads * head_dim, (arch.get("num_key_value_heads") or heads) * head_dim


def linear_param_count(arch: dict) -> int:
    """Weights of all layers' linear projections: the part stored in 4 bits."""
    return arch["num_hidden_layers"] * sum(i * o for i, o in projection_shapes(arch).values())


def nf4_tensor_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of one weight after `bitsandbytes.functional.quantize_4bit` (what finetune.quant stores).

    Packed codes: half a byte per weight. One absmax per block of 64 weights: fp32, or with double
    quantization uint8 codes plus, per 256 of them, one fp32 absmax, and an fp32 offset and the
    256-entry fp32 code of that second quantization. Every weight carries its 16-entry fp32 NF4 code.
    """
    blocks = math.ceil(numel / blocksize)
    nf4_code = 16 * 4
    if not double_quant:
        return math.ceil(numel / 2) + 4 * blocks + nf4_code
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 + nf4_code


def nf4_layer_bytes(arch: dict, double_quant: bool = True) -> int:
    return sum(nf4_tensor_bytes(i * o, double_quant) for i, o in projection_shapes(arch).values())


def nf4_linear_bytes(arch: dict, double_quant: bool = True) -> int:
    """All layers' linear weights in NF4, constants included."""
    return arch["num_hidden_layers"] * nf4_layer_bytes(arch, double_quant)


def embedding_bytes(arch: dict, dtype_bytes: int) -> int:
    """The input embedding table (an untied LM head is its size too)."""
    return arch["vocab_size"] * arch["hidden_size"] * dtype_bytes


def dense_weight_bytes(arch: dict, dtype_bytes: int) -> int:
    """The unquantized weights: embeddings, LM head (unless tied to them) and RMSNorm weights.

    Biases (Qwen2's q/k/v: under a megabyte) and Qwen3's per-head q/k norms are below the plan's
    resolution and left out.
    """
    matrices = 1 if arch.get("tie_word_embeddings", False) else 2
    norms = 2 * arch["num_hidden_layers"] + 1
    return matrices * embedding_bytes(arch, dtype_bytes) + norms * arch["hidden_size"] * dtype_bytes


def lora_targets(target_modules, layers: int = 1) -> tuple[str, ...]:
    """The projections a lora.target_modules setting adapts in a decoder of `layers` layers, matched
    as the LoRA layers match it (finetune.lora.select_targets, peft's rules): "all-linear", a regular
    expression over full names, or a list of names or name suffixes. Saved adapters list full names
    ("model.layers.0.self_attn.q_proj"), and loading one plans with that list.

    A projection adapted in any layer counts for every layer, which over-counts only the small LoRA
    matrices of an adapter that skips some layers.
    """
    names = [f"model.layers.{layer}.{'mlp' if name in MLP_PROJECTIONS else 'self_attn'}.{name}"
             for layer in range(layers) for name in PROJECTIONS]
    selected = {name.rsplit(".", 1)[-1] for name in select_targets(names, target_modules)}
    return tuple(name for name in PROJECTIONS if name in selected)


def lora_tensor_sizes(arch: dict, r: int, targets) -> list[int]:
    """Element counts of every LoRA matrix: A (r, in) and B (out, r) per adapted projection."""
    shapes = projection_shapes(arch)
    per_layer = [n for name in targets for n in (r * shapes[name][0], shapes[name][1] * r)]
    return per_layer * arch["num_hidden_layers"]


def lora_param_count(arch: dict, r: int, targets) -> int:
    return sum(lora_tensor_sizes(arch, r, targets))


def optimizer_state_bytes(tensor_sizes: list[int], optimizer: Optimizer) -> int:
    """AdamW's two moments: fp32 each, or bitsandbytes' blockwise 8-bit with an fp32 absmax per block."""
    if optimizer is Optimizer.adamw:
        return 8 * sum(tensor_sizes)
    return sum(8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)
               for n in tensor_sizes)


@dataclass(frozen=True)
class ActivationSizes:
    """Bytes per token of what autograd keeps during a step, grouped by how long it lives."""

    checkpoint: int  # a layer's input: all a checkpointed layer keeps until its backward
    layer: int  # what one layer keeps for its backward beyond its input
    backward: int  # gradients alive together at the peak of one layer's backward
    model: int  # kept once for all layers: rope tables, the final norm's output, ids and labels
    mlp: int = 0  # the part of `layer` inside the MLP block (native), which model.mlp_chunk_tokens bounds
    mlp_backward: int = 0  # the part of `backward` inside the MLP block (native)
    # The parts of `layer` that a native layer outside checkpointing rebuilds in backward instead of
    # keeping (DecoderLayer's `lean`): normed x, and in the MLP block normed h and the SwiGLU output.
    rebuilt_attention: int = 0
    rebuilt_mlp: int = 0

    def kept(self, mlp_chunked: bool) -> int:
        """What a layer outside checkpointing keeps per token, its input included. Under MLP chunks
        each chunk's MLP is checkpointed on its own and the layer keeps none of the MLP's share (a
        chunk's input is a view of the residual it keeps anyway)."""
        mlp = self.mlp if mlp_chunked else self.rebuilt_mlp
        return self.checkpoint + self.layer - self.rebuilt_attention - mlp


def activation_bytes_per_token(arch: dict, dtype_bytes: int, r: int, targets, lora_dropout: float,
                               impl: ModelImpl, compiled: bool = False) -> ActivationSizes:
    """Per-token activation sizes of one training step, derived from what each op saves.

    Native layer (finetune.models.native, Triton kernels), beyond its input x:
        b (C + qd + 2 kvd + qd + C + C + 3F)    normed x; q and k after rope, v; attention output;
                                                h = x + attn and normed h; gate, up, SwiGLU output
        + 4 Hq + 2 * 4                          attention logsumexp, each RMSNorm's 1/rms (fp32)
        + per adapted projection: b r           x A^T, and with dropout a 1-byte mask per input
    Generic layer (transformers + peft), where it differs: each LlamaRMSNorm keeps an fp32 copy of
    its input (4C instead of bC); k and v are repeated to qd heads under a padding mask; the MLP
    keeps silu(gate) besides gate, up and their product (4F); and peft casts each adapted input to
    fp32 for its fp32 adapter (4 in, plus the dropout mask) and keeps x A^T in fp32 (4 r).
    Backward peak: the gradients of gate, up and the SwiGLU output with the residual stream's
    incoming and outgoing gradient, b (3F + 2C).
    The MLP block's share (native; model.mlp_chunk_tokens holds it to one chunk of tokens): normed
    h, gate/up and the SwiGLU output, b (C + 3F), its 1/rms, its projections' LoRA terms, and in
    backward b 3F.
    Outside checkpointing a native layer keeps b (C + C + F) less (`rebuilt_attention`, `rebuilt_mlp`):
    the norms' outputs and the SwiGLU output are rebuilt in backward from the inputs that the norms
    and SwiGLU keep for their own backward. A recomputed layer keeps them until its backward, and so
    does a compiled one (`compiled`, model.compile: torch.compile does not trace the hooks that rebuild).
    Attention is counted as a memory-efficient kernel (cuDNN, flash, varlen), linear in the sequence
    length; the generic path's materialized scores are a separate line (HF_ATTENTION_SCORE_BYTES).
    """
    C, F, b = arch["hidden_size"], arch["intermediate_size"], dtype_bytes
    qd, kvd = _attention_dims(arch)
    heads = arch["num_attention_heads"]
    shapes = projection_shapes(arch)
    # LoRA dropout keeps a 1-byte mask per input element of each adapted projection.
    mask = {name: shapes[name][0] if lora_dropout > 0 else 0 for name in targets}
    mlp = mlp_backward = rebuilt_attention = rebuilt_mlp = 0
    if impl is ModelImpl.native and not compiled:
        rebuilt_attention, rebuilt_mlp = b * C, b * (C + F)
    if impl is ModelImpl.native:
        layer = b * (C + qd + 2 * kvd + qd + C + C + 3 * F) + 4 * heads + 2 * 4
        layer += sum(b * r + mask[name] for name in targets)
        mlp = b * (C + 3 * F) + 4 + sum(b * r + mask[name] for name in targets if name in MLP_PROJECTIONS)
        mlp_backward = b * 3 * F
    else:
        layer = 4 * C + b * C + b * 4 * qd + 4 * heads + 4 * C + b * C + b * 4 * F + 2 * 4
        layer += sum(4 * shapes[name][0] + 4 * r + mask[name] for name in targets)
    head_dim = qd // heads
    model = 2 * 4 * head_dim + b * C + 3 * 8  # fp32 cos and sin, the LM head's input, int64 ids/labels/positions
    return ActivationSizes(checkpoint=b * C, layer=layer, backward=b * (3 * F + 2 * C), model=model, mlp=mlp,
                           mlp_backward=mlp_backward, rebuilt_attention=rebuilt_attention, rebuilt_mlp=rebuilt_mlp)


def loss_chunk_tokens(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per logits chunk of the fused linear + cross-entropy kernel (its default).

    A chunk's logits are sized like the hidden states themselves, rounded up to a power of two, so
    the loss costs at most about one more copy of them; kernels/fused_linear_ce.py's
    `_default_chunk_size`, which tests/plan/test_memory.py checks this against.
    """
    return max(1, min(tokens, 1 << (-(-tokens * hidden_size // vocab_size) - 1).bit_length()))


def loss_bytes(arch: dict, tokens: int, dtype_bytes: int, chunked: bool) -> int:
    """The loss's own memory: chunked, one chunk of logits plus the hidden-state gradient it computes
    in forward (and fp32 per-token losses); else the full logits (FULL_LOGITS_BYTES per entry)."""
    C, V = arch["hidden_size"], arch["vocab_size"]
    if not chunked:
        return tokens * V * FULL_LOGITS_BYTES
    return loss_chunk_tokens(tokens, C, V) * V * dtype_bytes + tokens * C * dtype_bytes + tokens * 4


def useful_flops_per_token(arch: dict, seq_len: int) -> float:
    """BENCH.md's MFU numerator: 4 x linear weights (LM head included) plus 3 x causal attention."""
    qd, _ = _attention_dims(arch)
    linear = linear_param_count(arch) + arch["hidden_size"] * arch["vocab_size"]
    attention_forward = 2 * seq_len * qd * arch["num_hidden_layers"]
    return 4 * linear + 3 * attention_forward


def layer_flops(arch: dict, seq_len: int) -> LayerFlops:
    """One decoder layer's forward matmul work per token, over rows of `seq_len` tokens."""
    shapes = projection_shapes(arch)
    qd, _ = _attention_dims(arch)
    return LayerFlops(projections=2 * sum(i * o for i, o in shapes.values()),
                      mlp=2 * sum(i * o for name, (i, o) in shapes.items() if name in MLP_PROJECTIONS),
                      attention=2 * seq_len * qd)


# ---------------------------------------------------------------- the architecture

def checked_architecture(source: ModelSource) -> dict:
    """The source's config, refused where the plan cannot size it."""
    arch = source.config
    if any(key in arch for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ConfigError(f"{source.described_by} describes a mixture-of-experts model; the memory plan sizes "
                          "dense decoders only.")
    missing = [key for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if key not in arch]
    if missing:
        raise ConfigError(f"{source.described_by} lacks {', '.join(missing)}: the memory plan sizes Llama-like "
                          "decoders only.")
    return arch


def decide_memory_layout(cfg: RunConfig, source: ModelSource, impl: ModelImpl, impl_reason: str,
                         device, notices: list[str]) -> MemoryLayout:
    """hardware.offload and model.checkpoint_layers, with auto settled by the plan: what the native
    path moves to host memory and how many layers it recomputes.

    Only CUDA plans anything: elsewhere the weights and activations are in host memory already, and
    every layer recomputes (checkpoint_layers=auto saves host memory as it did before auto existed).
    """
    if device.type != "cuda" or impl is not ModelImpl.native:
        return MemoryLayout()
    mode = cfg.hardware.offload
    auto_layers = cfg.model.plans_checkpoint_layers()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and (mode is OffloadMode.auto or auto_layers):
        # The planner plans one process holding the whole base, which DDP's and FSDP's processes
        # do not; and its answer for a big model, streaming, runs in one process only.
        if mode is OffloadMode.auto:
            notices.append(f"hardware.offload=auto: none under {processes} processes (the memory planner plans one "
                           "process); pass hardware.offload=activations to keep checkpoints in host memory.")
            mode = OffloadMode.none
        if auto_layers:
            notices.append(f"model.checkpoint_layers=auto: all layers under {processes} processes (the memory "
                           "planner plans one process); pass a number of layers to recompute fewer.")
            auto_layers = False
    planned_layers = planned_chunks = plan = None
    # Kept attention is planned too where it may apply: it gives way where it would not fit.
    attention_may_be_kept = cfg.model.keep_attention and processes == 1 and \
        (mode in PARKS_ACTIVATIONS or cfg.model.offload_checkpoints)
    if mode is OffloadMode.auto or auto_layers or attention_may_be_kept:
        plan = plan_for_run(cfg, source, impl, impl_reason)
        planned = f"planned peak {plan.gpu_total / GiB:.1f} GiB of {plan.budget_bytes / GiB:.1f} GiB " \
                  f"({plan.budget_source})" + ("" if plan.fits else "; the plan says it does not fit, see train.dry_run=true")
        if mode is OffloadMode.auto:
            mode = plan.offload
            notices.append(f"hardware.offload=auto: {mode.value}, {planned}"
                           + (f"; picked {plan.offload_for_speed.rstrip(',')}" if plan.offload_for_speed else ""))
        if auto_layers:
            planned_layers = plan.checkpointed_layers
            notices.append(f"model.checkpoint_layers=auto: recomputing {planned_layers} of "
                           f"{source.config['num_hidden_layers']} layers, {planned}")
        if cfg.model.mlp_chunk_tokens is None and plan.mlp_chunk_tokens:
            planned_chunks = plan.mlp_chunk_tokens
            notices.append(f"model.mlp_chunk_tokens unset: the MLP runs in {planned_chunks:,}-token chunks, "
                           "without which the step would not fit")
        if cfg.model.keep_attention and not plan.keep_attention:
            notices.append("model.keep_attention: recomputed layers recompute attention too; keeping its results "
                           "does not fit, or costs more, by the memory plan (train.dry_run=true shows it)")
    if cfg.model.parked_layers:
        # Parked layers pin their activations (tens of GiB for long sequences): refuse before loading
        # what this machine's RAM cannot hold, rather than fail inside the first step.
        check_host_memory(plan or plan_for_run(cfg, source, impl, impl_reason))
    stream = mode in STREAMS_WEIGHTS
    if stream and processes > 1:
        # DDP keeps one copy of every buffer per GPU and syncs it at start: streamed NF4 buffers
        # live in host memory, where that cannot work.
        raise ConfigError(f"hardware.offload={cfg.hardware.offload.value} would stream the weights "
                          f"({mode.value}), which runs in one process only: under several processes each GPU "
                          "must hold the 4-bit base. Use hardware.offload=none or activations with a shorter "
                          "data.max_seq_len (train.dry_run=true shows what fits), or one process.")
    return MemoryLayout(stream, mode in PARKS_ACTIVATIONS or cfg.model.offload_checkpoints, planned_layers,
                        planned_chunks, host_embeddings=cfg.model.host_embeddings,
                        keep_attention=plan.keep_attention if plan else True)


# ---------------------------------------------------------------- the plan

@dataclass
class LineItem:
    name: str
    bytes: int
    note: str = ""


@dataclass
class StreamEstimate:
    """Weight streaming's cost per micro-batch: informative, not a promise."""

    bytes_per_micro_batch: int
    link_gbps: float
    link_assumed: bool
    transfer_s: float
    compute_s: float  # at ASSUMED_MFU of ASSUMED_PEAK_TFLOPS
    break_even_tflops: float  # useful TFLOP/s above which the transfers, not compute, bound the step


@dataclass
class MemoryPlan:
    """A run's memory: GPU and host line items, the offload decision, and the room it leaves."""

    recipe: str
    model: str
    architecture_source: str
    impl: ModelImpl
    impl_reason: str
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    checkpointed_layers: int  # how many layers recompute in backward (model.checkpoint_layers=auto: the plan's pick)
    mlp_chunk_tokens: int | None  # the MLP's chunk (model.mlp_chunk_tokens, or the plan's where unset); None: whole
    checkpointing_detail: str  # which layers recompute, and MLP chunking, in words
    # model.keep_attention as planned: False where keeping attention's results would not fit
    keep_attention: bool
    budget_bytes: int
    budget_source: str
    offload: OffloadMode  # what the plan decided: never auto
    offload_reason: str
    offload_for_speed: str | None  # why auto parks more than it must, in words (None: the cheapest that fits)
    gpu: list[LineItem]
    host: list[LineItem]
    gpu_total: int
    fits: bool
    longest_seq_len: int  # at micro_batch_size, with this offload choice; 0 when nothing fits
    max_position_embeddings: int | None
    loss_chunk_tokens: int | None  # None: the loss forms the full logits
    stream: StreamEstimate | None
    gradient_accumulation_steps: int
    host_ram_bytes: int  # physical memory of the machine that made the plan
    notes: list[str] = field(default_factory=list)

    @property
    def streams_weights(self) -> bool:
        return self.offload in STREAMS_WEIGHTS

    @property
    def offloads_activations(self) -> bool:
        return self.offload in PARKS_ACTIVATIONS

    @property
    def shortfall(self) -> int:
        return max(0, self.gpu_total - self.budget_bytes)

    @property
    def host_total(self) -> int:
        return sum(item.bytes for item in self.host)

    @property
    def tensors_bytes(self) -> int:
        """The tensors alone (without fragmentation and the CUDA context): what max_memory_allocated measures."""
        return sum(item.bytes for item in self.gpu if item.name not in OVERHEAD_ITEMS)

    def figures(self) -> dict:
        """The headline numbers, for RunResult.metrics."""
        return {"fits": self.fits, "offload": self.offload.value, "gpu_total_gib": self.gpu_total / GiB,
                "gpu_tensors_gib": self.tensors_bytes / GiB,
                "gpu_budget_gib": self.budget_bytes / GiB, "host_pinned_gib": self.host_total / GiB,
                "longest_seq_len": self.longest_seq_len, "impl": self.impl.value}


@dataclass(frozen=True)
class _Run:
    """What sizes a step's memory, read once from the config and the architecture."""

    arch: dict
    impl: ModelImpl
    compute_bytes: int
    dense_bytes: int  # dtype bytes of embeddings, head and norms: compute dtype (native) or quant.torch_dtype (hf)
    double_quant: bool
    r: int
    targets: tuple
    lora_dropout: float
    optimizer: Optimizer
    checkpointed_layers: int  # 0: no checkpointing
    mlp_chunk_tokens: int | None  # native path: model.mlp_chunk_tokens
    chunked_loss: bool
    micro_batch_size: int
    padding_mask: bool  # native path, padded micro-batches: one (B, T, T) bool mask shared by all layers
    compiled: bool = False  # native path, model.compile: layers keep the outputs others rebuild
    parked_layers: int = 0  # native path: model.parked_layers, of the layers not recomputed
    keep_attention: bool = False  # native path: model.keep_attention
    host_embeddings: bool = False  # native path: model.host_embeddings, with an LM head of its own

    @property
    def parked(self) -> int:
        return min(self.parked_layers, self.arch["num_hidden_layers"] - self.checkpointed_layers)


def _gpu_items(run: _Run, offload: OffloadMode, tokens: int) -> list[LineItem]:
    arch, L = run.arch, run.arch["num_hidden_layers"]
    items = []
    if offload in STREAMS_WEIGHTS:
        items.append(LineItem(f"NF4 linear weights, {SLOTS} of {L} layers",
                              SLOTS * nf4_layer_bytes(arch, run.double_quant),
                              "the rest stream from pinned host memory"))
    else:
        items.append(LineItem(f"NF4 linear weights, all {L} layers", nf4_linear_bytes(arch, run.double_quant),
                              "0.5 byte/weight + blockwise constants"))
    dense_name = {2: "16-bit", 4: "fp32"}[run.dense_bytes]
    if run.host_embeddings:
        items.append(LineItem(f"LM head, norms ({dense_name})",
                              dense_weight_bytes(arch, run.dense_bytes) - embedding_bytes(arch, run.dense_bytes),
                              "not quantized, as in QLoRA; the input embeddings in host memory"))
    else:
        items.append(LineItem(f"embeddings, LM head, norms ({dense_name})", dense_weight_bytes(arch, run.dense_bytes),
                              "tied" if arch.get("tie_word_embeddings") else "not quantized, as in QLoRA"))
    sizes = lora_tensor_sizes(arch, run.r, run.targets)
    lora = 4 * sum(sizes)
    items.append(LineItem("LoRA weights (fp32)", lora, f"r={run.r}, {len(run.targets)} projections x {L} layers, "
                                                      f"{sum(sizes):,} parameters"))
    items.append(LineItem("LoRA gradients (fp32)", lora))
    items.append(LineItem(f"optimizer states ({run.optimizer.value})", optimizer_state_bytes(sizes, run.optimizer),
                          "pages to host under pressure" if run.optimizer is Optimizer.paged_adamw_8bit else ""))
    projections = projection_shapes(arch)
    shapes = projections.values()
    if run.impl is ModelImpl.native and run.checkpointed_layers:
        # Attention's and down_proj's kept from the recompute; gate/up are dequantized again for
        # their own backward, after down_proj's weight is gone (Decoder.set_checkpointing).
        weights = {name: i * o for name, (i, o) in projections.items()}
        attention = sum(size for name, size in weights.items() if name not in MLP_PROJECTIONS)
        mlp = max(weights["down_proj"], weights["gate_proj"] + weights["up_proj"])
        items.append(LineItem("one layer's weights dequantized", (attention + mlp) * run.compute_bytes,
                              "attention's kept from the recompute for the backward, and the MLP's largest"))
    else:
        items.append(LineItem("one dequantized weight", max(i * o for i, o in shapes) * run.compute_bytes,
                              "the largest projection, while its matmul runs"))
    acts = activation_bytes_per_token(arch, run.compute_bytes, run.r, run.targets, run.lora_dropout, run.impl,
                                      run.compiled)
    checkpointed = run.checkpointed_layers
    if checkpointed and run.impl is ModelImpl.native and not run.compiled and offload not in STREAMS_WEIGHTS:
        items.append(LineItem(f"LoRA operands, {checkpointed} recomputed layers",
                              checkpointed * lora_operand_bytes(arch, run.r, run.targets, run.compute_bytes),
                              "made in forward, reused by the recompute"))
    if checkpointed and offload in PARKS_ACTIVATIONS:
        on_gpu = min(OFFLOADED_CHECKPOINTS_ON_GPU, checkpointed)
        items.append(LineItem(f"layer checkpoints, {on_gpu} of {checkpointed}",
                              tokens * on_gpu * _parked_checkpoint_bytes(run, acts, tokens),
                              "the rest in pinned host memory"))
    elif checkpointed:
        items.append(LineItem(f"layer checkpoints, {checkpointed} layers", tokens * checkpointed * acts.checkpoint,
                              f"{tokens:,} tokens x hidden {arch['hidden_size']}"))
    # With MLP chunking, each chunk's MLP is checkpointed on its own and recomputed one chunk at a time
    # for its backward.
    mlp_tokens = min(tokens, run.mlp_chunk_tokens or tokens)
    mlp_saving = (tokens - mlp_tokens) * (acts.mlp + acts.mlp_backward)
    chunked = mlp_tokens < tokens
    if run.parked:
        on_gpu = min(LAYERS_IN_FLIGHT, run.parked)
        items.append(LineItem(f"parked activations, {on_gpu} of {run.parked} layers", on_gpu * tokens * acts.kept(chunked),
                              "computing, or copying out or back; the rest in pinned host memory"))
    if checkpointed + run.parked < L:
        kept = L - checkpointed - run.parked
        items.append(LineItem(f"activations, {'all ' if kept == L else ''}{kept} layers",
                              kept * tokens * acts.kept(chunked),
                              f"{tokens:,} tokens, not checkpointed" + ("; MLP recomputed per chunk" if chunked else "")))
    if checkpointed:
        backward = LineItem("one layer recomputed + its backward", tokens * (acts.layer + acts.backward) - mlp_saving,
                            f"MLP in {mlp_tokens:,}-token chunks" if mlp_saving else "")
    else:
        backward = LineItem("one layer's backward", tokens * acts.backward)
    items.append(backward)
    seq_len = tokens // run.micro_batch_size
    if run.impl is ModelImpl.hf:
        # Checkpointed, one layer's scores exist at a time; otherwise every layer keeps its own.
        layers = 1 if checkpointed else L
        scores = layers * run.micro_batch_size * arch["num_attention_heads"] * seq_len ** 2
        items.append(LineItem("attention scores", round(scores * HF_ATTENTION_SCORE_BYTES),
                              "materialized on the generic path"))
    shared = tokens * acts.model + (run.micro_batch_size * seq_len ** 2 if run.padding_mask else 0)
    items.append(LineItem("rope tables, final hidden, ids" + (", padding mask" if run.padding_mask else ""), shared))
    if run.chunked_loss:
        # The fused loss finishes (its logits chunk freed) before any layer's backward starts, and
        # its hidden-state gradient is the residual gradient that backward's figure already holds:
        # the two peaks do not add up, so only what the loss needs beyond the backward's is counted.
        chunk = loss_chunk_tokens(tokens, arch["hidden_size"], arch["vocab_size"])
        loss = loss_bytes(arch, tokens, run.compute_bytes, True)
        items.append(LineItem("loss: logits chunk + hidden gradient", max(0, loss - backward.bytes),
                              f"fused, {chunk:,}-token chunks; its {loss / GiB:.2f} GiB peak precedes the backward's"))
    else:
        items.append(LineItem("loss: full logits", loss_bytes(arch, tokens, run.compute_bytes, False),
                              f"{tokens:,} x {arch['vocab_size']:,} x {FULL_LOGITS_BYTES} bytes"))
    allocated = sum(item.bytes for item in items)  # what torch.cuda.max_memory_allocated measures
    items.append(LineItem("allocator fragmentation", round(FRAGMENTATION * allocated),
                          f"{FRAGMENTATION:.0%} of the above"))
    items.append(LineItem("CUDA context + workspaces", RUNTIME_BYTES))
    return items


def _host_items(run: _Run, offload: OffloadMode, tokens: int) -> list[LineItem]:
    arch, L = run.arch, run.arch["num_hidden_layers"]
    items = []
    if offload in STREAMS_WEIGHTS:
        items.append(LineItem(f"NF4 linear weights, all {L} layers", nf4_linear_bytes(arch, run.double_quant),
                              "pinned, streamed every micro-batch"))
    if run.host_embeddings:
        items.append(LineItem("input embeddings", embedding_bytes(arch, run.dense_bytes),
                              "pinned, the rows a step's tokens name read by the GPU"))
    acts = activation_bytes_per_token(arch, run.compute_bytes, run.r, run.targets, run.lora_dropout, run.impl)
    if offload in PARKS_ACTIVATIONS:
        checkpointed = run.checkpointed_layers
        items.append(LineItem(f"layer checkpoints, {checkpointed} layers",
                              tokens * checkpointed * _parked_checkpoint_bytes(run, acts, tokens), "pinned"))
    if run.parked:
        chunked = min(tokens, run.mlp_chunk_tokens or tokens) < tokens
        items.append(LineItem(f"parked activations, {run.parked} layers", run.parked * tokens * acts.kept(chunked),
                              "pinned"))
    return items


def _keeps_attention(run: _Run, tokens: int) -> bool:
    """Whether recomputed layers whose inputs are parked keep attention's results (kept_attention.py):
    native layers, not compiled, in rows of KEPT_ATTENTION_MIN_ROW_TOKENS or more, without a padding
    mask or a sliding window shorter than the row. Packed rows of shorter samples keep none; the
    plan cannot know the samples' lengths and counts their rows as kept."""
    seq_len = tokens // run.micro_batch_size
    window = run.arch.get("sliding_window") if run.arch.get("use_sliding_window", True) else None
    return (run.keep_attention and not run.compiled and not run.padding_mask
            and seq_len >= KEPT_ATTENTION_MIN_ROW_TOKENS and not (window and window < seq_len))


def _parked_checkpoint_bytes(run: _Run, acts: ActivationSizes, tokens: int) -> int:
    """Per token, what a recomputed layer parks: its input, and where it keeps attention's results
    (`_keeps_attention`) also its q/k/v projections, attention's output and log-sum-exp and the
    layer's residual."""
    if not _keeps_attention(run, tokens):
        return acts.checkpoint
    qd, kvd = _attention_dims(run.arch)
    kept = (qd + 2 * kvd) + qd + run.arch["hidden_size"]
    return acts.checkpoint + run.compute_bytes * kept + 4 * run.arch["num_attention_heads"]


def _gpu_total(run: _Run, offload: OffloadMode, tokens: int) -> int:
    return sum(item.bytes for item in _gpu_items(run, offload, tokens))


def _host_total(run: _Run, offload: OffloadMode, tokens: int) -> int:
    return sum(item.bytes for item in _host_items(run, offload, tokens))


def _step_matmul_flops(run: _Run, offload: OffloadMode, tokens: int) -> float:
    """The matmul work of one micro-batch as the plan would run it (LayerFlops.step per layer, and
    the LM head's forward and input gradient): what hardware.offload=auto weighs settings by."""
    arch, L = run.arch, run.arch["num_hidden_layers"]
    flops = layer_flops(arch, tokens // run.micro_batch_size)
    chunked = bool(run.mlp_chunk_tokens) and tokens > run.mlp_chunk_tokens
    keeps = offload in PARKS_ACTIVATIONS and _keeps_attention(run, tokens)
    recomputed = run.checkpointed_layers
    per_token = (recomputed * flops.step(True, keeps, chunked) + (L - recomputed) * flops.step(False, False, chunked)
                 + 4 * arch["hidden_size"] * arch["vocab_size"])
    return tokens * per_token


def _parking_keeps_pace(run: _Run, offload: OffloadMode, tokens: int) -> bool:
    """Whether what the step parks (recomputed layers' checkpoints, parked layers' activations) can
    cross the link during the forward (perf.PARKING_BYTES_PER_FORWARD_FLOP), so that parking for
    speed does not wait on the copies. It comes back in the backward, whose matmul work is at least
    the forward's, beside the streamed weights where they stream (PCIe carries each direction at
    its own rate: the weights' forward copies do not compete with parking's)."""
    parked = sum(item.bytes for item in _host_items(run, offload, tokens)
                 if item.name.startswith(("layer checkpoints", "parked activations")))
    streamed = nf4_linear_bytes(run.arch, run.double_quant) if offload in STREAMS_WEIGHTS else 0
    forward = tokens * run.arch["num_hidden_layers"] * layer_flops(run.arch, tokens // run.micro_batch_size).forward
    return parked + streamed <= forward * PARKING_BYTES_PER_FORWARD_FLOP


def _longest_seq_len(run: _Run, offload: OffloadMode, budget: int, limit: int) -> int:
    """The longest sequence (at micro_batch_size) whose step fits `budget`; memory grows with length."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if _gpu_total(run, offload, mid * run.micro_batch_size) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def _offload_choices(cfg: RunConfig, impl: ModelImpl) -> list[OffloadMode]:
    """The offload settings open to this run, cheapest first; none open is an error naming why."""
    requested = cfg.hardware.offload
    candidates = list(OFFLOAD_ORDER) if requested is OffloadMode.auto else [requested]
    if cfg.model.offload_checkpoints:
        # The recipe already parks activations on the host: only the settings that keep doing so.
        candidates = [mode for mode in candidates if mode in PARKS_ACTIVATIONS]
        if not candidates:
            raise ConfigError(f"model.offload_checkpoints=true offloads activations, but hardware.offload="
                              f"{requested.value} keeps them on the GPU; pass hardware.offload=activations, all "
                              "or auto.")
    reasons = {mode: _offload_unavailable(mode, cfg, impl) for mode in candidates}
    choices = [mode for mode in candidates if reasons[mode] is None]
    if not choices:
        mode = candidates[0]
        raise ConfigError(f"hardware.offload={mode.value} (model.offload_checkpoints="
                          f"{str(cfg.model.offload_checkpoints).lower()}): {reasons[mode]}.")
    return choices


def _offload_unavailable(mode: OffloadMode, cfg: RunConfig, impl: ModelImpl) -> str | None:
    if mode is not OffloadMode.none and impl is not ModelImpl.native:
        return "offloading is a feature of the native model path; pass model.impl=auto or native"
    if mode in PARKS_ACTIVATIONS and not cfg.model.gradient_checkpointing:
        return "activation offload parks checkpointed layer inputs; it needs model.gradient_checkpointing=true"
    return None


def gpu_budget(hardware: HardwareConfig) -> tuple[int, str]:
    """The bytes a run may use on its GPU, and where that figure came from."""
    if hardware.gpu_memory_gb is not None:
        return round(hardware.gpu_memory_gb * GiB), f"hardware.gpu_memory_gb={hardware.gpu_memory_gb:g}"
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()} ({free / GiB:.1f} of {total / GiB:.1f} GiB)"
    return round(DEFAULT_GPU_GIB * GiB), (f"assumed: no CUDA device here; pass hardware.gpu_memory_gb=GiB for "
                                          f"your card (default {DEFAULT_GPU_GIB:g})")


@dataclass(frozen=True)
class _Option:
    """One way to run the step: the run as planned (layers recomputed, attention kept or not) under
    one offload setting, and its GPU total."""

    run: _Run
    offload: OffloadMode
    gpu_total: int
    fits: bool


def _options(run: _Run, choices: list[OffloadMode], auto_layers: bool, tokens: int, budget: int) -> list[_Option]:
    """Per offload setting, the run (with auto, the fewest recomputed layers that fit it; whether it
    fits at all is decided with every layer recomputed); then the same without keeping attention's
    results, which costs GPU and host memory that a long row may not have (kept_attention.py)."""
    variants = [run, replace(run, keep_attention=False)] if _keeps_attention(run, tokens) else [run]
    options = []
    for variant in variants:
        for mode in choices:
            planned = replace(variant, checkpointed_layers=_fewest_checkpointed_layers(variant, mode, tokens, budget)) \
                if auto_layers else variant
            total = _gpu_total(planned, mode, tokens)
            options.append(_Option(planned, mode, total, total <= budget))
    return options


def _fastest(options: list[_Option], tokens: int, host_ram: int) -> tuple[_Option, str | None]:
    """Of the options that fit, those that stream no weights if any does (streaming waits on the
    link); of those the first (the cheapest in host traffic, as configured), unless another is
    predicted to do less matmul work by more than parking costs (perf.PARKING_COST), within
    PARKING_RAM_SHARE of the RAM and at a pace the link keeps (`_parking_keeps_pace`): when recomputed
    layers keep attention's results, or fewer layers recompute. Also why, in words, where the pick is
    not the first."""
    fitting = [option for option in options if option.fits]
    streams = min(option.offload in STREAMS_WEIGHTS for option in fitting)
    tier = [option for option in fitting if (option.offload in STREAMS_WEIGHTS) == streams]
    first = tier[0]

    def cost(option: _Option) -> float:
        work = _step_matmul_flops(option.run, option.offload, tokens)
        return work * (1 + PARKING_COST) if option.offload in PARKS_ACTIVATIONS else work

    allowed = [first] + [option for option in tier[1:] if option.offload not in PARKS_ACTIVATIONS
                         or (_host_total(option.run, option.offload, tokens) <= PARKING_RAM_SHARE * host_ram
                             and _parking_keeps_pace(option.run, option.offload, tokens))]
    best = min(allowed, key=cost)
    if best is first:
        return first, None
    saving = 1 - (_step_matmul_flops(best.run, best.offload, tokens)
                  / _step_matmul_flops(first.run, first.offload, tokens))
    recomputed, before = best.run.checkpointed_layers, first.run.checkpointed_layers
    why = ([f"{recomputed} layers recomputed instead of {before}"] if recomputed != before else []) + \
        (["recomputed layers keep attention's results"] if recomputed and best.offload in PARKS_ACTIVATIONS
         and _keeps_attention(best.run, tokens) else [])
    return best, (f"{best.offload.value}, an estimated {saving:.0%} less matmul work a step than {first.offload.value} "
                  f"({', '.join(why)}; {_host_total(best.run, best.offload, tokens) / GiB:.1f} GiB pinned),")


def _fewest_checkpointed_layers(run: _Run, offload: OffloadMode, tokens: int, budget: int) -> int:
    """model.checkpoint_layers=auto: the fewest layers to recompute for the step to fit `budget`
    (all of them when none fits). Each layer left out trades its activations for a sixth of its matmuls."""
    L = run.arch["num_hidden_layers"]
    for layers in range(L + 1):
        if _gpu_total(replace(run, checkpointed_layers=layers), offload, tokens) <= budget:
            return layers
    return L


def _checkpointing_detail(run: _Run, auto: bool, auto_chunks: bool, attention_dropped: bool) -> str:
    L = run.arch["num_hidden_layers"]
    words = "off" if not run.checkpointed_layers else "on" if run.checkpointed_layers == L \
        else f"on for {run.checkpointed_layers} of {L} layers"
    if auto:
        words += " (model.checkpoint_layers=auto: the fewest recomputed layers that fit)"
    if run.mlp_chunk_tokens:
        words += f"; MLP in {run.mlp_chunk_tokens:,}-token chunks"
        if auto_chunks:
            words += " (model.mlp_chunk_tokens unset: the step fits only with them)"
    if attention_dropped:
        words += "; attention recomputed too (model.keep_attention: keeping its results does not fit, or costs more)"
    return words


def plan_offline(cfg: RunConfig) -> MemoryPlan:
    """The plan for `cfg` from the model's sizes alone (no weights, no network): what train.dry_run prints."""
    source = locate_source(cfg.model)
    return plan_for_run(cfg, source, *choose_impl(cfg, source))


def plan_for_run(cfg: RunConfig, source: ModelSource, impl: ModelImpl, impl_reason: str) -> MemoryPlan:
    """How the run `cfg` describes uses its GPU, on the model path `impl` (as `choose_impl` decided):
    line items, offload decision, longest sequence that fits."""
    arch = checked_architecture(source)
    L = arch["num_hidden_layers"]
    compute_bytes = DTYPE_BYTES[cfg.quant.bnb_4bit_compute_dtype]
    # A preference micro-batch of B pairs runs 2B sequences in one forward (chosen and rejected, or
    # KTO's rows and their KL rows); the reference forward runs without autograd and keeps nothing.
    rows = cfg.train.micro_batch_size * (1 if cfg.objective.name is ObjectiveName.sft else 2)
    run = _Run(
        arch=arch, impl=impl, compute_bytes=compute_bytes,
        dense_bytes=compute_bytes if impl is ModelImpl.native else DTYPE_BYTES[cfg.quant.torch_dtype],
        double_quant=cfg.quant.bnb_4bit_use_double_quant, r=cfg.lora.r,
        targets=lora_targets(cfg.lora.target_modules, L),
        # The native path's kernels redraw dropout masks from a seed (kernels/lora_dropout.py): none is stored.
        lora_dropout=0.0 if impl is ModelImpl.native and cfg.model.use_kernels else cfg.lora.lora_dropout,
        optimizer=cfg.optim.name,
        checkpointed_layers=cfg.model.checkpointed_layers(L) if impl is ModelImpl.native
        else (L if cfg.model.gradient_checkpointing else 0),
        mlp_chunk_tokens=cfg.model.mlp_chunk_tokens if impl is ModelImpl.native else None,
        chunked_loss=impl is ModelImpl.native and cfg.model.use_kernels,
        micro_batch_size=rows,
        padding_mask=impl is ModelImpl.native and not cfg.data.packing and rows > 1,
        compiled=impl is ModelImpl.native and cfg.model.compile,
        parked_layers=cfg.model.parked_layers if impl is ModelImpl.native else 0,
        keep_attention=impl is ModelImpl.native and cfg.model.keep_attention,
        host_embeddings=impl is ModelImpl.native and cfg.model.host_embeddings
        and not arch.get("tie_word_embeddings", False),
    )
    tokens = rows * cfg.data.max_seq_len
    budget, budget_source = gpu_budget(cfg.hardware)

    choices = _offload_choices(cfg, impl)
    auto_layers = impl is ModelImpl.native and cfg.model.plans_checkpoint_layers()
    options = _options(run, choices, auto_layers, tokens, budget)
    # model.mlp_chunk_tokens unset: MLP chunks only where nothing fits without them.
    auto_chunks = impl is ModelImpl.native and cfg.model.mlp_chunk_tokens is None
    if auto_chunks and tokens > AUTO_MLP_CHUNK_TOKENS and not any(option.fits for option in options):
        chunked = replace(run, mlp_chunk_tokens=AUTO_MLP_CHUNK_TOKENS)
        chunked_options = _options(chunked, choices, auto_layers, tokens, budget)
        if any(option.fits for option in chunked_options):
            run, options = chunked, chunked_options
    host_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fitting = any(option.fits for option in options)
    # Where nothing fits: the configured run, most offloaded.
    chosen, faster = _fastest(options, tokens, host_ram) if fitting else (options[len(choices) - 1], None)
    offload = chosen.offload
    # Attention's results not kept where keeping them leaves nothing that fits.
    attention_dropped = _keeps_attention(run, tokens) and not chosen.run.keep_attention \
        and offload in PARKS_ACTIVATIONS and chosen.run.checkpointed_layers > 0
    # Unset chunks are the plan's to choose: the longest sequence is the one they allow.
    longest_run = replace(run, keep_attention=chosen.run.keep_attention,
                          mlp_chunk_tokens=AUTO_MLP_CHUNK_TOKENS if auto_chunks else run.mlp_chunk_tokens)
    run = chosen.run
    offload_reason = f"hardware.offload={cfg.hardware.offload.value}"
    if len(choices) > 1:
        offload_reason += (f" picked {faster}" if faster else " picked the cheapest that fits" if fitting
                           else ": none fits, the most offloaded shown")
        # The totals of the variant picked: with attention kept, or (where that did not fit) without.
        offload_reason += " of " + ", ".join(f"{option.offload.value} {option.gpu_total / GiB:.1f} GiB"
                                             for option in options
                                             if option.run.keep_attention == chosen.run.keep_attention)

    max_positions = arch.get("max_position_embeddings")
    # Up to the model's context (or 1M tokens where it states none): planning further is pointless.
    longest = _longest_seq_len(longest_run, offload, budget, max_positions or 2**20)
    notes = []
    if rows != cfg.train.micro_batch_size:
        notes.append(f"objective={cfg.objective.name.value}: each of the micro-batch's {cfg.train.micro_batch_size} "
                     f"items runs as two sequences, so activations are planned for {rows} rows.")
    if cfg.data.max_seq_len > (max_positions or math.inf):
        notes.append(f"data.max_seq_len={cfg.data.max_seq_len} exceeds the model's max_position_embeddings "
                     f"({max_positions}): the run will refuse it.")
    if impl is not ModelImpl.native and not fitting:
        notes.append("the generic path offloads nothing; the native path (model.impl=auto or native) can stream "
                     "weights and offload activations, and its fused loss never forms the full logits.")
    if impl is ModelImpl.native and not cfg.model.use_kernels:
        notes.append("model.use_kernels=false: the plain-PyTorch ops keep fp32 intermediates and full logits; "
                     "activations are planned as the kernels' and may be underestimated.")
    if cfg.lora.use_dora:
        notes.append("lora.use_dora=true: DoRA's weight-norm activations are not counted.")
    if fitting and (hint := _parking_hint(run, offload, tokens, budget, host_ram)):
        notes.append(hint)

    stream = None
    if offload in STREAMS_WEIGHTS:
        link = cfg.hardware.host_link_gbps or DEFAULT_HOST_LINK_GBPS
        streamed = TRANSFERS_PER_MICRO_BATCH * nf4_linear_bytes(arch, run.double_quant)
        flops = tokens * useful_flops_per_token(arch, cfg.data.max_seq_len)
        transfer_s = streamed / (link * GB)
        stream = StreamEstimate(streamed, link, cfg.hardware.host_link_gbps is None, transfer_s,
                                flops / (ASSUMED_MFU * ASSUMED_PEAK_TFLOPS * 1e12), flops / transfer_s / 1e12)
    return MemoryPlan(
        recipe=cfg.name, model=cfg.model.name_or_path, architecture_source=source.described_by, impl=impl,
        impl_reason=impl_reason,
        micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.max_seq_len,
        gradient_checkpointing=cfg.model.gradient_checkpointing, checkpointed_layers=run.checkpointed_layers,
        mlp_chunk_tokens=run.mlp_chunk_tokens,
        checkpointing_detail=_checkpointing_detail(run, auto_layers, auto_chunks, attention_dropped),
        keep_attention=run.keep_attention,
        budget_bytes=budget, budget_source=budget_source,
        offload=offload, offload_reason=offload_reason, offload_for_speed=faster,
        gpu=_gpu_items(run, offload, tokens),
        host=_host_items(run, offload, tokens), gpu_total=chosen.gpu_total, fits=chosen.fits,
        longest_seq_len=longest, max_position_embeddings=max_positions,
        loss_chunk_tokens=loss_chunk_tokens(tokens, arch["hidden_size"], arch["vocab_size"]) if run.chunked_loss
        else None,
        stream=stream, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        host_ram_bytes=host_ram, notes=notes,
    )


def _parking_hint(run: _Run, offload: OffloadMode, tokens: int, budget: int, host_ram: int) -> str | None:
    """For a long sequence that recomputes layers: the most of them that could park instead
    (model.parked_layers, MLP chunks) within the GPU budget and a share of the RAM, as a suggestion
    where it is predicted to do less matmul work by more than parking costs (a layer that kept
    attention's results recomputes about what a parked layer's MLP chunks do), at a pace the link
    keeps."""
    seq_len = tokens // run.micro_batch_size
    if run.impl is not ModelImpl.native or run.compiled or run.parked or not run.checkpointed_layers \
            or seq_len < PARKING_PAYS_FROM_TOKENS:
        return None
    chunk = run.mlp_chunk_tokens or AUTO_MLP_CHUNK_TOKENS
    for parked in range(run.checkpointed_layers, 0, -1):
        candidate = replace(run, checkpointed_layers=run.checkpointed_layers - parked, parked_layers=parked,
                            mlp_chunk_tokens=chunk)
        host = _host_total(candidate, offload, tokens)
        gpu = _gpu_total(candidate, offload, tokens)
        if host <= PARKING_RAM_SHARE * host_ram and gpu <= budget:
            if _step_matmul_flops(candidate, offload, tokens) * (1 + PARKING_COST) >= \
                    _step_matmul_flops(run, offload, tokens) or not _parking_keeps_pace(candidate, offload, tokens):
                return None
            return (f"model.checkpoint_layers={candidate.checkpointed_layers} model.parked_layers={parked} "
                    f"model.mlp_chunk_tokens={chunk} would skip {parked} layers' recompute, keeping their "
                    f"activations in pinned host memory ({host / GiB:.1f} GiB pinned in all, {gpu / GiB:.1f} GiB "
                    f"on the GPU): Llama-3-8B at 1 x 32768 with all 32 layers parked ran 1.11x recomputing "
                    f"every layer, on an H100.")
    return None


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a run its GPU (or this machine's RAM, for what it pins) cannot hold."""
    if not plan.fits:
        hint = (f"data.max_seq_len={plan.longest_seq_len} would fit" if plan.longest_seq_len
                else "no sequence length fits")
        raise ConfigError(
            f"the run needs {plan.gpu_total / GiB:.1f} GiB on the GPU with hardware.offload={plan.offload.value}, "
            f"{plan.shortfall / GiB:.1f} GiB more than the {plan.budget_bytes / GiB:.1f} GiB budget "
            f"({plan.budget_source}); at train.micro_batch_size={plan.micro_batch_size} {hint}. "
            "See the whole plan with train.dry_run=true.")
    check_host_memory(plan)


def check_host_memory(plan: MemoryPlan) -> None:
    """Refuse a run that would pin more host memory than this machine has."""
    if plan.host_total > plan.host_ram_bytes:
        raise ConfigError(
            f"the run pins {plan.host_total / GiB:.1f} GiB of host memory ("
            + ", ".join(f"{item.name}: {item.bytes / GiB:.1f} GiB" for item in plan.host)
            + f") but this machine has {plan.host_ram_bytes / GiB:.1f} GiB; offload or park less "
            "(hardware.offload, model.parked_layers), or use a larger machine.")


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table a person reads before renting a GPU."""
    # Whole GiB hide a small model's figures: those are shown in MiB.
    unit, decimal, names = (GiB, GB, ("GiB", "GB")) if plan.gpu_total >= 4 * GiB else (2**20, 10**6, ("MiB", "MB"))

    def row(name: str, size: int, note: str = "") -> str:
        return f"  {name:<46}{size / unit:>9.2f}{size / decimal:>9.2f}  {note}".rstrip()

    def header(title: str) -> str:
        return f"{title:<48}{names[0]:>9}{names[1]:>9}"

    lines = [
        f"memory plan: {plan.recipe} ({plan.model}; sizes from {plan.architecture_source})",
        f"  model path {plan.impl.value} ({plan.impl_reason}); micro-batch {plan.micro_batch_size} x "
        f"{plan.seq_len:,} tokens; gradient checkpointing {plan.checkpointing_detail}",
        f"  offload: {plan.offload.value} ({plan.offload_reason})",
        "", header("GPU"),
        *(row(item.name, item.bytes, item.note) for item in plan.gpu),
        row("total", plan.gpu_total, f"tensors alone {plan.tensors_bytes / GiB:.2f} GiB: compare with "
                                     "torch.cuda.max_memory_allocated"),
        row("budget", plan.budget_bytes, plan.budget_source),
    ]
    if plan.fits:
        lines.append(f"  fits, {(plan.budget_bytes - plan.gpu_total) / GiB:.2f} GiB to spare")
    else:
        lines.append(f"  DOES NOT FIT: {plan.shortfall / GiB:.2f} GiB ({plan.shortfall / GB:.2f} GB) short")
    if plan.host:
        lines += ["", header("host"), *(row(item.name, item.bytes, item.note) for item in plan.host),
                  row("total pinned", plan.host_total, f"this machine has {plan.host_ram_bytes / GiB:.0f} GiB" +
                      (": not enough" if plan.host_total > plan.host_ram_bytes else ""))]
    lines.append("")
    if plan.longest_seq_len:
        at_limit = plan.max_position_embeddings and plan.longest_seq_len >= plan.max_position_embeddings
        lines.append(f"longest sequence that fits: {plan.longest_seq_len:,} tokens at micro_batch_size="
                     f"{plan.micro_batch_size}" + (" (the model's maximum)" if at_limit else ""))
    else:
        lines.append(f"longest sequence that fits: none at micro_batch_size={plan.micro_batch_size}")
    lines.append("loss: " + (f"fused linear + cross-entropy, {plan.loss_chunk_tokens:,}-token logits chunks"
                             if plan.loss_chunk_tokens else "full logits (transformers upcasts them to fp32)"))
    if plan.stream:
        s = plan.stream
        link = f"{s.link_gbps:g} GB/s" + (" (assumed: PCIe 4.0 x16; set hardware.host_link_gbps)" if s.link_assumed
                                          else "")
        lines += [
            f"weight streaming: {s.bytes_per_micro_batch / GB:.1f} GB per micro-batch (forward + backward) over "
            f"{link}: {s.transfer_s:.1f} s;",
            f"  compute at {ASSUMED_MFU:.0%} MFU of {ASSUMED_PEAK_TFLOPS:g} TFLOP/s: {s.compute_s:.1f} s; the copies "
            f"hide behind compute unless the card sustains over {s.break_even_tflops:.0f} useful TFLOP/s "
            f"(x{plan.gradient_accumulation_steps} micro-batches per optimizer step)",
        ]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
