"""benchmarks.logprobs_memory and benchmarks.end_to_end: tiny end-to-end runs through their CLIs."""

import json

from benchmarks import end_to_end, logprobs_memory


def test_logprobs_memory_tiny_run_writes_report_and_goal_verdicts(tmp_path):
    code = logprobs_memory.main(["--n", "96", "--h", "32", "--v", "300", "--reps", "1", "--threads", "1",
                                 "--out", str(tmp_path)])
    assert code == 0
    (folder,) = tmp_path.iterdir()
    md = (folder / "logprobs_memory_threads1.md").read_text()
    payload = json.loads((folder / "logprobs_memory_threads1.json").read_text())
    assert "torch chunked" in md and "eager" in md and "Goal (issue 2)" in md
    for impl in ("eager", "torch"):
        row = payload["rows"][impl]
        assert row["status"] == "ok" and row["check"]["ok"], row
        assert row["extra_bytes"] >= 0 and row["median_ms"] > 0
    assert set(payload["goals"]) >= {"memory_ratio", "time_ratio", "memory_pass", "time_pass"}


def test_end_to_end_micro_model_fused_and_eager_agree(tmp_path):
    code = end_to_end.main(["--model", "cpu-micro", "--pairs", "2", "--seq-len", "12", "--steps", "1",
                            "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    (folder,) = tmp_path.iterdir()
    payload = json.loads((folder / "end_to_end.json").read_text())
    fused, eager = payload["rows"]["fused"], payload["rows"]["eager"]
    assert fused["status"] == "ok" and eager["status"] == "ok", payload["rows"]
    assert abs(fused["first_loss"] - eager["first_loss"]) <= 1e-4 * max(1.0, abs(eager["first_loss"]))
    # 4 rows x 11 shifted targets, of which the first 12//4 - 1 = 2 are prompt: 4 * 9 loss tokens
    assert fused["tokens_per_s"] > 0 and fused["loss_tokens"] == 36
    assert "guard: ok" in (folder / "end_to_end.md").read_text()
