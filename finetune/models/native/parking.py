"""Activation parking: what a layer saves for backward waits out the step in pinned host memory.

Two kinds of layer park (Decoder.set_checkpointing):
- a recomputed layer keeps one tensor from forward to backward, its input x (tokens x hidden in
  the compute dtype: 256 MiB per layer at 32k tokens for an 8B);
- a parked layer is not recomputed: everything it saves (attention's q, k, v, output and
  log-sum-exp, the projections' inputs, MLP chunks' inputs...) goes to host memory, so backward
  skips the recompute without the GPU holding the layer's activations through the step.
The copies run on a side stream so that the compute does not wait for them:
- forward: when an op saves a tensor, the copy stream waits for the compute stream to reach that
  point and copies it out; `record_stream` keeps the allocator from reusing the tensor's memory
  until the copy has run, so the compute stream goes on at once. Before a layer starts saving, the
  host waits for the copies of the layer two back: the GPU never holds more than two layers'
  tensors waiting for the link, whatever the link's speed against the compute.
- backward: when layer i's backward asks for its first tensor, all of layer i's and all of layer
  i-1's (the next backward needs) start back, and the compute stream waits only for the one it asked for.
torch.autograd.graph.save_on_cpu copies synchronously: its device-to-host copy holds the host
until the GPU has caught up, once per tensor, so the host cannot queue work ahead. Llama-3-8B
recomputing every layer at bs2 x 2048 (H100), against the inputs kept on the GPU: 0.86x with it,
0.97x parked here.

The bytes copied back are the bytes saved, so a parked run computes exactly what an unparked one
does. The layer's own parameters and buffers (LoRA weights, 4-bit codes) and the rope tables that
all layers share are saved as they are.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial

import torch
from torch import nn

# Layers whose saved tensors the GPU holds at once: in forward the one computing and the one before
# it, whose copies may still be running (a layer starts once the copies of the layer two back have
# run); in backward the one whose backward runs and the one below it, coming back.
LAYERS_IN_FLIGHT = 2


class _Parked:
    """One saved tensor in pinned host memory, and its way back to the GPU once backward asks."""

    __slots__ = ("host", "device", "back", "arrived", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device = host, device
        self.back: torch.Tensor | None = None  # on the GPU once the copy back has been queued
        self.arrived: torch.cuda.Event | None = None


class ActivationParking:
    """Saved-tensor hooks that park a decoder layer's CUDA tensors in pinned host memory."""

    def __init__(self):
        self.copy_stream: torch.cuda.Stream | None = None  # made on the first CUDA tensor parked
        # The latest forward's parked tensors per layer; weak, so only the autograd graph keeps them.
        self.latest: dict[int, list[weakref.ref[_Parked]]] = {}
        self.copied_out: dict[int, torch.cuda.Event] = {}  # per layer: its last copy out has run

    @contextlib.contextmanager
    def layer(self, index: int, module: nn.Module | None = None, shared: tuple[torch.Tensor, ...] = ()):
        """While layer `index` (`module`) runs forward: the (pack, unpack) hooks that park what it
        saves, except its own parameters and buffers and the `shared` tensors (views of them too),
        which every layer reads: the rope tables. Without `module`, everything saved is parked (a
        recomputed layer saves only its input)."""
        held = self.copied_out.pop(index - LAYERS_IN_FLIGHT, None)
        if held is not None:
            held.synchronize()
        self.latest[index] = []
        kept = (*module.parameters(), *module.buffers(), *shared) if module is not None else shared
        own = {t.untyped_storage().data_ptr() for t in kept}
        yield partial(self._park, index, own), partial(self._unpark, index)
        if self.copy_stream is not None:
            self.copied_out[index] = self.copy_stream.record_event()

    def _park(self, index: int, own: set[int], tensor: torch.Tensor):
        if not tensor.is_cuda or tensor.untyped_storage().data_ptr() in own:
            return tensor
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.copy_stream)
        parked = _Parked(host, tensor.device)
        self.latest[index].append(weakref.ref(parked))
        return parked

    def _unpark(self, index: int, packed) -> torch.Tensor:
        if not isinstance(packed, _Parked):
            return packed
        for layer in (index, index - 1):
            for ref in self.latest.get(layer, ()):
                if (parked := ref()) is not None:
                    self._bring_back(parked)
        self._bring_back(packed)  # from an earlier forward, if a later one has run since
        compute = torch.cuda.current_stream(packed.device)
        compute.wait_event(packed.arrived)
        # Allocated for the copy stream: the compute stream's use must also end before reuse.
        packed.back.record_stream(compute)
        return packed.back

    def _bring_back(self, parked: _Parked) -> None:
        if parked.back is not None:
            return
        # Ordered after the copy out on the same stream; the memory it lands in is the copy stream's own.
        with torch.cuda.stream(self.copy_stream):
            parked.back = parked.host.to(parked.device, non_blocking=True)
            parked.arrived = torch.cuda.Event()
            parked.arrived.record(self.copy_stream)
