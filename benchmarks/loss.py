"""SafeDPO loss (and linear_logprobs) forward+backward from hidden states, every implementation side by side.

    python -m benchmarks.loss --preset cpu                                  # this CPU machine, a few minutes
    python -m benchmarks.loss --preset h100 --quick --out benchmarks/results/   # GPU check, < 4 min on one H100
    python -m benchmarks.loss --preset h100                                  # the full GPU sweep
    python -m benchmarks.loss --preset h100 --quick --dry-run                # list cases and availability only

Implementations: see ``benchmarks/loss_impls.py`` (ours: Triton exact / filtered, torch chunked;
eager PyTorch; torch.compile of eager; Liger-Kernel; Cut Cross-Entropy). Cases: see ``PRESETS``.

Per case and implementation: median time of >= 10 repetitions after warm-up (CUDA events on a
GPU); peak memory above the inputs (``max_memory_allocated`` on a GPU; peak RSS in a fresh process
per case on the CPU); TFLOP/s from the cost model in ``benchmarks.workload.cost_flops`` and as a
share of this card's bf16 GEMM rate measured in the same run; loss and gradients against a float64
reference of the same inputs (``ok`` or ``MISMATCH`` in the table). Out of memory and errors are
rows, not crashes. ``--quick`` on a GPU also runs a real-size bf16/fp16/fp32 correctness check of
``linear_logprobs`` against float64 eager autograd (``correctness.md``).
Output: ``--out/<device>-<date>/`` with ``loss.md``, ``loss.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.loss_impls import IMPLS
from benchmarks.workload import (BETA, DELTA, HEADS, IGNORE_INDEX, Case, cost_flops, grad_bytes, grad_leaves,
                                 make_inputs, upcast)

ALL = tuple(IMPLS)
GPU_LOGPROB_IMPLS = ("triton", "triton-filtered", "torch", "eager", "compile", "cce")
CPU_IMPLS = ("torch", "eager", "compile", "liger")
#: The two standard GPU shapes (issue 18), bf16: (head, N loss tokens).
STANDARD_SHAPES = (("qwen3.5-cce", 16384), ("llama3-8b", 16384))


def _head(name: str, op: str, n: int, dtype: str, pairs: int = 8, **kw) -> Case:
    h, v = HEADS[name]
    return Case(op=op, n=n, h=h, v=v, dtype=dtype, head=name, pairs=pairs, **kw)


def standard_cases(shapes=None) -> list[tuple[Case, tuple[str, ...]]]:
    """The one-GPU-run plan (``scripts/gpu_check.py`` and ``--preset h100 --quick``), per shape:

    * ``logprobs`` (LM-like logits): every kernel variant (or the default kernel when the package
      has no variants), filtered, deterministic, our torch path, eager, torch.compile, Cut Cross-Entropy;
    * ``logprobs`` with a frozen head: ours (Triton's frozen-head kernel, its frozen-head variants
      incl. the forward + recompute backward for comparison, torch) and eager;
    * ``loss``: ours (SafeDPO) and Liger's DPO loss on the same pairs (8 pairs, reference head).

    ``shapes``: ((head or (name, H, V)), N) pairs; default :data:`STANDARD_SHAPES`.
    """
    variants = tuple(n for n in IMPLS if n.startswith("triton[") and not IMPLS[n].frozen_only)
    frozen_variants = tuple(n for n in IMPLS if n.startswith("triton[") and IMPLS[n].frozen_only)
    out = []
    for head, n in shapes or STANDARD_SHAPES:
        if isinstance(head, tuple):
            name, h, v = head
            mk = lambda op, **kw: Case(op=op, n=n, h=h, v=v, dtype="bfloat16", head=name, **kw)  # noqa: E731
        else:
            mk = lambda op, **kw: _head(head, op, n, "bfloat16", **kw)  # noqa: E731
        out.append((mk("logprobs", logits="lm"), (variants or ("triton",)) + (
            "triton-filtered", "triton-deterministic", "torch", "eager", "compile", "cce")))
        out.append((mk("logprobs", logits="lm", frozen=True), ("triton",) + frozen_variants + ("torch", "eager")))
        pairs = max(p for p in range(1, 9) if n % (2 * p) == 0)  # 8 pairs at the standard sizes
        out.append((mk("loss", pairs=pairs), ("triton", "liger")))
    return out


def preset_cases(preset: str, quick: bool) -> list[tuple[Case, tuple[str, ...]]]:
    """(case, implementation names) of a preset. Unavailable implementations become skipped rows."""
    if preset == "cpu":
        def c(op, n, v, dtype, pairs=4, **kw):
            return Case(op=op, n=n, h=256, v=v, dtype=dtype, head="cpu-h256", pairs=pairs, **kw)
        if quick:
            return [(c("loss", 256, 4000, "float32"), CPU_IMPLS)]
        cases = []
        for dtype in ("float32", "bfloat16"):
            cases += [(c("loss", 256, 32000, dtype), CPU_IMPLS), (c("loss", 128, 152064, dtype, pairs=2), CPU_IMPLS)]
        cases.append((c("logprobs", 512, 32000, "float32", frozen=True), ("torch", "eager", "compile")))
        return cases
    if preset == "h100":
        bf = "bfloat16"
        if quick:
            return standard_cases()
        cases = [(_head("llama3-8b", "logprobs", n, bf), GPU_LOGPROB_IMPLS) for n in (2048, 4096, 8192, 16384, 32768)]
        cases += [(_head("qwen3.5-cce", "logprobs", 16384, bf), GPU_LOGPROB_IMPLS)]
        cases += [(_head("llama3-8b", "loss", n, bf), ALL) for n in (2048, 8192, 16384, 32768)]
        cases += [(_head("llama2-13b", "loss", n, bf), ALL) for n in (4096, 16384, 32768)]
        cases += [(_head("gemma2-2b", "loss", n, bf), ALL) for n in (4096, 8192, 16384)]
        cases += [(_head("llama3-8b", "loss", 8192, "float16"), ("triton", "triton-filtered", "eager", "liger"))]
        return cases
    raise ValueError(f"preset: expected 'cpu' or 'h100', got {preset!r}")


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------


def _zero_grads(inputs: dict) -> None:
    for t in grad_leaves(inputs).values():
        t.grad = None


def make_runner(case: Case, impl_name: str, device: torch.device, inputs: dict):
    """``run() -> value``: one forward+backward of an implementation on ``inputs`` (grads reset first)."""
    step = IMPLS[impl_name].build(case, device)

    def run():
        _zero_grads(inputs)
        value, objective = step(inputs)
        objective.backward()
        return value

    return run


def collect_outputs(value: torch.Tensor, inputs: dict) -> dict:
    """The value and the gradients of the run that just finished (copies), for the guard."""
    outputs = {"value": value.detach().clone()}
    outputs.update({k: (None if t.grad is None else t.grad.detach().clone()) for k, t in grad_leaves(inputs).items()})
    return outputs


def _failure(exc: BaseException) -> dict:
    status = "OOM" if harness.is_oom(exc) else "error"
    return {"status": status, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def measure(case: Case, impl_name: str, device: torch.device, *, reps: int, seed: int,
            inputs: dict | None = None, warmup: int | None = None) -> tuple[dict, dict | None]:
    """Peak memory and time of one implementation on one case -> (row, outputs for the guard).

    ``warmup`` runs (default: the implementation's), then one run under :class:`harness.PeakMemory`
    whose outputs are returned, then ``reps`` timed runs (none when ``reps == 0``: the CPU preset
    times all implementations of a case interleaved in another process, :func:`time_interleaved`).
    """
    impl = IMPLS[impl_name]
    reason = impl.unavailable(case, device)
    if reason:
        return {"status": "skipped", "error": reason}, None
    inputs = make_inputs(case, device, seed) if inputs is None else inputs
    try:
        run = make_runner(case, impl_name, device, inputs)
        # CPU: the entry level is the RSS before the warm-up, so that what the (default) allocator
        # keeps resident from the warm-up, and the measured run reuses, counts as this run's memory.
        harness.free_device_memory(device)
        base = harness.current_rss_bytes() if device.type == "cpu" else None
        for _ in range(impl.warmup if warmup is None else warmup):
            run()
        _zero_grads(inputs)
        harness.free_device_memory(device)
        with harness.PeakMemory(device, base_bytes=base) as pm:
            value = run()
        outputs = collect_outputs(value, inputs)
        timing = harness.time_ms(run, device, reps=reps, warmup=0) if reps > 0 else {}
    except Exception as exc:  # OOM and every other failure is a result
        _zero_grads(inputs)
        harness.free_device_memory(device)
        return _failure(exc), None
    _zero_grads(inputs)
    row = {"status": "ok", "extra_bytes": pm.extra_bytes, "grad_bytes": grad_bytes(inputs),
           "loss": float(value.detach().float().sum()), **timing}
    return row, outputs


def time_interleaved(case: Case, names: list[str], device: torch.device, *, reps: int, seed: int) -> dict[str, dict]:
    """Every implementation of a case timed in one process, interleaved: after each one's warm-up,
    rep r runs them all in turn (the order rotating each rep), so a change in the machine's load
    hits all of them alike; medians per implementation (``harness.time_interleaved``). Each
    implementation gets its own copy of the inputs (same values): state one leaves on its tensors
    (e.g. dynamo's dimension marks, which made torch.compile recompile) cannot reach another."""
    runs, out, per_impl = {}, {}, {}
    for n in names:
        try:
            inputs = per_impl[n] = make_inputs(case, device, seed)
            run = make_runner(case, n, device, inputs)
            for _ in range(IMPLS[n].warmup):
                run()
            runs[n] = run
            _zero_grads(inputs)
        except Exception as exc:
            out[n] = _failure(exc)
    try:
        out.update(harness.time_interleaved(runs, device, reps=reps))
    except Exception as exc:
        out.update({n: _failure(exc) for n in runs})
    return out


# ---------------------------------------------------------------------------------------------
# The float64 reference of a case
# ---------------------------------------------------------------------------------------------


def reference_outputs(case: Case, kind: str, device: torch.device, seed: int, method: str = "auto") -> dict:
    """float64 value and gradients on the case's inputs (regenerated from the seed).

    CPU: eager autograd of ``safedpo_kernels.reference`` (materialized logits). GPU: the float64
    logits of real sizes do not fit, so the exact chunked torch path runs in float64 instead (it is
    itself tested against float64 eager in tests/); the real-size check against float64 *eager*
    is :func:`correctness_check`. ``method``: "auto" (as above), "eager" or "chunked".
    """
    from safedpo_kernels import FusedLinearSafeDPOLoss, linear_logprobs
    from safedpo_kernels.reference import reference_fused_safedpo, reference_linear_logprobs

    x = upcast(make_inputs(case, device, seed), torch.float64)
    if method not in ("auto", "eager", "chunked"):
        raise ValueError(f"method: expected 'auto', 'eager' or 'chunked', got {method!r}")
    eager = device.type == "cpu" if method == "auto" else method == "eager"
    old_budget = os.environ.get("SAFEDPO_CHUNK_BUDGET_MB")
    if not eager:
        os.environ["SAFEDPO_CHUNK_BUDGET_MB"] = "2048"  # big float64 chunks: fewer, faster matmuls
    try:
        if case.op == "logprobs":
            fn = reference_linear_logprobs if eager else (lambda h, w, y: linear_logprobs(h, w, y, impl="torch"))
            value = fn(x["hidden"], x["weight"], x["labels"])
            (value * x["g"].to(value.dtype)).sum().backward()
        else:
            flags = (x["chosen_unsafe"], x["rejected_unsafe"]) if kind == "safedpo" else (
                torch.zeros_like(x["chosen_unsafe"]), torch.zeros_like(x["rejected_unsafe"]))
            delta = DELTA if kind == "safedpo" else 0.0
            if eager:
                value, _ = reference_fused_safedpo(x["weight"], x["_input"], x["target"], *flags,
                                                   ref_input=x["ref_input"], ref_weight=x["ref_weight"],
                                                   beta=BETA, delta=delta, ignore_index=IGNORE_INDEX)
            else:
                module = FusedLinearSafeDPOLoss(beta=BETA, delta=delta, ignore_index=IGNORE_INDEX, impl="torch")
                value, _ = module(x["weight"], x["_input"], x["target"], chosen_unsafe=flags[0],
                                  rejected_unsafe=flags[1], ref_input=x["ref_input"], ref_weight=x["ref_weight"])
            value.backward()
    finally:
        if old_budget is None:
            os.environ.pop("SAFEDPO_CHUNK_BUDGET_MB", None)
        else:
            os.environ["SAFEDPO_CHUNK_BUDGET_MB"] = old_budget
    out = {"value": value.detach()}
    out.update({k: t.grad for k, t in grad_leaves(x).items()})
    return out


# ---------------------------------------------------------------------------------------------
# Running a preset
# ---------------------------------------------------------------------------------------------


def _finish_row(row: dict, case: Case, impl_name: str, gemm: dict, env: dict) -> dict:
    impl = IMPLS[impl_name]
    row.update({"case": case.as_dict(), "case_label": case.label(), "impl": impl_name, "impl_label": impl.label,
                "loss_kind": impl.loss_kind, "note": impl.note, "device": env["device_name"],
                "commit": env["commit"], "date": env["date"]})
    if row.get("status") == "ok" and ("median_ms" in row or "cpu_median_ms" in row):
        row.update(rates(case, impl_name, harness.rate_ms(row), gemm))
    return row


def rates(case: Case, impl_name: str, ms: float, gemm: dict) -> dict:
    """TFLOP/s and % of the measured GEMM rate, at the implementation's own cost-model FLOPs and at
    the eager (materialized) FLOPs of the same work (6NHV; 4NHV frozen head; +2NHV reference head):
    the second is comparable across implementations ("useful work per second")."""
    flops = IMPLS[impl_name].flops(case)
    useful = cost_flops(case, recompute=False)
    out = {"flops": flops, "useful_flops": useful, "tflops": flops / (ms * 1e-3) / 1e12,
           "useful_tflops": useful / (ms * 1e-3) / 1e12}
    rate = gemm.get("tflops")
    out["pct_gemm"] = 100 * out["tflops"] / rate if rate else None
    out["pct_gemm_useful"] = 100 * out["useful_tflops"] / rate if rate else None
    return out


def run_cases(cases, device: torch.device, *, reps: int, seed: int, env: dict, gemm: dict,
              budget_s: float | None = None, impl_filter: set[str] | None = None, check: bool = True,
              threads: int | None = None, in_process: bool | None = None,
              worker_env: dict | None = None) -> list[dict]:
    """Every (case, implementation). CPU: a fresh worker process per implementation for its peak memory
    and outputs, then one worker that times all of the case's implementations interleaved
    (:func:`time_interleaved`). GPU: in-process, one implementation after the other (``in_process``
    overrides: the tests run the GPU branch on the CPU). ``worker_env``: extra environment of the
    CPU workers (e.g. ``MALLOC_MMAP_THRESHOLD_``)."""
    if in_process is None:
        in_process = device.type != "cpu"
    rows: list[dict] = []
    start = time.monotonic()
    for case, impl_names in cases:
        names = [n for n in impl_names if impl_filter is None or n in impl_filter]
        if not names:
            continue
        over = budget_s is not None and time.monotonic() - start > budget_s
        print(f"[loss] {case.label()}: {', '.join(names)}", file=sys.stderr, flush=True)
        refs: dict[str, dict] = {}
        results: dict[str, tuple[dict, dict | None]] = {}
        if over:
            results = {n: ({"status": "skipped", "error": f"time budget of {budget_s:.0f} s spent"}, None) for n in names}
        elif not in_process:
            with tempfile.TemporaryDirectory() as tmp:
                runnable = []
                for n in names:
                    reason = IMPLS[n].unavailable(case, device)
                    if reason:
                        results[n] = ({"status": "skipped", "error": reason}, None)
                        continue
                    save = str(Path(tmp) / f"{n}.pt")
                    spec = {"mode": "memory", "case": case.as_dict(), "impl": n, "reps": 0, "seed": seed,
                            "save": save, "threads": threads}
                    row = harness.run_worker("benchmarks.loss", spec, env=worker_env)
                    out = torch.load(save, weights_only=True) if row.get("status") == "ok" and check else None
                    results[n] = (row, out)
                    if row.get("status") == "ok":
                        runnable.append(n)
                    print(f"[loss]   {n} memory: {row.get('status')} {row.get('extra_bytes', '')}", file=sys.stderr,
                          flush=True)
                if runnable and reps > 0:
                    spec = {"mode": "time", "case": case.as_dict(), "impls": runnable, "reps": reps, "seed": seed,
                            "threads": threads}
                    timed = harness.run_worker("benchmarks.loss", spec, env=worker_env)
                    for n in runnable:
                        t = timed.get("timings", {}).get(n) or {"status": timed.get("status", "error"),
                                                                "error": timed.get("error", "no timing")}
                        if t.get("status", "ok") != "ok":
                            results[n] = ({**results[n][0], **t}, results[n][1])
                        else:
                            results[n][0].update(t)
                        print(f"[loss]   {n} time: {results[n][0].get('median_ms', '')}", file=sys.stderr, flush=True)
        else:
            try:
                inputs = make_inputs(case, device, seed)
            except Exception as exc:
                status = "OOM" if harness.is_oom(exc) else "error"
                results = {n: ({"status": status, "error": f"inputs: {type(exc).__name__}: {exc}"[:200]}, None) for n in names}
                inputs = None
            if inputs is not None:
                for n in names:
                    results[n] = measure(case, n, device, reps=reps, seed=seed, inputs=inputs)
                    print(f"[loss]   {n}: {results[n][0].get('status')} {results[n][0].get('median_ms', '')}",
                          file=sys.stderr, flush=True)
                del inputs
            harness.free_device_memory(device)
        for n in names:
            row, out = results[n]
            if out is not None and check:
                kind = IMPLS[n].loss_kind if case.op == "loss" else "logprobs"
                if kind not in refs:
                    try:
                        refs[kind] = {k: (None if v is None else v) for k, v in
                                      reference_outputs(case, kind, device, seed).items()}
                    except Exception as exc:
                        refs[kind] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                    harness.free_device_memory(device)
                ref = refs[kind]
                if "error" in ref:
                    row["check"] = {"ok": False, "errors": {}, "max_err": float("nan"), "tol": None,
                                    "error": "reference failed: " + ref["error"]}
                else:
                    row["check"] = harness.check_outputs({k: out.get(k) for k in ref}, ref, case.torch_dtype)
            rows.append(_finish_row(row, case, n, gemm, env))
        del refs, results
        harness.free_device_memory(device)
    return rows


def worker(spec: dict) -> dict:
    """In this fresh process: mode "memory" (one implementation, outputs saved to spec['save']) or
    "time" (every implementation in spec['impls'], interleaved)."""
    case = Case(**spec["case"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("mode") == "time":
        return {"status": "ok", "timings": time_interleaved(case, spec["impls"], torch.device("cpu"),
                                                             reps=spec["reps"], seed=spec["seed"])}
    row, out = measure(case, spec["impl"], torch.device("cpu"), reps=spec["reps"], seed=spec["seed"])
    if out is not None and spec.get("save"):
        torch.save(out, spec["save"])
    return row


# ---------------------------------------------------------------------------------------------
# Real-size correctness check (GPU quick mode)
# ---------------------------------------------------------------------------------------------


def correctness_check(device: torch.device, seed: int, n: int = 4096, head: str = "llama3-8b",
                      shape: tuple[int, int] | None = None) -> list[dict]:
    """linear_logprobs in bf16 / fp16 / fp32 at a real head size against float64 eager autograd.

    An implementation passes when its relative error against float64 is at most the same-dtype
    eager path's error plus TOLERANCE[float32] (the low-precision rule of docs/STYLE: no worse
    than what users run today), or below TOLERANCE[float32] outright. ``shape`` = (H, V)
    overrides the head's (the tests run it small on the CPU).
    """
    from safedpo_kernels.reference import reference_linear_logprobs

    rows = []
    for dtype, n_tok in (("bfloat16", n), ("float16", n), ("float32", n // 2)):
        case = _head(head, "logprobs", n_tok, dtype) if shape is None else Case(
            op="logprobs", n=n_tok, h=shape[0], v=shape[1], dtype=dtype, head=head)
        print(f"[correctness] {case.label()}", file=sys.stderr, flush=True)
        try:
            x64 = upcast(make_inputs(case, device, seed), torch.float64)
            value = reference_linear_logprobs(x64["hidden"], x64["weight"], x64["labels"])
            (value * x64["g"].double()).sum().backward()
            ref = {"value": value.detach(), "grad_hidden": x64["hidden"].grad, "grad_weight": x64["weight"].grad}
            del x64, value
            harness.free_device_memory(device)
        except Exception as exc:
            rows.append({"case_label": case.label(), "impl": "float64 reference",
                         "status": "OOM" if harness.is_oom(exc) else "error", "error": str(exc)[:200]})
            harness.free_device_memory(device)
            continue
        inputs = make_inputs(case, device, seed)
        errs = {}
        for name in ("eager", "triton", "triton-filtered", "torch", "cce"):
            impl = IMPLS[name]
            reason = impl.unavailable(case, device)
            if reason:
                rows.append({"case_label": case.label(), "impl": name, "status": "skipped", "error": reason})
                continue
            try:
                _zero_grads(inputs)
                value, objective = impl.build(case, device)(inputs)
                objective.backward()
                out = {"value": value.detach(), "grad_hidden": inputs["hidden"].grad,
                       "grad_weight": inputs["weight"].grad}
                errs[name] = {k: harness.rel_err(out[k], ref[k]) for k in ref}
                rows.append({"case_label": case.label(), "impl": name, "status": "ok", "errors": errs[name]})
            except Exception as exc:
                rows.append({"case_label": case.label(), "impl": name,
                             "status": "OOM" if harness.is_oom(exc) else "error", "error": str(exc)[:200]})
            _zero_grads(inputs)
            harness.free_device_memory(device)
        base = harness.TOLERANCE[torch.float32]
        for r in rows:
            if r["case_label"] == case.label() and r.get("status") == "ok":
                allowed = {k: max(base, errs.get("eager", {}).get(k, 0.0) + base) for k in r["errors"]}
                r["allowed"] = allowed
                r["ok"] = all(r["errors"][k] <= allowed[k] for k in allowed)
        del inputs, ref
        harness.free_device_memory(device)
    return rows


def correctness_markdown(rows: list[dict]) -> str:
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r["case_label"], r["impl"], r.get("status"), "-", "-", "-", r.get("error", "")[:90]])
            continue
        e = r["errors"]
        table.append([r["case_label"], r["impl"], "ok" if r["ok"] else "**FAIL**", harness.fmt_err(e["value"]),
                      harness.fmt_err(e["grad_hidden"]), harness.fmt_err(e["grad_weight"]), ""])
    return harness.markdown_table(
        ["case", "impl", "verdict", "rel err logp", "rel err grad_hidden", "rel err grad_weight", "note"], table)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _verdict(row: dict) -> str:
    chk = row.get("check")
    if chk is None:
        return "-"
    return "ok" if chk.get("ok") else "**MISMATCH**"


def markdown_report(rows: list[dict], env: dict, gemm: dict, args: argparse.Namespace) -> str:
    cpu = env["device"] == "cpu"
    headers = ["case", "implementation", "median ms"] + (["CPU ms"] if cpu else []) + [
        "TFLOP/s", "% GEMM", "% GEMM at eager FLOPs", "peak extra MiB", "extra - grads MiB", "max rel err", "guard",
        "note"]
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r["case_label"], r["impl_label"], f"**{r['status']}**"] + (["-"] if cpu else []) +
                         ["-"] * 7 + [r.get("error", "")[:120]])
            continue
        chk = r.get("check") or {}
        table.append([
            r["case_label"], r["impl_label"], harness.fmt(r["median_ms"], 1)] +
            ([harness.fmt(r.get("cpu_median_ms"), 1)] if cpu else []) + [
            harness.fmt(r.get("tflops"), 3 if cpu else 1), harness.fmt(r.get("pct_gemm"), 1),
            harness.fmt(r.get("pct_gemm_useful"), 1),
            harness.fmt(r["extra_bytes"] / harness.MiB, 1),
            harness.fmt((r["extra_bytes"] - r["grad_bytes"]) / harness.MiB, 1),
            harness.fmt_err(chk.get("max_err")), _verdict(r), r.get("note", "")])
    in_rows = [n for n in IMPLS if any(r["impl"] == n for r in rows)]
    skipped = sorted({(IMPLS[n].label, IMPLS[n].unavailable(Case("loss", 16, 8, 8, "float32", pairs=1),
                                                             torch.device(env["device"])))
                      for n in in_rows} - {(IMPLS[n].label, None) for n in in_rows}, key=str)
    lines = [
        f"# SafeDPO loss benchmark: preset `{args.preset}`{' (quick)' if args.quick else ''}",
        "",
        f"- device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; {env['date']}",
        f"- command: `{env['command']}`",
        f"- measured GEMM rate of this device in this run: {gemm.get('tflops', float('nan')):.2f} TFLOP/s "
        f"({gemm.get('dtype')} {gemm.get('size')}^3; the % GEMM of other dtypes is relative to it and can exceed "
        f"100%); load average at start {env['loadavg']}",
        f"- time: median of {args.reps} reps after warm-up ({'CUDA events' if not cpu else 'perf_counter; CPU ms = process CPU time, all threads'}); "
        f"peak extra: {'max_memory_allocated above the inputs' if not cpu else 'peak RSS (VmHWM) above the inputs, fresh process per case'}, "
        "gradient outputs included (next column: without them)",
        f"- TFLOP/s{' (from the CPU time, as the GEMM rate; wall time here mostly measures other jobs)' if cpu else ''} at cost-model FLOPs over the N loss tokens (ignored prompt tokens not counted): "
        "8NHV for recomputing implementations (ours, CCE), 6NHV for materializing ones (eager, compile, Liger), "
        "+2NHV for the reference head's forward in `loss` cases",
        "- guard: loss (or log-probs) and gradients vs float64 on the same inputs "
        f"({'eager autograd' if cpu else 'exact chunked path in float64'}), relative Frobenius error; tolerance "
        "fp32 1e-4, fp16 5e-3, bf16 3e-2. Liger computes plain DPO (no T(D), no margin) and is compared with "
        "plain DPO on the same pairs",
        "- same work for every implementation: `loss` cases have no prompt positions (every position carries a "
        "loss, as after compacting the batch), so every implementation computes the same N tokens of logits "
        "(`+prompt` cases: the first T/8 positions are ignored; ours drops them, the others compute and mask them); "
        "flags cycle safe/safe, unsafe/safe (swap), safe/unsafe (margin), unsafe/unsafe (drop); "
        f"beta={BETA}, delta={DELTA}",
    ]
    if cpu:
        lines.insert(4, "- CPU memory: glibc's default allocator" + (
            f" with {args.worker_env}" if getattr(args, "worker_env", None) else " (no MALLOC_* tuning: what users get)")
            + "; entry level = RSS before the warm-up runs, so memory the allocator keeps from them counts; "
            "time: all implementations of a case timed in one process, interleaved rep by rep (ratios side by "
            "side), memory and outputs from a fresh process per implementation")
        lines.insert(4, f"- machine: {env['device_name']}, {os.cpu_count()} cores; load average at start "
                        f"{env['loadavg']} (shared machine)")
    for label, reason in skipped:
        lines.append(f"- not run here: {label}: {reason}")
    lines += ["", harness.markdown_table(headers, table), ""]
    return "\n".join(lines)


def _parse(argv):
    parser = argparse.ArgumentParser(description="SafeDPO loss benchmark (see module docstring)")
    parser.add_argument("--preset", choices=["cpu", "h100"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="a handful of the most telling cases (GPU: < 4 min)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per case (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impls", help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip remaining cases after this many seconds (quick GPU default: 150)")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 correctness guard")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads per worker (and for the GEMM rate); --threads 1 is far less "
                             "disturbed by other processes on a shared machine")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="CPU: run the workers with MALLOC_MMAP_THRESHOLD_=BYTES (live buffers only; "
                             "default: glibc's defaults, what users get)")
    parser.add_argument("--dry-run", action="store_true", help="list cases and implementation availability, run nothing")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def dry_run(cases, device: torch.device) -> list[dict]:
    """What a preset would run here: (case, impl, available or the reason)."""
    plan = []
    for case, names in cases:
        for n in names:
            plan.append({"case": case.label(), "impl": n, "skip": IMPLS[n].unavailable(case, device),
                         "flops": IMPLS[n].flops(case)})
    return plan


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        try:
            result = worker(json.loads(args.worker))
        except Exception as exc:
            result = {"status": "OOM" if harness.is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"}
        harness.emit_result(result)
        return 0
    if args.reps < 1:
        raise SystemExit("--reps: expected >= 1")
    impl_filter = None
    if args.impls:
        impl_filter = set(args.impls.split(","))
        unknown = impl_filter - set(ALL)
        if unknown:
            raise SystemExit(f"--impls: unknown {sorted(unknown)}; expected a subset of {ALL}")
    device = torch.device("cuda" if args.preset != "cpu" and torch.cuda.is_available() else "cpu")
    cases = preset_cases(args.preset, args.quick)
    if args.dry_run:
        for p in dry_run(cases, device):
            print(f"{p['case']:60s} {p['impl']:16s} {'run' if p['skip'] is None else 'skip: ' + p['skip']}")
        return 0
    if args.preset != "cpu" and device.type != "cuda":
        # Its shapes (up to 32K tokens x 256K vocab) would run for hours or exhaust host memory here.
        raise SystemExit(f"--preset {args.preset}: needs a CUDA device (none found); "
                         "use --dry-run to list its cases, or --preset cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads: expected >= 1")
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    gemm = harness.gemm_tflops(device)
    print(f"[loss] {env['device_name']}: GEMM {gemm['tflops']:.2f} TFLOP/s ({gemm['dtype']})", file=sys.stderr)
    budget = args.budget_s if args.budget_s is not None else (150.0 if args.quick and device.type == "cuda" else None)
    out = harness.results_dir(args.out, device)
    sections = []
    payload: dict = {"env": env, "gemm": gemm, "args": vars(args)}
    if args.quick and device.type == "cuda":
        corr = correctness_check(device, args.seed)
        payload["correctness"] = corr
        md = "# linear_logprobs correctness at real size vs float64 eager autograd\n\n" + correctness_markdown(corr) + "\n"
        (out / "correctness.md").write_text(md)
        sections.append(md)
        print(md)
    args.worker_env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else None
    rows = run_cases(cases, device, reps=args.reps, seed=args.seed, env=env, gemm=gemm, budget_s=budget,
                     impl_filter=impl_filter, check=not args.no_check, threads=args.threads,
                     worker_env=args.worker_env)
    payload["rows"] = rows
    report = markdown_report(rows, env, gemm, args)
    (out / "loss.md").write_text(report + ("\n" + sections[0] if sections else ""))
    harness.write_json(out / "loss.json", payload)
    print(report)
    if not args.no_plots:
        try:
            from benchmarks.plots import plot_loss_rows

            for path in plot_loss_rows(rows, out):
                print(f"plot: {path}")
        except ImportError as exc:
            print(f"[loss] plots skipped: {exc}", file=sys.stderr)
    print(f"written: {out}/loss.md, loss.json")
    # The exit code reflects our implementations; other packages' mismatches are flagged in the tables.
    ours = {"triton", "triton-filtered", "torch"}
    bad = [r for r in rows if r.get("impl") in ours and r.get("check") and not r["check"].get("ok")]
    bad += [r for r in payload.get("correctness", [])
            if r.get("impl") in ours and r.get("status") == "ok" and not r.get("ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
