"""The real CLI on bad data and on data.preview: one line on stderr, exit 2, nothing written."""

import pytest

from runner import run_train

pytestmark = pytest.mark.slow


def test_malformed_json_line_exits_2_naming_file_and_line(tmp_path, cache_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    result = run_train(f"data.path={bad}", f"output_dir={tmp_path / 'never'}", f"cache_dir={cache_dir}")
    assert result.returncode == 2
    assert f"error: {bad}:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_offline_hub_dataset_exits_2_naming_it(tmp_path, cache_dir, monkeypatch):
    # Offline mode makes the hub fail at once instead of after half a minute of retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_train("data.path=nobody-here/no-dataset", f"output_dir={tmp_path / 'never'}",
                       f"cache_dir={cache_dir}")
    assert result.returncode == 2
    assert "'nobody-here/no-dataset' (subset=None, split=train) is not a local file" in result.stderr
    assert not (tmp_path / "never").exists()


def test_preview_prints_marked_samples_and_exits_without_training(tmp_path, cache_dir):
    result = run_train("data.preview=2", f"output_dir={tmp_path / 'never'}", f"cache_dir={cache_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("--- sample ") == 2 and "<|im_start|>assistant\n[[" in result.stdout
    assert "eval before training" not in result.stdout and not (tmp_path / "never").exists()
