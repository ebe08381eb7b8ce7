"""No code from the model hub runs in our processes unless the user asks for it.

Installing the project's dependencies brings mechanisms that fetch and execute code from the hub
on their own (checked 2026-12, transformers 5.25, bitsandbytes 0.50.2, kernels 0.19):

- bitsandbytes' CPU backend, on a CPU with AVX512-BF16, calls
  `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` while it is being imported,
  to replace its own 4-bit matmul; PyPI's `kernels` package is now a dependency of transformers,
  so this happens on every plain install. bitsandbytes' own C++ kernel is used when the import of
  `kernels` fails, and that is the path our fidelity tests check.
- transformers' hub kernels (layer kernels loaded lazily, `kernelize`): off with
  `USE_HUB_KERNELS=NO`, transformers' own switch.
- the `kernels` package's layer mapping: off with `DISABLE_KERNEL_MAPPING=1`, its own switch.

Model code from the hub (`trust_remote_code`) is a separate, per-run choice:
`model.trust_remote_code`, false by default.

Two pings carry nothing a run needs and are always off (a value the user set wins):
`datasets` counts "downloads" of its packaged json/text builders with a request to S3 on every
local file load, and huggingface_hub sends telemetry.

Every entry point (`train.py`, the merge script, `finetune.train`/`finetune.load`, bench.py)
calls `keep_hub_code_out()` before anything imports bitsandbytes. `train.py` sets the switches
at once (`switch_off_hub_code`) and leaves the guarded import of bitsandbytes (about 5 s) to the
recipe, right before it builds the model, so that a mistake found before then is reported without
waiting for it. Opt in with `FINETUNE_HUB_KERNELS=1` in the environment. Importing `finetune`
itself changes nothing.
"""

from __future__ import annotations

import logging
import os
import sys

OPT_IN = "FINETUNE_HUB_KERNELS"
HOW_TO_OPT_IN = f"set {OPT_IN}=1 to let bitsandbytes and transformers load kernels from the hub"

HUB_CODE_SWITCHES = {"USE_HUB_KERNELS": "NO", "DISABLE_KERNEL_MAPPING": "1"}
TELEMETRY_SWITCHES = {"HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}

_ABSENT = object()


def hub_kernels_allowed() -> bool:
    return os.environ.get(OPT_IN, "").strip().lower() in ("1", "true", "yes", "on")


def keep_hub_code_out() -> None:
    """Switch off the telemetry, and every hub-code mechanism unless the user opted in; idempotent.

    The libraries read these switches when first imported, so this runs before they are. A
    switch the user set explicitly in the environment is left as it is.
    """
    switch_off_hub_code()
    if not hub_kernels_allowed() and "bitsandbytes" not in sys.modules:
        _import_bitsandbytes_without_hub_kernels()


def switch_off_hub_code() -> None:
    """The environment switches of `keep_hub_code_out`, without importing bitsandbytes: whoever
    calls this must call `keep_hub_code_out` before anything imports bitsandbytes."""
    for name, value in TELEMETRY_SWITCHES.items():
        os.environ.setdefault(name, value)
    if hub_kernels_allowed():
        return
    for name, value in HUB_CODE_SWITCHES.items():
        os.environ.setdefault(name, value)


def _import_bitsandbytes_without_hub_kernels() -> None:
    """Import bitsandbytes once while `import kernels` fails, then put `kernels` back.

    bitsandbytes has no switch for its import-time hub call; a None entry in sys.modules is
    Python's documented way to make one import fail. Only this import sees it: afterwards
    `kernels` imports as before, so transformers' view of what is installed is unchanged.
    """
    saved = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # type: ignore[assignment]
    # Its fallback notice tells the user to install `kernels`; here the fallback is the point.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass  # not installed: whoever needs it reports that, with its own message
    finally:
        cpu_ops_log.setLevel(level)
        if saved is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
