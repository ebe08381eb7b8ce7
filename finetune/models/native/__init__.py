"""The native path: our own decoder for the Llama family (model.py), loaded from an HF checkpoint or
an NF4 cache (load.py, nf4_cache.py), optionally streaming its 4-bit weights (streaming.py).

Callers take the names below from here; each is defined in the module it is imported from.
"""

from finetune.models.native.load import (MemoryLayout, Placement, build, empty_pretrained, load_from_cache,
                                         load_pretrained, write_nf4_cache)
from finetune.models.native.model import (ModelArgs, NativeCausalLM, materialize_empty, torch_ops, triton_ops,
                                          unsupported_reason)

__all__ = ["MemoryLayout", "ModelArgs", "NativeCausalLM", "Placement", "build", "empty_pretrained", "load_from_cache",
           "load_pretrained", "materialize_empty", "torch_ops", "triton_ops", "unsupported_reason", "write_nf4_cache"]
