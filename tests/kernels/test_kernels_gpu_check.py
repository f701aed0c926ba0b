"""scripts/gpu_check.py: arguments, the verdict rules, and a --dry-run on the CPU (Triton interpreter,
tiny shapes) that runs every row's code path; the budget watchdog in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernels_testutils import load_script

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return load_script("gpu_check")


def test_arguments():
    gpu_check = _load()
    args = gpu_check.parse_args([])
    assert args.budget_s == 180 and args.shape_list is None and args.reps == 3
    args = gpu_check.parse_args(["--shapes", "llama3-8b:4096,x:64:1000:32"])
    assert args.shape_list == [("llama3-8b", 4096), (("x", 64, 1000), 32)]
    for bad in (["--shapes", "a:b"], ["--reps", "0"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def _row(impl, status="ok", verdict=None, **kw):
    row = {"case_label": "logprobs x", "impl": impl, "status": status, **kw}
    if verdict:
        row["check"] = {"verdict": verdict}
    return row


def test_verdict_never_passes_when_a_check_did_not_run(tmp_path):
    gpu_check = _load()
    args = gpu_check.parse_args(["--out", str(tmp_path), "--dry-run"])

    class FakeRun(gpu_check.Run):
        def __init__(self, rows, kernels=()):
            self.rows, self.kernels = rows, list(kernels)

    assert FakeRun([_row("triton", verdict="PASS"), _row("eager", verdict="baseline")]).verdict()[0] == "PASS"
    assert FakeRun([_row("triton", verdict="FAIL")]).verdict()[0] == "FAIL"
    assert FakeRun([_row("triton[default]", status="error", error="boom")]).verdict()[0] == "FAIL"
    assert FakeRun([_row("triton[x]", status="error", error="boom")]).verdict()[0] == "INCOMPLETE"  # a candidate
    assert FakeRun([_row("torch", status="OOM")]).verdict()[0] == "FAIL"
    assert FakeRun([_row("eager", status="OOM")]).verdict()[0] == "PASS"  # a baseline's OOM is a measurement
    assert FakeRun([_row("cce", status="skipped", error="not installed")]).verdict()[0] == "INCOMPLETE"
    assert FakeRun([_row("liger", status="budget")]).verdict()[0] == "INCOMPLETE"
    assert FakeRun([_row("liger", status="error")]).verdict()[0] == "INCOMPLETE"
    assert FakeRun([_row("triton")], [{"name": "k", "n_spills": 3}]).verdict()[0] == "FAIL"
    assert gpu_check.STATUS_EXIT == {"PASS": 0, "FAIL": 1, "INCOMPLETE": 2}
    assert args.dry_run


@pytest.mark.slow
def test_dry_run_runs_every_row(tmp_path):
    gpu_check = _load()
    from benchmarks import loss

    rc = gpu_check.main(["--dry-run", "--budget-s", "1500", "--out", str(tmp_path)])
    (folder,) = tmp_path.iterdir()
    payload = json.loads((folder / "gpu_check.json").read_text())
    md = (folder / "gpu_check.md").read_text()
    assert (folder / "gpu_check.png").stat().st_size > 1000
    assert rc == 0 and payload["status"] == "PASS", md
    planned = {(c.label(), i) for c, names in loss.standard_cases(gpu_check.DRY_SHAPES) for i in names}
    done = {(r["case_label"], r["impl"]) for r in payload["rows"]}
    assert done == planned
    by_impl = {}
    for r in payload["rows"]:
        by_impl.setdefault(r["impl"], []).append(r)
    for impl, rows in by_impl.items():
        for r in rows:
            if impl == "cce":  # CUDA only: the one row the CPU cannot run, noted
                assert r["status"] == "skipped" and "CUDA" in r["error"]
                continue
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["pct_gemm_useful"] > 0 and r["check"]["errors"], r
            if impl in gpu_check.EXACT:
                assert r["check"]["verdict"] == "PASS", r["check"]
            elif impl.startswith("triton["):  # candidates: measured and reported
                assert r["check"]["verdict"] in ("PASS", "over eager bound (candidate)"), r["check"]
    assert by_impl["triton-deterministic"][0]["check"]["bit_identical"]
    assert any("skipped_fraction" in r for r in by_impl["triton-filtered"])
    if "triton[no_frozen_kernel]" in by_impl:  # the recompute path next to the frozen-head kernel
        assert by_impl["triton[no_frozen_kernel]"][0]["case"]["frozen"]
        assert any(r.get("frozen_head_kernel") for r in by_impl["triton"])
    assert any(r["case"]["frozen"] for r in by_impl["triton"]) and any(r["case"]["op"] == "loss" for r in by_impl["triton"])
    assert "not run in the dry run" in md and "Goals (issue 18)" in md


def test_watchdog_ends_the_run_at_the_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--budget-s", "1",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (folder,) = tmp_path.iterdir()
    payload = json.loads((folder / "gpu_check.json").read_text())
    # either the watchdog cut a row off, or every row was refused for want of budget: never PASS
    budget_rows = [r for r in payload["rows"] if r["status"] == "budget"]
    assert payload["status"] == "INCOMPLETE"
    assert any("watchdog" in n for n in payload["notes"]) or (budget_rows and len(budget_rows) == len(payload["rows"]))
    assert "PASS" not in (folder / "gpu_check.md").read_text().split("\n")[2]
