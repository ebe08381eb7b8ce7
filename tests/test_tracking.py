"""Trackers write what they are given, and it reads back with each tool's own reader."""

import json
import struct
from pathlib import Path

import pytest

from finetune.config import TrackerConfig, WandbMode
from finetune.tracking import JsonlTracker, choose_wandb_mode, open_trackers

from runner import run_train


def read_wandb_history(run_file: Path) -> list[dict]:
    """Parse a .wandb file: a 7-byte header, then LevelDB-log records holding protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    payload, position, block = b"", 7, 32768
    rows = []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record is assembled
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        elif kind == 0:
            break
    return rows


def test_jsonl_writes_one_object_per_call_and_nulls_non_finite(tmp_path):
    tracker = JsonlTracker(tmp_path / "m.jsonl")
    tracker.log({"loss": 1.5, "lr": 1e-4}, step=3)
    tracker.log({"loss": float("nan")}, step=4)
    tracker.log_table("samples", ["prompt", "completion"], [["a", "b"]], step=4)
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "loss": 1.5, "lr": 1e-4}, {"step": 4, "loss": None},
                    {"step": 4, "samples": [{"prompt": "a", "completion": "b"}]}]


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert choose_wandb_mode(WandbMode.auto) == ("offline", "no wandb API key (WANDB_API_KEY or `wandb login`)")
    assert choose_wandb_mode(WandbMode.online) == ("online", None)


def test_wandb_and_tensorboard_read_back(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = TrackerConfig(wandb=True, tensorboard=True, run_name="t1", tags=["ci"])
    trackers = open_trackers(cfg, tmp_path, "t1", {"lora": {"r": 8}})
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.25)]:
        trackers.log({"loss": loss, "lr": 1e-3}, step)
    trackers.log_table("samples", ["step", "prompt", "completion"], [[3, "hi", "there"]], 3)
    trackers.close()

    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = read_wandb_history(runs[0])
    losses = [row["loss"] for row in history if "loss" in row]
    assert losses == [2.0, 1.5, 1.25]
    assert any(row.get("samples/_type") == "table-file" and row.get("samples/nrows") == 1 for row in history)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.5), (3, 1.25)]


@pytest.mark.slow
def test_training_run_logs_everything_to_every_tracker(tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_train(f"output_dir={out}", f"cache_dir={cache_dir}", "tracker=[wandb,tensorboard]",
                       "train.max_steps=4", "train.log_every=2", "train.eval_every=2", "train.eval_generate=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb: offline run" in result.stdout and "wandb sync" in result.stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    for key in ("loss", "eval_loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                "peak_memory_gib", "trainable_params", "samples", "exact_match", "best_eval_loss"):
        assert key in logged, key

    history = read_wandb_history(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    assert [r["loss"] for r in history if "loss" in r] == [r["loss"] for r in rows if "loss" in r]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "eval_loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
