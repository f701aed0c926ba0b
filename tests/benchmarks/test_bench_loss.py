"""benchmarks.loss: every CPU implementation end to end on a tiny case, the worker path, the GPU preset's cases."""

import json

import pytest
import torch

from benchmarks import harness, loss
from benchmarks.loss_impls import IMPLS, Impl
from benchmarks.workload import HEADS, Case, cost_flops, make_inputs

CPU = torch.device("cpu")
TINY_LOSS = Case(op="loss", n=56, h=24, v=37, dtype="float32", head="tiny", pairs=4)
TINY_LOGPROBS = Case(op="logprobs", n=29, h=24, v=37, dtype="float32", head="tiny")
CPU_AVAILABLE = [n for n, impl in IMPLS.items() if impl.unavailable(TINY_LOSS, CPU) is None]


def test_cpu_runs_ours_eager_compile_and_liger():
    assert {"torch", "eager", "compile", "liger"} <= set(CPU_AVAILABLE)
    assert IMPLS["triton"].unavailable(TINY_LOSS, CPU)  # interpreter is not a performance path
    assert IMPLS["cce"].unavailable(TINY_LOSS, CPU)


@pytest.mark.parametrize("case", [TINY_LOSS, TINY_LOGPROBS], ids=["loss", "logprobs"])
@pytest.mark.parametrize("name", CPU_AVAILABLE)
def test_every_cpu_impl_runs_and_matches_float64(name, case, seed):
    impl = IMPLS[name]
    if impl.unavailable(case, CPU):
        pytest.skip(impl.unavailable(case, CPU))
    if name == "compile" and case.op == "logprobs":
        pytest.skip("the loss case already compiles the same eager function (inductor compiles cost CI time)")
    row, out = loss.measure(case, name, CPU, reps=2, seed=seed)
    assert row["status"] == "ok", row
    assert row["median_ms"] > 0 and row["extra_bytes"] >= 0 and row["grad_bytes"] > 0
    kind = impl.loss_kind if case.op == "loss" else "logprobs"
    ref = loss.reference_outputs(case, kind, CPU, seed)
    check = harness.check_outputs({k: out.get(k) for k in ref}, ref, torch.float32)
    assert check["ok"], check
    # The guard is not vacuous: a perturbed gradient is flagged.
    grad_key = next(k for k in ref if k.startswith("grad_"))
    out[grad_key] = out[grad_key] * 1.01
    assert not harness.check_outputs({k: out.get(k) for k in ref}, ref, torch.float32)["ok"]


def test_safedpo_and_dpo_references_differ_on_flagged_pairs(seed):
    a = loss.reference_outputs(TINY_LOSS, "safedpo", CPU, seed)["value"]
    b = loss.reference_outputs(TINY_LOSS, "dpo", CPU, seed)["value"]
    assert not torch.allclose(a, b)  # flags and margin matter, so Liger must be checked against DPO


def test_oom_and_errors_are_rows(monkeypatch):
    def oom_build(case, device):
        def step(x):
            raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return step

    def bad_build(case, device):
        raise KeyError("boom")

    monkeypatch.setitem(IMPLS, "oom", Impl("oom", "fake", "safedpo", True, oom_build, lambda c, d: None))
    monkeypatch.setitem(IMPLS, "bad", Impl("bad", "fake", "safedpo", True, bad_build, lambda c, d: None))
    row, out = loss.measure(TINY_LOSS, "oom", CPU, reps=1, seed=0)
    assert row["status"] == "OOM" and out is None
    row, out = loss.measure(TINY_LOSS, "bad", CPU, reps=1, seed=0)
    assert row["status"] == "error" and "boom" in row["error"]


def test_worker_processes_write_a_report_with_plots(tmp_path):
    case = Case(op="loss", n=16, h=16, v=40, dtype="float32", head="tiny", pairs=2)
    env = harness.environment(CPU)
    gemm = {"tflops": 1.0, "dtype": "float32", "size": 8}
    rows = loss.run_cases([(case, ("torch", "triton"))], CPU, reps=1, seed=3, env=env, gemm=gemm, threads=1)
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    for r in rows[:1]:  # measured in a fresh worker process, checked here against float64
        assert r["check"]["ok"], r["check"]
        assert r["device"] and r["commit"] and r["date"] and r["tflops"] > 0 and r["extra_bytes"] >= 0
    args = loss._parse(["--preset", "cpu", "--reps", "1"])
    md = loss.markdown_report(rows, env, gemm, args)
    assert "ours: torch chunked" in md and "**skipped**" in md and "MISMATCH" not in md
    # Plots need a sweep: the same rows again at twice the N stand in for a second size.
    doubled = [dict(r, case=dict(r["case"], n=32)) for r in rows]
    from benchmarks.plots import plot_loss_rows

    paths = plot_loss_rows(rows + doubled, tmp_path)
    assert [p.name.startswith("loss_vs_n") for p in paths] == [True]
    assert paths[0].stat().st_size > 1000
    json.dumps(rows, default=str)  # the raw rows serialize


