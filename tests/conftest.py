import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated, so this must run
# before any test module imports triton (bitsandbytes does) or a finetune_kernels module: without a
# GPU the interpreter runs the kernels on the CPU (tests/kernels, and the native model's kernel set).
# Test modules of every folder are collected after this file, whatever their order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# From a checkout that was never pip-installed (as on the GPU machine), importing finetune is what
# makes the kernels/ folder importable as finetune_kernels, which tests/kernels imports directly.
import finetune  # noqa: E402, F401


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """A private cache per test session, so tests never touch (or trust) the user's ~/.cache.

    Exported as FINETUNE_CACHE_DIR, which recipes read, so CLI subprocesses and notebook
    kernels use it too.
    """
    path = tmp_path_factory.mktemp("finetune-cache")
    os.environ["FINETUNE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_base(cache_dir) -> Path:
    from finetune.demo import ensure_demo_base

    return ensure_demo_base(cache_dir)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, cache_dir):
    """`python train.py` as the README's first command runs it (the demo recipe, all 300 steps, a
    checkpoint every 100), once a session: (its output directory, the finished process). The
    tests of its output, and those that need a trained adapter (`demo_run[0] / "adapter"`), share
    it: each run of the demo costs a minute of the suite."""
    from runner import run_train

    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_train(f"output_dir={out}", f"cache_dir={cache_dir}", "train.save_every=100")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a 2-core machine a second OpenMP thread makes every small op slower, not faster.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
