"""The project's layout and imports keep third-party libraries' view of the world intact."""

import subprocess
import sys

from runner import REPO

PROBE = """
import importlib.util, sys
import finetune.recipe, finetune.cli
import finetune_kernels.rmsnorm
from transformers.utils import is_kernels_available
import bitsandbytes
spec = importlib.util.find_spec("kernels")
print(is_kernels_available(), spec is not None and spec.origin is not None, "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None))
"""


def test_importing_the_project_does_not_fake_pypi_kernels():
    # Run from the checkout's root, where `kernels/` sits on sys.path[0] as it does for
    # `python train.py`: transformers must still see no usable `kernels` package.
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    available, regular_package, imported_file = result.stdout.split()
    assert available == "False"
    assert regular_package == "False"  # at most a namespace folder, which never shadows a real install
    assert imported_file in ("False", "None")


def test_kernels_folder_is_not_a_regular_package():
    assert (REPO / "kernels").is_dir()
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_required_top_level_layout():
    for name in ("pyproject.toml", "finetune", "recipes", "kernels", "scripts", "tests", "notebooks", "train.py",
                 "README.md", ".ci/run"):
        assert (REPO / name).exists(), name
