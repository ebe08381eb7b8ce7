"""No code from the hub without consent: a training run and a merge make no network connection.

Each command runs in a fresh interpreter whose sockets refuse every outside connection and
record the attempt, so a library that tries the hub (bitsandbytes' CPU kernel fetch, a hub
download) shows up in the record even when it would quietly fall back.
"""

import json
import os
import subprocess
import sys

import pytest

from runner import REPO

NO_NETWORK = """
import atexit, json, os, socket
attempts = []
def refuse(kind):
    def blocked(*args, **kwargs):
        target = args[1] if kind in ("connect", "connect_ex") else args[0]
        if kind in ("connect", "connect_ex") and args[0].family == socket.AF_UNIX:
            return original[kind](*args, **kwargs)  # local sockets are not the network
        if target in ("localhost", "127.0.0.1", "::1") or (isinstance(target, tuple) and target[0] in ("127.0.0.1", "::1")):
            return original[kind](*args, **kwargs)
        attempts.append([kind, repr(target)[:120]])
        raise OSError(f"the test refuses network access ({kind} {target!r})")
    return blocked
original = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex,
            "getaddrinfo": socket.getaddrinfo, "create_connection": socket.create_connection}
socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect_ex")
socket.getaddrinfo = refuse("getaddrinfo")
socket.create_connection = refuse("create_connection")
atexit.register(lambda: open(os.environ["NETWORK_LOG"], "w").write(json.dumps(attempts)))
import sys
def bitsandbytes_guarded(event, args):
    # Without consent, bitsandbytes must first be imported while `import kernels` fails (the hub
    # fetch happens only on AVX512-BF16 CPUs, so the network record alone would not show it here).
    if (event == "import" and args[0] == "bitsandbytes" and "bitsandbytes" not in sys.modules
            and os.environ.get("FINETUNE_HUB_KERNELS") != "1" and sys.modules.get("kernels", "absent") is not None):
        attempts.append(["bitsandbytes imported without the guard", ""])
sys.addaudithook(bitsandbytes_guarded)
"""


def run_offline(tmp_path, script: str, *args: str, **env) -> tuple[subprocess.CompletedProcess, list]:
    log = tmp_path / f"network-{len(list(tmp_path.glob('network-*')))}.json"
    code = NO_NETWORK + (f"import runpy, sys; sys.argv = [{script!r}, *{list(args)!r}]\n"
                         f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')")
    environment = {**os.environ, "NETWORK_LOG": str(log), "PYTHONUNBUFFERED": "1", **env}
    environment.pop("HF_HUB_OFFLINE", None)  # a hub call must really try, so that the record sees it
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=900)
    return result, json.loads(log.read_text()) if log.exists() else None


def bitsandbytes_would_fetch_a_cpu_kernel() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import importlib.util, bitsandbytes.functional as F; "
                            "print(F.has_avx512bf16() and importlib.util.find_spec('kernels') is not None)"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return probe.stdout.split()[-1:] == ["True"]


@pytest.mark.slow
def test_training_and_merging_make_no_network_connection(tmp_path, cache_dir):
    out = tmp_path / "run"
    train, attempts = run_offline(tmp_path, "train.py", f"output_dir={out}", f"cache_dir={cache_dir}",
                                  "train.max_steps=2", "train.eval_every=0", "train.eval_generate=0",
                                  "train.sample_prompts=[]")
    assert train.returncode == 0, train.stderr[-3000:]
    assert attempts == [], attempts
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    merge, attempts = run_offline(tmp_path, "scripts/merge_adapter.py", f"adapter={out / 'adapter'}",
                                  f"output={tmp_path / 'merged'}")
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert attempts == [], attempts
    assert (tmp_path / "merged" / "config.json").is_file()
    for output in (train, merge):
        assert "kernels-community" not in output.stderr + output.stdout


def test_opting_in_lets_bitsandbytes_reach_for_its_hub_kernel(tmp_path):
    # The guard above must be guarding something: with consent, the same import goes to the hub.
    if not bitsandbytes_would_fetch_a_cpu_kernel():
        pytest.skip(reason="bitsandbytes fetches a hub kernel only on AVX512-BF16 CPUs with PyPI's kernels installed")
    code = "from finetune.entry import start; start('python -c'); import bitsandbytes"
    (tmp_path / "probe.py").write_text(code)
    refused, refused_attempts = run_offline(tmp_path, str(tmp_path / "probe.py"))
    allowed, allowed_attempts = run_offline(tmp_path, str(tmp_path / "probe.py"), FINETUNE_HUB_KERNELS="1")
    assert refused.returncode == 0 and allowed.returncode == 0, refused.stderr[-2000:] + allowed.stderr[-2000:]
    assert refused_attempts == []
    assert allowed_attempts, "bitsandbytes made no hub call even with consent: the guard guards nothing"


def test_the_switches_reach_transformers_and_leave_kernels_importable():
    code = ("import os, importlib.util; from finetune.hub_code import keep_hub_code_out; keep_hub_code_out(); "
            "from transformers.integrations.hub_kernels import _kernels_enabled; import bitsandbytes; "
            "print(_kernels_enabled(), os.environ['DISABLE_KERNEL_MAPPING'], "
            "importlib.util.find_spec('kernels') is not None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    enabled, mapping_off, kernels_importable = result.stdout.split()
    assert enabled == "False" and mapping_off == "1"
    installed = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels') is not None)"],
                               cwd="/", capture_output=True, text=True, timeout=60).stdout.strip()
    assert kernels_importable == installed
