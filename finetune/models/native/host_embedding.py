"""The input embedding table in pinned host memory: each forward reads only the rows its ids name.

LoRA leaves the embeddings frozen and a step looks up a few thousand of their rows, yet the table
(vocab x hidden in the compute dtype: 1.0 GiB for Llama-3-8B, 2.1 GB for a 70B) is otherwise the
largest unquantized tensor on the GPU. Here it stays in page-locked host memory, which the GPU
addresses directly, and a Triton kernel (finetune_kernels/host_embedding.py) gathers the rows over
the bus: 32 MiB per 4,096 tokens of an 8B, by estimate a millisecond or two on a PCIe 4/5 link.

Only where the LM head has weights of its own: a tied head reads the whole table every step.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# cudaHostRegister's flags: usable from every device, and mapped into their address space.
_PORTABLE, _MAPPED = 1, 2


def page_locked(table: torch.Tensor) -> torch.Tensor:
    """`table`'s own host memory page-locked and mapped for the GPU until the tensor is gone.

    Registered in place rather than copied with `Tensor.pin_memory()`, whose caching allocator
    rounds each block up to a power of two: an 8B's 1.05 GB table would pin 2 GiB.
    """
    cudart = torch.cuda.cudart()
    address, size = table.data_ptr(), table.numel() * table.element_size()
    error = int(cudart.cudaHostRegister(address, size, _PORTABLE | _MAPPED))
    if error:
        raise RuntimeError(f"cudaHostRegister of the {size / 2**30:.2f} GiB embedding table failed (cudaError "
                           f"{error}); pass model.host_embeddings=false to keep it on the GPU.")
    weakref.finalize(table, cudart.cudaHostUnregister, address)
    return table


class HostEmbedding(nn.Module):
    """Stands in for a frozen nn.Embedding whose table lives in (pinned) host memory.

    The table is a plain attribute, neither parameter nor buffer, so that moving the model
    (`.to(device)`) leaves it where it is and nothing offers it to an optimizer or a state dict.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.shape

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, pin: bool) -> HostEmbedding:
        """The embedding's table moved to host memory (`pin`: page-locked, for a CUDA model)."""
        table = embedding.weight.detach().to("cpu", copy=True).contiguous()
        return cls(page_locked(table) if pin else table)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from finetune_kernels.host_embedding import gather_rows

        return gather_rows(self.table, input_ids)

    def extra_repr(self) -> str:
        pinned = "pinned " if self.table.is_pinned() else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, in {pinned}host memory"
