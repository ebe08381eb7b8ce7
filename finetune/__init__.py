"""QLoRA fine-tuning: a 4-bit NF4 base, LoRA adapters, Hydra recipes.

    import finetune
    result = finetune.train(recipe="demo", overrides=["train.max_steps=50"])
    model, tokenizer = finetune.load(result.adapter_dir)
    print(finetune.generate(model, tokenizer, "Where does the frog live?"))
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["generate", "load", "train"]


def _expose_checkout_kernels() -> None:
    """Make `finetune_kernels` importable from a source checkout that was never pip-installed.

    pyproject.toml installs the top-level kernels/ folder under that name (a package named
    `kernels` would shadow PyPI's); a bare checkout has the folder but not the name.
    """
    if "finetune_kernels" in sys.modules or importlib.util.find_spec("finetune_kernels") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not folder.is_dir():
        return
    spec = importlib.machinery.ModuleSpec("finetune_kernels", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules["finetune_kernels"] = importlib.util.module_from_spec(spec)


_expose_checkout_kernels()


def __getattr__(name: str):
    # The API pulls in torch: load it on first use, so that `finetune.entry` can still say
    # what to install when the dependencies are missing.
    if name in __all__:
        from finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
