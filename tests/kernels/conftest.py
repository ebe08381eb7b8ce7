import pytest
import torch


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def device() -> torch.device:
    """Where the small tests run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
