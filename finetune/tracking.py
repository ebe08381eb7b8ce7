"""Experiment tracking behind one small interface: metrics.jsonl always, wandb and tensorboard on request.

Every backend takes the same calls: `log(metrics, step)`, `log_table(name, columns, rows, step)`,
`close()`. The recipe talks to a `Trackers` fan-out and never to a backend directly.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

from finetune.config import TrackerConfig, WandbMode


def _finite_or_none(value):
    # JSON has no NaN/Infinity; null keeps the file readable by every JSON parser.
    return None if isinstance(value, float) and not math.isfinite(value) else value


class JsonlTracker:
    """One JSON object per line, flushed at once so a crashed run keeps everything it logged."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.log({name: [dict(zip(columns, row)) for row in rows]}, step)

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker:
    def __init__(self, log_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))
        self._writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |\n"
                       for row in rows)
        self._writer.add_text(name, header + body, step)

    def close(self) -> None:
        self._writer.close()


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_reachable(host: str = "api.wandb.ai", timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def choose_wandb_mode(requested: WandbMode) -> tuple[str, str | None]:
    """The mode to run wandb in, and why it is offline when the user did not ask for that."""
    if requested is not WandbMode.auto:
        return requested.value, None
    if not wandb_has_credentials():
        return "offline", "no wandb API key (WANDB_API_KEY or `wandb login`)"
    if not wandb_reachable():
        return "offline", "the wandb server cannot be reached"
    return "online", None


class WandbTracker:
    def __init__(self, cfg: TrackerConfig, run_dir: Path, run_name: str, config: dict):
        import wandb

        mode, reason = choose_wandb_mode(cfg.wandb_mode)
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name or run_name, group=cfg.group,
            tags=list(cfg.tags), config=config, dir=str(run_dir), mode=mode, resume="allow", id=cfg.run_id,
            # Our console carries one line per interval; wandb's own banner would interleave with it.
            settings=wandb.Settings(quiet=True, console="off"),
        )
        self.run_dir = Path(self.run.dir).parent
        if mode == "offline":
            why = f" ({reason})" if reason else ""
            print(f"wandb: offline run{why}; files in {self.run_dir}; upload later with: wandb sync {self.run_dir}")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: _finite_or_none(v) for k, v in metrics.items()}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()
        # Offline runs are written by wandb's background service; stopping it flushes the run file.
        self._wandb.teardown()


class Trackers:
    """Fans every call out to the configured backends."""

    def __init__(self, backends: list):
        self.backends = backends

    @property
    def run_id(self) -> str | None:
        """The wandb run's id, kept in checkpoints so a resumed run continues the same tracker run."""
        return next((b.run.id for b in self.backends if isinstance(b, WandbTracker)), None)

    def log(self, metrics: dict, step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        for backend in self.backends:
            backend.log_table(name, columns, rows, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_trackers(cfg: TrackerConfig, output_dir: Path, run_name: str, config: dict) -> Trackers:
    backends: list = [JsonlTracker(output_dir / "metrics.jsonl")]
    if cfg.tensorboard:
        backends.append(TensorBoardTracker(output_dir / "tensorboard", config))
    if cfg.wandb:
        backends.append(WandbTracker(cfg, output_dir, run_name, config))
    return Trackers(backends)
