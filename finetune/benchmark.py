"""`finetune-eval`: score a trained adapter against its base, or a merged model, on lm-evaluation-harness tasks.

    finetune-eval adapter=outputs/run/adapter tasks=arc_easy,hellaswag limit=200
    finetune-eval model=merged/ tasks=my_task include_path=my_tasks/

With an adapter the tasks run twice on one loaded model, first with the adapter switched off (the
base, quantized exactly as in training) and then with it on; one table shows each metric for
both and the difference. Every result (both runs, the options, the library versions) is saved as
JSON under the adapter's run directory, `<run>/eval/<UTC time>.json`, or under `output=DIR`; an
existing file is never overwritten.

No hub access unless asked for: a task whose data lm_eval would download fails with a message
saying how to define it over local files (`include_path=DIR`), or to allow the download with
HF_HUB_OFFLINE=0.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import functools
import importlib.metadata
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from finetune.config import options_from_args
from finetune.errors import UserError
from finetune.hub_code import keep_hub_code_out
from finetune.io import create_text

RESULTS_DIR = "eval"
VERSIONS_OF = ("finetune", "lm_eval", "torch", "transformers", "peft", "bitsandbytes", "datasets")


class Device(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class BenchmarkConfig:
    tasks: str = MISSING
    """Comma-separated lm_eval task or group names (globs such as mmlu_* work)."""
    adapter: Optional[str] = None
    """Adapter directory: evaluated with the adapter off (base) and on."""
    model: Optional[str] = None
    """A merged model directory (finetune-merge's output), evaluated once."""
    limit: Optional[int] = None
    """At most this many examples per task."""
    batch_size: int = 8
    """Sequences per forward (log-likelihoods) or per generation batch."""
    num_fewshot: Optional[int] = None
    """Few-shot examples in each prompt. Default: each task's own setting (0 where it has none)."""
    device: Device = Device.auto
    output: Optional[str] = None
    """Directory for the results JSON. Default: <adapter's run dir>/eval (or <model>/eval)."""
    include_path: Optional[str] = None
    """A directory of task YAMLs of your own, added to lm_eval's built-in tasks."""
    apply_chat_template: bool = False
    """Render each prompt with the tokenizer's chat template (the one training used)."""
    system_instruction: Optional[str] = None
    """A system message put before each prompt."""
    max_length: Optional[int] = None
    """Longest sequence (prompt + continuation) one forward sees. Default: the model's max_position_embeddings."""


USAGE = """\
usage: finetune-eval adapter=PATH tasks=NAME[,NAME...] [key=value ...]
       finetune-eval model=PATH tasks=NAME[,NAME...] [key=value ...]

options (default first):
  adapter=PATH                 trained adapter: the tasks run on its base (adapter off) and with it
  model=PATH                   a merged model directory instead (one run)
  tasks=NAME[,NAME...]         lm_eval tasks or groups (`lm-eval ls tasks` lists them)
  include_path=DIR             a folder of task YAMLs of your own
  limit=N                      at most N examples per task
  num_fewshot=N                few-shot examples (default: each task's own)
  batch_size=8                 sequences per forward or generation batch
  device=auto|cpu|cuda
  apply_chat_template=false|true, system_instruction=TEXT
                               render prompts with the chat template, with this system message
  max_length=N                 longest sequence per forward (default: the model's context length)
  output=DIR                   where the results JSON goes (default: <adapter's run dir>/eval)
"""


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> BenchmarkConfig:
    """`key=value` arguments -> BenchmarkConfig, checked against the schema and each other."""
    config = options_from_args(BenchmarkConfig, argv, f"\n\n{USAGE}")
    if (config.adapter is None) == (config.model is None):
        raise UserError(f"pass exactly one of adapter=PATH or model=PATH\n\n{USAGE}")
    for name in ("limit", "batch_size", "max_length"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"{name}={getattr(config, name)}: it must be at least 1")
    if config.num_fewshot is not None and config.num_fewshot < 0:
        raise UserError(f"num_fewshot={config.num_fewshot}: it must be 0 or more")
    return config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(USAGE)
        return 0
    # Read by huggingface_hub and datasets when first imported: lm_eval then never reaches the hub
    # for a task's data unless the user set HF_HUB_OFFLINE=0.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # Options first, in a fraction of a second: keep_hub_code_out imports bitsandbytes and torch.
        config = parse_args(argv)
        keep_hub_code_out()
        run_benchmark(config)
    except (UserError, OSError) as e:  # OSError: an unwritable output, a full disk; its message says which
        print(f"finetune-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- the runs


def run_benchmark(config: BenchmarkConfig) -> Path:
    """Evaluate, print the table, save the results; returns the results file."""
    model_path = check_model_path(config)
    try:
        import lm_eval
    except ImportError:
        raise UserError("finetune-eval needs lm-evaluation-harness: pip install 'finetune[eval]'") from None

    from finetune.cli import quiet_libraries

    quiet_libraries()
    tasks = [name.strip() for name in config.tasks.split(",") if name.strip()]
    task_manager = task_index(check_include_path(config.include_path))
    check_task_names(tasks, task_manager)
    check_task_data(tasks, task_manager)

    lm, runs = load_runs(config, model_path)
    results = {}
    for label, switch in runs.items():
        print(f"running {', '.join(tasks)} on the {label} ...", flush=True)
        with switch():
            results[label] = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=config.num_fewshot, limit=config.limit,
                task_manager=task_manager, batch_size=config.batch_size, device=str(lm.device),
                apply_chat_template=config.apply_chat_template, system_instruction=config.system_instruction,
                log_samples=False)
    rows = table_rows(results)
    print(format_table(rows, list(results)))
    path = save_results(results_dir(config, model_path), {
        "config": {**asdict(config), "device": config.device.value, "max_length": lm.max_length,
                   "base_model": str(base_model_dir(config, model_path))},
        "versions": versions(),
        "table": rows,
        "runs": results,
    })
    print(f"results: {path}")
    return path


def check_model_path(config: BenchmarkConfig) -> Path:
    """The adapter or model directory, refused before anything heavy runs if it is not one."""
    from finetune.adapter_format import read_config

    if config.adapter is not None:
        path = Path(config.adapter).expanduser().resolve()
        read_config(path)
        return path
    path = Path(config.model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise UserError(f"model={config.model}: {path} is not a model directory (it has no config.json); "
                        "pass a merged model (finetune-merge's output), or adapter=PATH for an adapter")
    return path


def check_include_path(include_path: str | None) -> str | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise UserError(f"include_path={include_path}: no such directory; pass the folder that holds your task YAMLs")
    return str(path.resolve())


@functools.lru_cache(maxsize=4)
def task_index(include_path: str | None):
    """lm_eval's TaskManager over its built-in tasks and include_path's. Indexing its ~14,000 task
    YAMLs takes 10-20 s, so a process (a notebook, the tests) builds each index once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_task_names(tasks: list[str], task_manager) -> None:
    """Every name must be a task, group or tag lm_eval knows (built in or under include_path), or a task YAML."""
    if not tasks:
        raise UserError("tasks= names no task; pass tasks=NAME[,NAME...]")
    unknown = [name for name in tasks if not task_manager.match_tasks([name]) and not Path(name).is_file()]
    if not unknown:
        return
    close = sorted({match for name in unknown for match in difflib.get_close_matches(name, task_manager.all_tasks, 3)})
    did_you_mean = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{did_you_mean}: "
                    "`lm-eval ls tasks` lists the names (add --include_path DIR to see tasks of your own, "
                    "passed here as include_path=DIR)")


def check_task_data(tasks: list[str], task_manager) -> None:
    """Load each task once before the model: a task whose data cannot be had fails now, by name."""
    for name in tasks:
        try:
            task_manager.load([name])
        except Exception as e:  # lm_eval and datasets raise many kinds; the reason goes in the message
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"task {name!r} could not load its data ({reason}). Without hub access a task needs local "
                "data: write a task YAML over local files (dataset_path: json, dataset_kwargs: {data_files: ...}) "
                "and pass its folder as include_path=DIR, or set HF_HUB_OFFLINE=0 to let lm_eval download it"
            ) from None


def load_runs(config: BenchmarkConfig, model_path: Path):
    """The lm_eval model, and each run's label with the switch that sets the model up for it."""
    from finetune.api import load
    from finetune.lm_eval_model import FinetuneLM

    if config.adapter is not None:
        # The generic path: peft's disable_adapter() gives the base run the same loaded weights.
        model, tokenizer = load(model_path, config.device.value, impl="hf")
        runs = {"base": model.disable_adapter, "adapter": contextlib.nullcontext}
    else:
        model, tokenizer = load(model_path, config.device.value)
        runs = {"model": contextlib.nullcontext}
    max_length = config.max_length or context_length(base_model_dir(config, model_path))
    return FinetuneLM(model, tokenizer, max_length, config.batch_size), runs


def base_model_dir(config: BenchmarkConfig, model_path: Path) -> Path:
    """The directory whose config.json describes the evaluated network."""
    if config.adapter is None:
        return model_path
    from finetune.adapter_format import read_config

    return Path(read_config(model_path)["base_model_name_or_path"])


def context_length(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    if not isinstance(config.get("max_position_embeddings"), int):
        raise UserError(f"{model_dir}/config.json gives no max_position_embeddings; pass max_length=N")
    return config["max_position_embeddings"]


# ----------------------------------------------------------------------------- the report


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (task, metric) of the first run: each run's value, and with two runs their difference."""
    labels = list(results)
    rows = []
    for task, metrics in results[labels[0]]["results"].items():
        for key, value in metrics.items():
            # Metrics are "name,filter" keys; the rest ("alias", "sample_len", ...) describe the task.
            if "," not in key or "_stderr," in key:
                continue
            metric, _, metric_filter = key.partition(",")
            row = {"task": task, "metric": metric if metric_filter == "none" else f"{metric} ({metric_filter})"}
            for label in labels:
                row[label] = results[label]["results"].get(task, {}).get(key)
            if len(labels) == 2 and all(is_number(row[label]) for label in labels):
                row["delta"] = row[labels[1]] - row[labels[0]]
            rows.append(row)
    return rows


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_table(rows: list[dict], labels: list[str]) -> str:
    columns = ["task", "metric", *labels, *(["delta"] if len(labels) == 2 else [])]

    def cell(column: str, value) -> str:
        if not is_number(value):
            return "" if value is None else str(value)
        return f"{value:+.4f}" if column == "delta" else f"{value:.4f}"

    cells = [columns] + [[cell(column, row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) if i < 2 else text.rjust(width)
                       for i, (text, width) in enumerate(zip(line, widths))).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def results_dir(config: BenchmarkConfig, model_path: Path) -> Path:
    if config.output is not None:
        return Path(config.output).expanduser()
    if config.model is not None:
        return model_path / RESULTS_DIR
    # A run's adapter is <run>/adapter, a checkpoint's <run>/checkpoints/step-N: both belong to <run>.
    run_dir = model_path.parent.parent if model_path.parent.name == "checkpoints" else model_path.parent
    return run_dir / RESULTS_DIR


def save_results(directory: Path, report: dict) -> Path:
    """<directory>/<UTC time>.json, a new file (a suffix -2, -3, ... where that name is taken)."""
    from lm_eval.utils import handle_non_serializable

    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=handle_non_serializable) + "\n"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for attempt in range(1, 1000):
        path = directory / (f"{stamp}.json" if attempt == 1 else f"{stamp}-{attempt}.json")
        try:
            create_text(path, text)
            return path
        except FileExistsError:
            continue
    raise UserError(f"{directory} already holds results {stamp}.json to {stamp}-999.json; pass output=DIR")


def versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONS_OF:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.exit(main())
