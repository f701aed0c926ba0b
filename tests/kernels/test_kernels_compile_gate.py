"""GPU-less compile gate (scripts/compile_gate.py): the CI subset compiles for sm_90a and sm_80 with
no spills and the right tensor-core ops, its checks can fail, and the committed full table covers
every target that ships today."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernels_testutils import load_script

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "compile_gate.txt"


def _gate():
    return load_script("compile_gate")


def _row(**kw):
    row = {"registers": 200, "ptxas_registers": 200, "stack": 0, "local": 0, "spill_stores": 0, "spill_loads": 0,
           "shared": 65536, "mma": {"HGMMA.64x128x16.F32.BF16": 2}}
    row.update(kw)
    return row


def test_judge_fails_each_defect():
    gate = _gate()
    assert gate.judge(_row(), "sm90", "BF16", False) == []
    assert "spills" in gate.judge(_row(spill_stores=8), "sm90", "BF16", False)[0]
    assert "spills" in gate.judge(_row(stack=16), "sm90", "BF16", False)[0]
    assert "registers" in gate.judge(_row(ptxas_registers=128), "sm90", "BF16", False)[0]
    assert "shared" in gate.judge(_row(shared=240000), "sm90", "BF16", False)[0]
    assert "HGMMA" in gate.judge(_row(mma={"HGMMA.64x128x8.F32.TF32": 2}), "sm90", "BF16", False)[0]
    assert "HGMMA" in gate.judge(_row(mma={}), "sm90", "BF16", False)[0]
    assert "HMMA" in gate.judge(_row(mma={}), "sm80", "BF16", False)[0]
    assert gate.judge(_row(mma={}), "sm90", None, False) == []  # fp32 ieee: FFMA by design


def test_tool_output_that_does_not_parse_is_an_error():
    gate = _gate()
    good = "Resource usage:\n Function _k:\n  REG:210 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:624\n"
    assert gate.parse_resources(good, "_k") == {"registers": 210, "stack": 0, "static_shared": 1024, "local": 0}
    with pytest.raises(ValueError):
        gate.parse_resources(good, "_other")
    with pytest.raises(ValueError):
        gate.parse_resources("cuobjdump fatal: bad file", "_k")
    log = "ptxas info : Used 210 registers\n 0 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads\n"
    assert gate.parse_ptxas_log(log) == {"ptxas_registers": 210, "spill_stores": 0, "spill_loads": 4}
    with pytest.raises(ValueError):
        gate.parse_ptxas_log("ptxas fatal : Unresolved extern function")
    sass = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;\n HMMA.16816.F32 R4, R8, R12, R4 ;"
    assert gate.mma_kinds(sass) == {"HGMMA.64x128x16.F32.BF16": 1, "HMMA.16816.F32.F16": 1}


def test_every_launchable_flag_combination_is_a_job():
    gate = _gate()
    combos = gate._fallback_flag_combos("backward")
    assert len(combos) == 20  # bias x filter x non-empty gradient subsets (db only with a bias)
    assert not any(c["COMPUTE_DB"] and not c["HAS_BIAS"] for c in combos)
    assert len(gate._fallback_flag_combos("grad_weight")) == 8 and len(gate._fallback_flag_combos("forward")) == 2
    everything, _ = gate.all_jobs()
    from safedpo_kernels.kernels.config import ARCHS, all_configs

    assert {(a, k, str(c)) for a, k, _, c in all_configs()} <= {(j.arch, j.kernel, str(j.config)) for j in everything}
    full, ci = gate.jobs("full"), gate.jobs("ci")
    hopper = {(j.kernel, j.flags) for j in everything if j.arch == "sm90" and j.dtype == "bf16" and j.default
              and not j.control}
    assert hopper <= {(j.kernel, j.flags) for j in full if j.arch == "sm90"}  # every flag combination, compiled
    for kernel in {j.kernel for j in everything if j.arch == "sm80"}:  # sm_80: every flag on and off
        def values(jobs, name, kernel=kernel):
            return {dict(j.flags).get(name, False) for j in jobs if j.arch == "sm80" and j.kernel == kernel
                    and j.dtype == "bf16" and j.default and not j.control}
        names = {k for j in everything if j.arch == "sm80" and j.kernel == kernel for k, _ in j.flags}
        for name in names:  # every value a launch can give the flag is compiled
            assert values(full, name) == values(everything, name), (kernel, name)
    assert {j.arch for j in full if j.control} == set(ARCHS) and {j.dtype for j in full} >= {"bf16", "fp16", "fp32-ieee"}
    assert {(j.arch, j.kernel) for j in ci if not j.control} == {(j.arch, j.kernel) for j in everything}
    assert len(ci) <= 2 * len({j.kernel for j in everything}) + 2


def test_committed_full_table_covers_every_target():
    """benchmarks/results/compile_gate.txt must be regenerated when a kernel, flag or config is added:
    python scripts/compile_gate.py --full --out benchmarks/results/compile_gate.txt"""
    gate = _gate()
    committed = gate.parse_table(COMMITTED.read_text())
    expected = {gate.job_key(j) for j in gate.jobs("full")}
    missing = sorted(expected - set(committed))
    assert not missing, f"{len(missing)} targets not in {COMMITTED.name}, e.g. {missing[:3]}; regenerate it"
    failed = sorted(k for k in expected if committed[k] != "ok")
    assert not failed, failed[:5]


def test_compile_gate_ci_subset(tmp_path):
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip(f"this triton wheel ships no ptxas/cuobjdump in {bin_dir}")
    # triton.jit reads TRITON_INTERPRET when a kernel is decorated: the gate needs a fresh process
    # without it (the conftest sets it for this one).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_gate.py"), "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['key']}: {r['errors']}" for r in failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gate = _gate()
    everything, _ = gate.all_jobs()
    assert {(r["arch"], r["kernel"]) for r in rows} == {(j.arch, j.kernel) for j in everything}
    real = [r for r in rows if not r["control"]]
    assert all(r["registers"] == r["ptxas_registers"] and r["stack"] == 0 and r["spill_stores"] == 0 for r in real)
    assert all(k.startswith("HGMMA") and k.endswith(".BF16") for r in real if r["arch"] == "sm90" for k in r["mma"])
    controls = [r for r in rows if r["control"]]
    assert {r["arch"] for r in controls} == {"sm90", "sm80"}
    assert all(r["ok"] and "control caught" in r["notes"][-1] for r in controls)
