import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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


def run_train(*overrides: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI exactly as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
