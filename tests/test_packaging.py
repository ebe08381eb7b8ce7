"""The project's layout and imports keep third-party libraries' view of the world intact, and a
checkout runs with or without being installed."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from runner import REPO

SITE_PACKAGES = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
KERNELS_INSTALLED = (SITE_PACKAGES / "kernels" / "__init__.py").is_file()
PROJECT_FILES = ("__editable__", "finetune-", "finetune_kernels")


def site_view(tmp_path: Path, leave_out: tuple[str, ...]) -> Path:
    """The environment's site-packages as links, less the entries whose names start with `leave_out`:
    the same environment as if those distributions had never been installed."""
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in SITE_PACKAGES.iterdir():
        if not entry.name.startswith(leave_out):
            (view / entry.name).symlink_to(entry)
    return view


def run_python(code: str, view: Path | None = None, cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    """`python -c code` from `cwd` (sys.path[0] is then the checkout's root, as for `python train.py`),
    on the real environment or on a site view."""
    args = [sys.executable, "-c", code]
    if view is not None:
        args = [sys.executable, "-S", "-c", f"import site; site.addsitedir({str(view)!r})\n{code}"]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


LIBRARY_VIEW = """
import importlib.util, json, sys
{first}
from transformers.utils import import_utils as iu
import bitsandbytes
spec = importlib.util.find_spec("kernels")
print(json.dumps({{
    "transformers": {{name: getattr(iu, name)() for name in sorted(dir(iu))
                     if name.startswith("is_") and name.endswith("_available") and name in (
                         "is_kernels_available", "is_bitsandbytes_available", "is_peft_available",
                         "is_accelerate_available", "is_triton_available", "is_torch_available")}},
    "kernels_origin": spec.origin if spec else None,
    "kernels_paths": list(spec.submodule_search_locations or []) if spec else None,
}}))
"""
IMPORT_PROJECT = "import finetune, finetune.recipe, finetune.cli, finetune.export.merge, finetune_kernels.rmsnorm"


@pytest.mark.parametrize("kernels_installed", [True, False], ids=["pypi-kernels-installed", "no-pypi-kernels"])
def test_importing_the_project_changes_no_library_view(tmp_path, kernels_installed):
    if kernels_installed and not KERNELS_INSTALLED:
        pytest.skip(reason="PyPI's kernels is not installed in this environment")
    view = None if kernels_installed else site_view(tmp_path, ("kernels", "kernels-"))
    before = run_python(LIBRARY_VIEW.format(first=""), view)
    after = run_python(LIBRARY_VIEW.format(first=IMPORT_PROJECT), view)
    assert before.returncode == 0 and after.returncode == 0, before.stderr[-2000:] + after.stderr[-2000:]
    before, after = json.loads(before.stdout.splitlines()[-1]), json.loads(after.stdout.splitlines()[-1])
    assert after == before
    assert before["transformers"]["is_kernels_available"] is kernels_installed
    if kernels_installed:
        # `import kernels` from the checkout's root finds PyPI's package, never our folder.
        assert Path(before["kernels_origin"]).is_relative_to(SITE_PACKAGES)
    else:
        # At most our folder as a namespace package, which has no code and no version to probe.
        assert before["kernels_origin"] is None
        assert before["kernels_paths"] in ([], [str(REPO / "kernels")])


def test_kernels_folder_is_not_a_regular_package():
    assert (REPO / "kernels").is_dir()
    assert not (REPO / "kernels" / "__init__.py").exists()


@pytest.mark.slow
def test_a_checkout_runs_without_being_installed(tmp_path):
    view = site_view(tmp_path, PROJECT_FILES)
    probe = run_python("import finetune_kernels; print('installed')", view, cwd=tmp_path)
    assert probe.returncode != 0  # the view really lacks the project
    train = run_python(f"import runpy, sys; sys.argv = ['train.py', 'train.dry_run=true']; "
                       f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')", view)
    assert train.returncode == 0, train.stderr[-3000:]
    # The CUDA fast path's kernels import by their installed name.
    kernels = run_python("import finetune; from finetune_kernels.rmsnorm import rmsnorm; print(rmsnorm.__module__)", view)
    assert kernels.returncode == 0, kernels.stderr[-2000:]
    assert kernels.stdout.split() == ["finetune_kernels.rmsnorm"]
    bench = run_python(f"import runpy, sys; sys.argv = ['bench.py', '--help']; "
                       f"runpy.run_path({str(REPO / 'scripts' / 'bench.py')!r}, run_name='__main__')", view)
    assert bench.returncode == 0 and "--sides" in bench.stdout, bench.stderr[-2000:]


def test_a_checkout_without_dependencies_says_what_to_install(tmp_path):
    empty = tmp_path / "empty-site"
    empty.mkdir()
    for script in ("train.py", "scripts/bench.py", "scripts/merge_adapter.py"):
        result = subprocess.run([sys.executable, "-S", str(REPO / script)], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(empty)})
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not installed" in lines[0] and "scripts/venv-run" in lines[0], result.stderr


def test_required_top_level_layout():
    for name in ("pyproject.toml", "finetune", "recipes", "kernels", "scripts", "tests", "notebooks", "train.py",
                 "README.md", ".ci/run"):
        assert (REPO / name).exists(), name
