"""scripts/bench_dpo.py on the CPU: its synthetic pairs fill a setting exactly in our pipeline and in
TRL's count, and its smoke mode runs every side (the GPU comparison itself is run by hand)."""

import json
import math
import subprocess
import sys

import pytest
from runner import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_dpo  # noqa: E402

from finetune.config import DataConfig, DataFormat  # noqa: E402
from finetune.data import load_preference_splits  # noqa: E402
from finetune.demo import build_tokenizer  # noqa: E402


@pytest.mark.parametrize("seq", [64, 301, 2048])
def test_pairs_fill_the_setting_without_truncation_or_drops(tmp_path, seq):
    tokenizer = build_tokenizer()
    path = bench_dpo.write_pairs(tmp_path / "pairs.jsonl", tokenizer, seq, rows=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    config = DataConfig(path=str(path), eval_path=str(path), format=DataFormat.preference, max_seq_len=seq, num_proc=1)
    train, _, lines = load_preference_splits(config, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert len(train) == len(rows) and "0 truncated, 0 dropped" in lines[-2]
    for row, pair in zip(rows, train):
        # TRL tokenizes the conversations whole; ours stops at the end-of-turn token, before the template's newline.
        for response, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            assert bench_dpo.chat_tokens(tokenizer, row["prompt"] + row[response]) == seq
            assert len(pair.prompt_ids) + len(ids) == seq - 1
        assert len(pair.prompt_ids) == seq // 2
        assert pair.chosen_ids != pair.rejected_ids


def test_a_bad_setting_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_dpo.main(["--settings", "2by2048", "--sides", "dpo"])
    assert stop.value.code == 2
    assert "setting '2by2048': expected PAIRSxSEQ" in capsys.readouterr().err.splitlines()[-1]


def test_smoke_mode_runs_every_side_from_ln2(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_dpo.py"), "--smoke", "--workdir",
                             str(tmp_path), "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["side"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["dpo", "trl-dpo", "sft"]
    assert not [row["error"] for row in rows.values() if "error" in row]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["peak_gib"] > 0
    for side in ("dpo", "trl-dpo"):
        # A fresh adapter (B = 0) leaves the policy equal to the reference: -log sigmoid(0).
        assert rows[side]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    # The smoke setting: 2 pairs x 64, one micro-batch a step; every sequence whole, padding not counted.
    assert rows["trl-dpo"]["sequence_tokens"] == [64, 64]
    assert rows["trl-dpo"]["tokens_per_step"] == 2 * 2 * 64
    assert rows["dpo"]["tokens_per_step"] == pytest.approx(2 * 2 * 63)
    assert any("0 truncated, 0 dropped" in line and "max 63" in line
               for line in rows["dpo"]["console"] if line.startswith("data train"))
    assert rows["sft"]["batch"] == 4 and rows["sft"]["tokens_per_step"] == pytest.approx(4 * 64)
    table = result.stdout
    for name in ("train.py llama3_8b_dpo", "TRL DPOTrainer", "train.py llama3_8b_qlora (SFT), 4 x 64 packed"):
        assert f"| 2 pairs x 64 | {name} |" in table
    assert "DPO peak / SFT peak on the same tokens (4 x 64)" in table
