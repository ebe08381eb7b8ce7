"""How tests run the real CLI (kept out of conftest.py: tests/kernels has a conftest module too)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_train(*overrides: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python train.py ...` exactly as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
