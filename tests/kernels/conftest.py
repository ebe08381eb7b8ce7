import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so this must run before any
# finetune_kernels module is imported; without a GPU the interpreter runs the kernels on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def device() -> torch.device:
    """Where the small tests run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