def test_gpu_quick_preset_is_the_standard_plan_and_fits_the_budget():
    quick = loss.preset_cases("h100", quick=True)
    full = loss.preset_cases("h100", quick=False)
    assert quick == loss.standard_cases() and len(full) > 8
    assert {(c.h, c.v, c.n, c.dtype) for c, _ in quick} == {(2048, 248320, 16384, "bfloat16"),
                                                              (4096, 128256, 16384, "bfloat16")}
    rows = {n for _, names in quick for n in names}
    assert {"eager", "compile", "torch", "liger", "cce", "triton-filtered", "triton-deterministic"} <= rows
    assert any(c.frozen for c, _ in quick) and any(c.op == "loss" for c, _ in quick)
    assert {n for n in IMPLS if n.startswith("triton[")} <= rows  # every kernel variant the package ships
    heads = {c.head for c, _ in full}
    assert {"llama3-8b", "llama2-13b", "gemma2-2b"} <= heads
    for case, names in quick + full:
        assert (case.h, case.v) == HEADS[case.head]
        assert set(names) <= set(IMPLS)
        prompt = case.seq_len // 8 if case.prompt else 0
        assert case.positions >= case.n and case.seq_len - prompt == case.loss_tokens_per_row
    # Cost-model time of the plan at a pessimistic 25% of an H100's measured 790 TFLOP/s, 6 runs per
    # row (gpu_check: warm-up, memory run, 3 timed reps, a slice check): under 90 s of the 180 s
    # budget, the rest is for Triton/inductor compilation and the float64 slice references.
    seconds = sum(6 * IMPLS[n].flops(c) / (0.25 * 790e12) for c, names in quick for n in names)
    assert seconds < 90, seconds
    plan = loss.dry_run(quick, CPU)
    assert {p["impl"] for p in plan if p["skip"]} >= {"triton", "triton-filtered", "cce"}
    assert all(p["flops"] > 0 for p in plan)


def test_equal_work_frozen_head_and_cost_model():
    case = Case(op="loss", n=64, h=16, v=50, dtype="float32", pairs=4)
    x = make_inputs(case, CPU, seed=0)
    assert x["target"].shape == (8, 8) and int((x["target"] == -100).sum()) == 0  # no prompt: equal work
    prompted = Case(op="loss", n=56, h=16, v=50, dtype="float32", pairs=4, prompt=True)
    assert int((make_inputs(prompted, CPU, seed=0)["target"] != -100).sum()) == 56
    frozen = Case(op="logprobs", n=32, h=16, v=50, dtype="float32", frozen=True, logits="lm")
    xf = make_inputs(frozen, CPU, seed=0)
    assert not xf["weight"].requires_grad and set(loss.grad_leaves(xf)) == {"grad_hidden"}
    p_label = torch.log_softmax(xf["hidden"].detach() @ xf["weight"].T, -1).gather(1, xf["labels"][:, None]).exp()
    assert 0.3 < float(p_label.mean()) < 0.99  # LM-like: the label holds most of the mass
    nhv = 32 * 16 * 50
    assert cost_flops(frozen, recompute=False) == 4 * nhv and IMPLS["torch"].flops(frozen) == 4 * nhv
    assert IMPLS["triton-deterministic"].flops(Case(op="logprobs", n=32, h=16, v=50, dtype="float32")) == 10 * nhv
    assert IMPLS["eager"].flops(case) == 8 * 64 * 16 * 50  # 6NHV + the reference head's 2NHV
    with pytest.raises(ValueError, match="frozen"):
        Case(op="loss", n=8, h=8, v=8, dtype="float32", pairs=2, frozen=True)


