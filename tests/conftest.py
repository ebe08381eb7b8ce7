import os
from pathlib import Path

import pytest


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
