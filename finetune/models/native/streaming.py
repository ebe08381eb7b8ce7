"""Weight streaming: the frozen 4-bit layers live in pinned host memory and visit the GPU just ahead of use.

A 70B model's NF4 weights (~37 GiB) do not fit a 24 GiB card, but one decoder layer's (~0.45 GiB)
does. Each layer's quantized buffers (codes, absmax, nested constants) are packed into one pinned
host buffer; the GPU holds `SLOTS` layer-sized buffers. While layer i computes, layer i+1 (in
forward) or i-1 (in backward, where checkpointed layers also recompute) is copied into the other
slot on a side stream, so the copy overlaps the compute; the compute stream waits only for the
copy of the layer it is about to run. A layer's QuantizedWeight buffers are views into whichever
slot holds it, and views into its host buffer otherwise: a kernel reaching a layer that is not on
the GPU fails loudly instead of reading the wrong weights.

Ordering: a slot is refilled only after everything the compute stream had been given up to that
moment (which includes all work of the slot's previous layer) has run: the copy stream waits on
an event recorded then. In backward, `acquire` for layer i runs when the gradient of layer i's
output is complete, which needs every op of layer i+1's backward, so the slot of layer i+1 is free.
The bytes copied are the resident bytes, so a streamed run computes exactly what a resident one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finetune.lora import linear_layers

# Layers whose NF4 weights are on the GPU at once: the one computing and the next, whose copy
# overlaps the compute (double buffering). The memory plan counts as many.
SLOTS = 2
ALIGN = 64  # bytes; every buffer starts aligned for any dtype and for vectorized kernel loads


@dataclass
class _Entry:
    module: nn.Module  # a QuantizedWeight
    name: str  # one of its buffers
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


class LayerWeights:
    """One decoder layer's quantized buffers, packed into one (pinned, when CUDA is there) host buffer."""

    def __init__(self, layer: nn.Module, pin: bool):
        self.entries: list[_Entry] = []
        size = 0
        for linear in linear_layers(layer).values():
            for name, buffer in linear.weight.named_buffers(recurse=False):
                size = -(-size // ALIGN) * ALIGN
                nbytes = buffer.numel() * buffer.element_size()
                self.entries.append(_Entry(linear.weight, name, size, nbytes, buffer.dtype, buffer.shape))
                size += nbytes
        self.nbytes = size
        self.host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        for entry in self.entries:
            self._view(self.host, entry).copy_(getattr(entry.module, entry.name))
        self.point_to(self.host)

    @staticmethod
    def _view(storage: torch.Tensor, entry: _Entry) -> torch.Tensor:
        return storage[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)

    def point_to(self, storage: torch.Tensor) -> None:
        """Make every buffer of the layer a view into `storage` (the host buffer or a GPU slot)."""
        for entry in self.entries:
            setattr(entry.module, entry.name, self._view(storage, entry))


class _BeforeBackward(torch.autograd.Function):
    """Identity whose backward first runs a callback: the moment a layer's backward is about to start."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


class WeightStreamer:
    """Moves decoder layers' NF4 weights between pinned host memory and `SLOTS` GPU buffers."""

    def __init__(self, layers: nn.ModuleList, device: torch.device, pin: bool = True):
        self.layers = [LayerWeights(layer, pin=pin) for layer in layers]
        size = max(layer.nbytes for layer in self.layers)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(SLOTS)]
        self.held: list[int | None] = [None] * SLOTS  # the layer in each slot
        self.ready: list[torch.cuda.Event | None] = [None] * SLOTS  # set once its copy has landed
        self.current: int | None = None  # the slot of the layer computing now
        self.copy_stream = torch.cuda.Stream(device)

    @property
    def gpu_bytes(self) -> int:
        return sum(slot.numel() for slot in self.slots)

    @property
    def host_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def acquire(self, index: int, upcoming: int | None) -> None:
        """Layer `index` is about to compute: make it usable, and start bringing `upcoming`."""
        slot = self._fetch(index)
        torch.cuda.current_stream().wait_event(self.ready[slot])
        self.current = slot
        if upcoming is not None and 0 <= upcoming < len(self.layers):
            self._fetch(upcoming)

    def _fetch(self, index: int) -> int:
        if index in self.held:
            return self.held.index(index)
        slot = next(s for s in range(SLOTS) if s != self.current)
        previous = self.held[slot]
        if previous is not None:
            self.layers[previous].point_to(self.layers[previous].host)
        released = torch.cuda.Event()
        released.record(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(released)
            self.slots[slot][:self.layers[index].nbytes].copy_(self.layers[index].host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.held[slot], self.ready[slot] = index, ready
        self.layers[index].point_to(self.slots[slot])
        return slot

    def before_backward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Layer `index`'s output, marked so that its backward first brings the layer (and the one below)."""
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x
        return _BeforeBackward.apply(x, lambda: self.acquire(index, index - 1))