def test_cli_dry_run_and_bad_arguments(capsys):
    assert loss.main(["--preset", "h100", "--quick", "--dry-run"]) == 0
    assert "llama3-8b" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        loss.main(["--preset", "cpu", "--impls", "nope", "--dry-run"])
    with pytest.raises(ValueError, match="op"):
        Case(op="train", n=8, h=8, v=8, dtype="float32")
    with pytest.raises(ValueError, match="n"):
        Case(op="loss", n=7, h=8, v=8, dtype="float32", pairs=2)


def test_inputs_follow_the_contract_layout():
    x = make_inputs(TINY_LOSS, CPU, seed=1)
    assert x["_input"].shape == (TINY_LOSS.rows, TINY_LOSS.seq_len, 24) and x["_input"].requires_grad
    assert int((x["target"] != -100).sum()) == TINY_LOSS.n
    assert not x["ref_input"].requires_grad and not x["ref_weight"].requires_grad
    flags = list(zip(x["chosen_unsafe"].tolist(), x["rejected_unsafe"].tolist()))
    assert flags == [(False, False), (True, False), (False, True), (True, True)]
    again = make_inputs(TINY_LOSS, CPU, seed=1)
    assert torch.equal(x["_input"], again["_input"]) and torch.equal(x["target"], again["target"])


@pytest.mark.parametrize("name", ["triton", "triton-filtered"])
@pytest.mark.parametrize("case", [TINY_LOSS, TINY_LOGPROBS], ids=["loss", "logprobs"])
def test_triton_steps_run_under_the_interpreter(name, case, seed):
    """The GPU rows' code path (module / grad_filter wiring), run through Triton's CPU interpreter."""
    pytest.importorskip("safedpo_kernels.triton_logprobs")
    from safedpo_kernels.triton_logprobs import triton_is_usable

    if not triton_is_usable(CPU):
        pytest.skip("TRITON_INTERPRET=1 not set")
    x = make_inputs(case, CPU, seed)
    value, objective = IMPLS[name].build(case, CPU)(x)
    objective.backward()
    ref = loss.reference_outputs(case, "safedpo" if case.op == "loss" else "logprobs", CPU, seed)
    grads = {k: t.grad for k, t in (("grad_input", x.get("_input")), ("grad_hidden", x.get("hidden")),
                                    ("grad_weight", x["weight"])) if t is not None}
    tol = 1e-4 if name == "triton" else 1e-2  # filtering drops gradient terms below fp32 resolution
    check = harness.check_outputs({"value": value, **grads}, ref, torch.float32)
    assert max(check["errors"].values()) <= tol, check


def test_gpu_preset_refuses_to_run_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="CUDA"):
        loss.main(["--preset", "h100", "--quick"])


def test_gpu_branch_in_process_with_the_chunked_float64_reference(seed):
    """What a GPU run does (measure in-process, float64 reference by the chunked path), on the CPU."""
    for kind in ("safedpo", "dpo"):
        eager = loss.reference_outputs(TINY_LOSS, kind, CPU, seed, method="eager")
        chunked = loss.reference_outputs(TINY_LOSS, kind, CPU, seed, method="chunked")
        for k in eager:
            assert harness.rel_err(chunked[k], eager[k]) < 1e-10, k
    env = harness.environment(CPU)
    gemm = {"tflops": 1.0, "dtype": "float32", "size": 8}
    rows = loss.run_cases([(TINY_LOSS, ("torch", "eager", "cce"))], CPU, reps=1, seed=seed, env=env,
                          gemm=gemm, in_process=True)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    assert all(r["check"]["ok"] for r in rows[:2]), [r["check"] for r in rows[:2]]


def test_correctness_check_runs_small_on_the_cpu(seed):
    rows = loss.correctness_check(CPU, seed, n=24, head="tiny", shape=(40, 300))
    by = {(r["case_label"].split()[-1], r["impl"]): r for r in rows}
    for dtype in ("bfloat16", "float16", "float32"):
        assert by[(dtype, "eager")]["status"] == "ok" and by[(dtype, "torch")]["status"] == "ok"
        assert by[(dtype, "torch")]["ok"], by[(dtype, "torch")]
        assert by[(dtype, "cce")]["status"] == "skipped"
    # Our path (bf16 GEMMs with float32 results) is no worse than the bf16 eager path.
    assert by[("bfloat16", "torch")]["errors"]["grad_weight"] <= 1.01 * by[("bfloat16", "eager")]["errors"]["grad_weight"]
    md = loss.correctness_markdown(rows)
    assert "rel err grad_weight" in md and "FAIL" not in md
