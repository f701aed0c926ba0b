"""scripts/gpu_check.py: argument parsing and a tiny CPU-interpreter dry run (the GPU run is manual)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(tmp_path):
    gpu_check = _load()
    args = gpu_check.parse_args(["--out", str(tmp_path / "r.txt")])
    assert args.check == [4096, 4096, 128256] and args.bench_n == [4096, 16384] and args.bench_hv == [4096, 128256]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--check", "1,2"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])  # --out is required


def test_dry_run_writes_a_passing_report(tmp_path):
    gpu_check = _load()
    out = tmp_path / "report.txt"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--check", "24,32,100", "--dtypes", "fp16",
                         "--bench-n", "16", "--bench-hv", "32,100", "--reps", "1"])  # fmt: skip
    text = out.read_text()
    assert rc == 0, text
    assert "fp16   deterministic" in text and "bit-identical" in text and "correctness PASS" in text
    assert "fused fwd+bwd" in text and "ERROR" not in text
