"""Sweeps (`python train.py -m lora.r=8,16 optim.lr=1e-4,2e-4`): where each job writes, and the closing table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode

_RUN_STAMP = time.strftime("%Y%m%d-%H%M%S")


def _multirun() -> HydraConfig | None:
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def default_output_dir(name: str) -> str:
    """outputs/<recipe>-<time> for a single run; <sweep dir>/<job number>-<overrides> within a sweep."""
    hydra_cfg = _multirun()
    if hydra_cfg is None:
        return f"outputs/{name}-{_RUN_STAMP}"
    return hydra_cfg.runtime.output_dir


def sweep_group() -> str | None:
    """Tracker runs of one sweep share a group named after the sweep's directory."""
    hydra_cfg = _multirun()
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg is not None else None


class SweepSummary(Callback):
    """Collects each job's final figures and prints one table when the sweep ends."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        row = {"job": " ".join(job_return.overrides) or "(defaults)"}
        try:
            row.update(job_return.return_value or {})
            row["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - a failed job is a row in the table, not the end of the sweep
            row["status"] = f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        self.rows.append(row)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.rows:
            return
        columns = ["job", "status", "final_eval_loss", "best_eval_loss", "final_exact_match", "time_s", "output_dir"]
        columns = [c for c in columns if any(c in row for row in self.rows)]
        sweep_dir = Path(config.hydra.sweep.dir)
        with open(sweep_dir / "summary.jsonl", "w", encoding="utf-8") as handle:
            for row in self.rows:
                handle.write(json.dumps(row, default=str) + "\n")
        print(f"\nsweep summary ({len(self.rows)} runs, also in {sweep_dir / 'summary.jsonl'}):")
        print(format_table(columns, self.rows))


def format_table(columns: list[str], rows: list[dict]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
