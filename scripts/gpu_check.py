"""The one GPU command: every implementation at both standard shapes, timed, measured and checked,
within a hard time budget, results written as each row finishes.

    python scripts/gpu_check.py                                   # on the GPU (default budget 180 s)
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check     # CPU, Triton interpreter, tiny shapes

The plan is ``benchmarks.loss.standard_cases()`` (the same as ``python -m benchmarks.loss --preset
h100 --quick``), bf16, at N=16384, H=2048, V=248320 and N=16384, H=4096, V=128256: the log-prob op
(LM-like logits) for every kernel variant, filtered, deterministic, our torch path, eager,
torch.compile and Cut Cross-Entropy; the frozen-head op for ours and eager; the SafeDPO loss vs
Liger's DPO loss on the same pairs. Inputs are generated on the device. Per row:

* forward+backward time (median of ``--reps`` CUDA-event timings after one warm-up) and peak
  memory above the inputs (``max_memory_allocated``), both from ``benchmarks.loss.measure``;
* TFLOP/s and % of this card's bf16 GEMM rate (8192^3, measured first) at the row's own cost-model
  FLOPs and at the eager-equivalent FLOPs of the same work (6NHV; 4NHV frozen; +2NHV reference head);
* relative error against a float64 reference on a ``--slice``-token case of the same head (same
  weight), next to eager bf16's error on it. Our exact rows PASS when every error is at most
  1.25 x eager's + eps(bf16)/8 + 4 eps(fp32) (the test-suite's rule); deterministic rows must also
  be bit-identical across two runs. Filtered rows and other packages are reported, not judged.

Rows run in priority order (our default kernels first, torch.compile last) until the budget would
be exceeded; a watchdog ends the process at the budget, after writing what it has. Output:
``--out/<card>-<date>/gpu_check.{json,md,png}``, rewritten after every row. Exit status: 0 PASS;
1 FAIL (one of our rows failed a check, errored or ran out of memory); 2 INCOMPLETE (a row did not
run: budget, missing wheel; the summary never says PASS then). Liger / Cut Cross-Entropy come from
the wheels ``../shared/gpu/prepare_wheels.sh`` puts in ``.whl/`` (see docs/benchmarks.md for the
exact command); without them their rows say why and the run is INCOMPLETE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

T0 = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
#: Our shipped paths: they must match the float64 reference within the eager bound (the kernel
#: variants and filtered rows are measured and their errors reported, not judged: they are candidates).
EXACT = ("triton", "triton-deterministic", "torch", "triton[default]")
#: Seconds a row's first call may spend compiling, for the budget estimate.
JIT_SECONDS = {"compile": 60.0, "liger": 30.0, "cce": 15.0, "torch": 2.0, "eager": 1.0}
#: --dry-run: one tiny head (sizes not multiples of the interpreter's blocks); ``--shapes`` adds more.
DRY_SHAPES = ((("tiny", 40, 100), 16),)
STATUS_EXIT = {"PASS": 0, "FAIL": 1, "INCOMPLETE": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The one GPU run of issue 18 (see the module docstring).")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="parent folder; files go to <out>/<card>-<date>/ (default benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=180.0, help="hard limit of this process's run time (s)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row, median reported (default 3; 1 in --dry-run)")
    p.add_argument("--slice", type=int, default=1024, help="tokens of the float64 correctness slice")
    p.add_argument("--shapes", default=None,
                   help="comma-separated HEAD:N or NAME:H:V:N (default: the two standard shapes)")
    p.add_argument("--rows", default=None, help="comma-separated implementation names to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, TRITON_INTERPRET=1, tiny shapes, torch.compile backend 'eager': every row's code path")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.dry_run else 3
    if args.reps < 1 or args.slice < 2 or args.budget_s <= 0:
        p.error("--reps >= 1, --slice >= 2 and --budget-s > 0 expected")
    args.shape_list = _shapes(p, args.shapes) if args.shapes else None
    return args


def _shapes(p: argparse.ArgumentParser, text: str) -> list:
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            if len(parts) == 2:
                out.append((parts[0], int(parts[1])))
            elif len(parts) == 4:
                out.append(((parts[0], int(parts[1]), int(parts[2])), int(parts[3])))
            else:
                raise ValueError
        except ValueError:
            p.error(f"--shapes: expected HEAD:N or NAME:H:V:N items, got {item!r}")
    return out


def priority(case, impl: str) -> int:
    """Run order: our default kernels, the baselines, peers, the other variants, torch.compile last."""
    if case.op == "loss":
        return 3
    if case.frozen:
        return 4
    return {"triton": 0, "eager": 1, "cce": 2, "triton-filtered": 5, "triton-deterministic": 5, "torch": 6,
            "compile": 7}.get(impl, 0)


# ------------------------------------------------------------------------------------------------
# One run: rows, files, verdict
# ------------------------------------------------------------------------------------------------


class Run:
    """The rows so far and the files they are written to (after every row, and by the watchdog)."""

    def __init__(self, args, device, env: dict, gemm: dict):
        from benchmarks import harness

        self.args, self.device, self.env, self.gemm = args, device, env, gemm
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.kernels: list[dict] = []
        self.planned: list[tuple[str, str]] = []  # (case label, impl) of every row the run owes
        self.cut_off = False
        self.current = None
        self.lock = threading.Lock()
        slug = "cpu-dry-run" if args.dry_run else harness.device_slug(device)
        self.dir = Path(args.out) / f"{slug}-{harness.today()}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def verdict(self) -> tuple[str, list[str]]:
        """PASS / FAIL / INCOMPLETE and why."""
        fail, incomplete, noted = [], [], []
        for r in self.rows:
            name = f"{r['case_label']} / {r['impl']}"
            ours = r["impl"] in EXACT
            if r["status"] in ("error", "OOM") and ours:
                fail.append(f"{name}: {r['status']} {r.get('error', '')[:80]}")
            elif r["status"] == "error":
                incomplete.append(f"{name}: error {r.get('error', '')[:80]}")
            elif r["status"] in ("skipped", "budget") and not r.get("allowed_skip"):
                incomplete.append(f"{name}: {r['status']}: {r.get('error', '')[:80]}")
            elif r["status"] == "skipped":
                noted.append(f"not run in the dry run: {name}: {r.get('error', '')[:80]}")
            if r.get("check", {}).get("verdict") == "FAIL":
                fail.append(f"{name}: {r['check'].get('why', 'error above the eager bound')}")
        fail += [f"kernel {k['name']}: {k['n_spills']} spilled registers on the card" for k in self.kernels
                 if k.get("n_spills")]
        done = {(r["case_label"], r["impl"]) for r in self.rows}
        missing = [p for p in getattr(self, "planned", []) if p not in done]
        if missing:
            incomplete.append(f"{len(missing)} planned rows never ran, e.g. {' / '.join(missing[0])}")
        if getattr(self, "cut_off", False):
            incomplete.append("cut off by the budget watchdog")
        if fail:
            return "FAIL", fail + incomplete
        return ("INCOMPLETE", incomplete) if incomplete else ("PASS", noted)

    def write(self, final: bool = False) -> None:
        with self.lock:
            status, why = self.verdict()
            payload = {"env": self.env, "gemm": self.gemm, "args": {k: str(v) for k, v in vars(self.args).items()},
                       "elapsed_s": round(self.elapsed(), 1), "final": final, "status": status, "why": why,
                       "notes": self.notes, "rows": self.rows, "kernels": self.kernels}
            (self.dir / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
            (self.dir / "gpu_check.md").write_text(markdown(payload))
            if final:
                try:
                    plot(self.rows, self.dir / "gpu_check.png", self.env)
                except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the results
                    self.notes.append(f"plot failed: {type(exc).__name__}: {exc}")


def markdown(payload: dict) -> str:
    from benchmarks import harness

    env, gemm = payload["env"], payload["gemm"]
    head = [
        f"# gpu_check: {env['device_name']}",
        "",
        f"- **{payload['status']}**" + ("" if payload["final"] else " (so far: run in progress or cut off)")
        + "".join(f"\n  - {w}" for w in payload["why"]),
        f"- torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}; "
        f"{payload['elapsed_s']} s of the {payload['args']['budget_s']} s budget",
        f"- command: `{env['command']}`",
        f"- measured {gemm.get('dtype')} GEMM rate ({gemm.get('size')}^3): {gemm.get('tflops', float('nan')):.4g} TFLOP/s",
        "- time: median fwd+bwd; peak extra: above the inputs, gradient outputs included (fused rows: the "
        "float32 grad-weight accumulator too); % GEMM: at the row's cost-model FLOPs / at the eager FLOPs of the "
        "same work (6NHV, frozen 4NHV, +2NHV reference head in `loss`)",
        "- slice errors: relative L2 vs float64 on a slice case of the same head; bound = 1.25 x eager bf16's "
        "error + eps(bf16)/8 + 4 eps(fp32), judged for our exact rows only",
    ]
    head += [f"- note: {n}" for n in payload["notes"]]
    table = []
    for r in payload["rows"]:
        chk = r.get("check", {})
        errs = chk.get("errors", {})
        err_txt = " / ".join(harness.fmt_err(errs.get(k)) for k in ("value", "grad_hidden", "grad_input", "grad_weight")
                             if k in errs) or "-"
        table.append([
            r["case_label"], r.get("impl_label", r["impl"]), r["status"],
            harness.fmt(r.get("median_ms"), 1), harness.fmt(r.get("extra_bytes", float("nan")) / harness.MiB, 0),
            harness.fmt(r.get("tflops"), 0), harness.fmt(r.get("pct_gemm"), 0), harness.fmt(r.get("pct_gemm_useful"), 0),
            err_txt, chk.get("verdict", "-"), _note(r),
        ])
    lines = head + ["", harness.markdown_table(
        ["case", "row", "status", "ms", "peak extra MiB", "TFLOP/s", "% GEMM", "% GEMM eager-eq",
         "slice err (logp / grad_h / grad_w)", "verdict", "note"], table), ""]
    if payload["kernels"]:
        lines += ["## Our kernels as loaded on the card (Triton's CompiledKernel)", "",
                  harness.markdown_table(["kernel", "registers", "spilled registers", "shared bytes"],
                                         [[k["name"], k["n_regs"], k["n_spills"], k["shared"]] for k in payload["kernels"]]),
                  ""]
    lines += goals(payload["rows"])
    return "\n".join(lines) + "\n"


def _note(r: dict) -> str:
    parts = [r.get("error") or r.get("check", {}).get("why") or ""]
    if r.get("skipped_fraction") is not None and r.get("filters"):
        parts.append(f"filtering skipped {100 * r['skipped_fraction']:.1f}% of backward tiles")
    if r.get("frozen_head_kernel"):
        parts.append("frozen-head kernel ran")
    parts.append(r.get("note") or "")
    return "; ".join(p for p in parts if p)[:160]


def goals(rows: list[dict]) -> list[str]:
    """The issue-18 goals, read off the rows (MISS is information, not a check failure)."""
    ok = [r for r in rows if r["status"] == "ok"]

    def best(pred):
        cands = [r for r in ok if pred(r)]
        return min(cands, key=lambda r: r["median_ms"]) if cands else None

    out = ["## Goals (issue 18)", ""]
    a = lambda r: r["case"]["v"] == 248320 and r["case"]["op"] == "logprobs" and not r["case"]["frozen"]  # noqa: E731
    ours = best(lambda r: a(r) and (r["impl"] == "triton" or r["impl"].startswith("triton[")))
    cce = best(lambda r: a(r) and r["impl"] == "cce")
    if ours:
        line = f"- V=248320: ours {ours['median_ms']:.1f} ms ({ours['impl']}) vs CCE's published 92.6 ms"
        if cce:
            line += (f", CCE here {cce['median_ms']:.1f} ms; memory ours {ours['extra_bytes'] / 2**20:.0f} MiB vs CCE "
                     f"{cce['extra_bytes'] / 2**20:.0f} MiB")
        out.append(line + (": MET" if ours["median_ms"] < min(92.6, cce["median_ms"] if cce else 92.6) else ": MISSED"))
    lo = best(lambda r: r["case"]["v"] == 248320 and r["case"]["op"] == "loss" and r["impl"] == "triton")
    li = best(lambda r: r["case"]["v"] == 248320 and r["case"]["op"] == "loss" and r["impl"] == "liger")
    if lo and li:
        x = li["median_ms"] / lo["median_ms"]
        out.append(f"- loss on the same pairs: Liger {li['median_ms']:.1f} ms / ours {lo['median_ms']:.1f} ms = "
                   f"{x:.2f}x (goal >= 2x): {'MET' if x >= 2 else 'MISSED'}")
    b = best(lambda r: r["case"]["v"] == 128256 and r["case"]["op"] == "logprobs" and not r["case"]["frozen"]
             and (r["impl"] == "triton" or r["impl"].startswith("triton[")))
    if b and b.get("pct_gemm") is not None:
        acc = b["case"]["v"] * b["case"]["h"] * 4
        mem = b["extra_bytes"] - acc - b.get("grad_bytes", 0)
        out.append(f"- V=128256: {b['pct_gemm']:.0f}% of the GEMM rate at 8NHV (goal >= 60%: "
                   f"{'MET' if b['pct_gemm'] >= 60 else 'MISSED'}); extra memory beyond the gradients and the "
                   f"{acc / 2**20:.0f} MiB fp32 accumulator: {mem / 2**20:.0f} MiB (goal <= 64 MiB: "
                   f"{'MET' if mem <= 64 * 2**20 else 'MISSED'})")
    for r in ok:
        if r["case"]["frozen"] and r["impl"] == "triton" and r.get("pct_gemm") is not None:
            out.append(f"- frozen head {r['case_label']}: {r['pct_gemm']:.0f}% of the GEMM rate at 4NHV "
                       f"(goal >= 70%: {'MET' if r['pct_gemm'] >= 70 else 'MISSED'})")
    return out + [""]


def plot(rows: list[dict], path: Path, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case_label"] for r in rows))
    if not cases:
        return
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 2.2 + 0.35 * max(len(rows) // max(len(cases), 1), 3) * len(cases)),
                             squeeze=False)
    for (ax_t, ax_m), case in zip(axes, cases):
        rs = [r for r in rows if r["case_label"] == case]
        labels = [r["impl"] + ("" if r["status"] == "ok" else f" ({r['status']})") for r in rs]
        ax_t.barh(labels, [r.get("median_ms", 0) if r["status"] == "ok" else 0 for r in rs], color="tab:blue")
        ax_m.barh(labels, [r.get("extra_bytes", 0) / 2**20 if r["status"] == "ok" else 0 for r in rs], color="tab:orange")
        ax_t.set_xlabel("fwd+bwd median ms")
        ax_m.set_xlabel("peak extra MiB")
        ax_t.set_title(case, fontsize=8, loc="left")
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="y", labelsize=7)
            ax.invert_yaxis()
            ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"gpu_check | {env['device_name']} | {env['date']} | commit {env['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


class SliceChecker:
    """Errors of a row against float64 on a small case of the same head, with eager's as the bound."""

    def __init__(self, device, seed: int, n_slice: int):
        self.device, self.seed, self.n_slice = device, seed, n_slice
        self.refs: dict = {}
        self.eager: dict = {}

    def slice_case(self, case):
        if case.op == "loss":
            n = max(2, self.n_slice // 2 * 2)
            return dataclasses.replace(case, n=min(case.n, n), pairs=1)
        return dataclasses.replace(case, n=min(case.n, self.n_slice))

    def _ref(self, sc, kind: str) -> dict:
        from benchmarks import loss

        key = (sc, kind)
        if key not in self.refs:
            method = "eager" if self.device.type == "cpu" else "chunked"
            self.refs[key] = loss.reference_outputs(sc, kind, self.device, self.seed, method=method)
        return self.refs[key]

    def _outputs(self, sc, impl: str) -> dict:
        from benchmarks import loss
        from benchmarks.workload import make_inputs

        inputs = make_inputs(sc, self.device, self.seed)
        run = loss.make_runner(sc, impl, self.device, inputs)
        return loss.collect_outputs(run(), inputs)

    def check(self, case, impl: str, outputs: dict | None = None) -> dict:
        """``outputs``: the measured run's, reused when the slice is the whole case (tiny shapes)."""
        import torch

        from benchmarks import harness
        from benchmarks.loss_impls import IMPLS

        sc = self.slice_case(case)
        kind = IMPLS[impl].loss_kind if case.op == "loss" else "logprobs"
        ref = self._ref(sc, kind)
        out = outputs if outputs is not None and sc == case else self._outputs(sc, impl)
        errors = {k: harness.rel_err(out.get(k), ref[k]) for k in ref}
        if sc not in self.eager:
            eager_ref = self._ref(sc, "safedpo" if case.op == "loss" else "logprobs")
            e_out = self._outputs(sc, "eager")
            self.eager[sc] = {k: harness.rel_err(e_out.get(k), eager_ref[k]) for k in eager_ref}
        slack = torch.finfo(case.torch_dtype).eps / 8 + 4 * torch.finfo(torch.float32).eps
        bound = {k: 1.25 * self.eager[sc].get(k, 0.0) + slack for k in errors}
        within = all(errors[k] <= bound[k] for k in errors)  # nan compares False
        result = {"slice_tokens": sc.n, "errors": errors, "eager_errors": self.eager[sc], "bound": bound}
        if impl == "eager":
            result["verdict"] = "baseline"
        elif impl in EXACT or impl.startswith("triton["):
            judged = impl in EXACT
            result["verdict"] = "PASS" if within else ("FAIL" if judged else "over eager bound (candidate)")
            if not within:
                result["why"] = "slice error above the eager bound: " + ", ".join(
                    f"{k} {errors[k]:.2e} > {bound[k]:.2e}" for k in errors if not errors[k] <= bound[k])
            if IMPLS[impl].deterministic and within:
                again = self._outputs(sc, impl)
                same = all(torch.equal(out[k], again[k]) for k in out if out[k] is not None)
                result["bit_identical"] = same
                if not same:
                    result["verdict"] = "FAIL" if judged else "not bit-identical (candidate)"
                    result["why"] = "deterministic outputs differ between two runs"
        else:
            result["verdict"] = "within eager bound" if within else "over eager bound (not judged)"
        return result


def run_row(run: Run, case, impl: str, inputs: dict, checker: SliceChecker) -> dict:
    from benchmarks import harness, loss, loss_impls

    args, device = run.args, run.device
    t0 = time.monotonic()
    warmup = 0 if args.dry_run else (2 if impl == "compile" else 1)
    row, outputs = loss.measure(case, impl, device, reps=args.reps, seed=args.seed, inputs=inputs, warmup=warmup)
    row = loss._finish_row(row, case, impl, run.gemm, run.env)
    if row["status"] == "skipped" and args.dry_run:
        row["allowed_skip"] = True  # a CUDA-only or absent package: the dry run notes it
    if row["status"] == "ok":
        try:
            row["check"] = checker.check(case, impl, outputs)
        except Exception as exc:  # noqa: BLE001
            row["check"] = {"verdict": "FAIL" if impl in EXACT else "error",
                            "why": f"slice check failed: {type(exc).__name__}: {str(exc)[:150]}"}
            traceback.print_exc()
    stats = loss_impls.LAST_STATS.get(impl)
    if stats is not None and row["status"] == "ok":
        try:
            row["skipped_fraction"] = float(stats.skipped_fraction)
            row["filters"] = not loss_impls.IMPLS[impl].exact
            row["frozen_head_kernel"] = bool(getattr(stats, "frozen_head", False))
        except Exception as exc:  # noqa: BLE001 - stats are extra information
            row["stats_error"] = f"{type(exc).__name__}: {exc}"
    row["row_seconds"] = round(time.monotonic() - t0, 1)
    harness.free_device_memory(device)
    return row


def estimate_s(case, impl: str, args, gemm: dict, first_use: bool) -> float:
    """Seconds a row is expected to take (budget planning): its FLOPs at 30% of the GEMM rate for the
    warm-up, memory run, reps and the slice runs, plus compilation on first use."""
    from benchmarks.loss_impls import IMPLS

    if args.dry_run:
        return 0.0
    rate = (gemm.get("tflops") or 100.0) * 1e12 * 0.3
    runs = 2 + args.reps + (3 if impl == "compile" else 0)
    jit = JIT_SECONDS.get(impl, 8.0) if first_use else 0.0
    return runs * IMPLS[impl].flops(case) / rate + jit + 1.0


def loaded_kernels() -> list[dict]:
    """Registers / spills / shared memory of our Triton kernels as loaded on this card."""
    import importlib
    import pkgutil

    from safedpo_kernels import kernels

    out = []
    for mod_info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"safedpo_kernels.kernels.{mod_info.name}")
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", None)
            if not isinstance(caches, dict) or not name.endswith("_kernel"):
                continue
            for per_device in caches.values():
                kc = per_device[0] if isinstance(per_device, tuple) else per_device
                for compiled in (kc.values() if isinstance(kc, dict) else []):
                    if getattr(compiled, "n_regs", None) is None:
                        continue
                    out.append({"name": f"{mod_info.name}.{name}", "n_regs": compiled.n_regs,
                                "n_spills": compiled.n_spills, "shared": compiled.metadata.shared})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first triton import
        os.environ["SAFEDPO_BENCH_COMPILE_BACKEND"] = "eager"
        os.environ["SAFEDPO_BENCH_INTERPRETER_ROWS"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks import harness, loss
    from benchmarks.loss_impls import IMPLS
    from benchmarks.workload import make_inputs

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU code-path check)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    env = harness.environment(device)
    env["command"] = "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    gemm = harness.gemm_tflops(device, size=256 if args.dry_run else None, reps=3 if args.dry_run else 10)
    run = Run(args, device, env, gemm)
    print(f"[gpu_check] {env['device_name']}: GEMM {gemm['tflops']:.4g} TFLOP/s; writing {run.dir}", flush=True)
    if args.dry_run:
        run.notes.append("dry run: CPU, Triton interpreter, torch.compile backend 'eager', tiny shapes: a code-path "
                         "check; its times and memory mean nothing")

    def deadline():
        with run.lock:
            run.cut_off = True
            run.notes.append(f"watchdog: the {args.budget_s:.0f} s budget ran out during {run.current}; "
                             "the rows below are what had finished")
        run.write(final=True)
        print(f"[gpu_check] budget exhausted during {run.current}; results in {run.dir}", flush=True)
        os._exit(STATUS_EXIT["INCOMPLETE"])

    watchdog = threading.Timer(max(1.0, args.budget_s - run.elapsed()), deadline)
    watchdog.daemon = True
    watchdog.start()

    shapes = args.shape_list or (DRY_SHAPES if args.dry_run else None)
    plan = [(case, impl) for case, names in loss.standard_cases(shapes) for impl in names]
    if args.rows:
        wanted = set(args.rows.split(","))
        unknown = wanted - set(IMPLS)
        if unknown:
            print(f"--rows: unknown {sorted(unknown)}; expected names of {sorted(IMPLS)}", file=sys.stderr)
            return 2
        plan = [(c, i) for c, i in plan if i in wanted]
    plan.sort(key=lambda ci: priority(*ci))  # stable: shapes keep their order within a priority
    run.planned = [(c.label(), i) for c, i in plan]
    checker = SliceChecker(device, args.seed, 16 if args.dry_run else args.slice)
    inputs: dict = {}
    used: set = set()
    for case, impl in plan:
        est = estimate_s(case, impl, args, gemm, impl not in used)
        if run.elapsed() + est > args.budget_s:
            row = loss._finish_row({"status": "budget", "error": f"not started: needs ~{est:.0f} s, "
                                    f"{args.budget_s - run.elapsed():.0f} s left"}, case, impl, gemm, env)
            run.rows.append(row)
            run.write()
            continue
        run.current = f"{case.label()} / {impl}"
        print(f"[gpu_check] {run.elapsed():5.0f} s  {run.current}", flush=True)
        try:
            if case not in inputs:
                inputs[case] = make_inputs(case, device, args.seed)
            row = run_row(run, case, impl, inputs[case], checker)
        except Exception as exc:  # noqa: BLE001 - a row's failure is a result
            traceback.print_exc()
            row = loss._finish_row({"status": "OOM" if harness.is_oom(exc) else "error",
                                    "error": f"{type(exc).__name__}: {str(exc)[:200]}"}, case, impl, gemm, env)
        used.add(impl)
        with run.lock:
            run.rows.append(row)
        run.write()
        print(f"[gpu_check]        -> {row['status']} {harness.fmt(row.get('median_ms'), 1)} ms "
              f"{row.get('check', {}).get('verdict', '')}", flush=True)
    run.current = "the kernel resource read-out"
    if device.type == "cuda":
        try:
            run.kernels = loaded_kernels()
        except Exception as exc:  # noqa: BLE001
            run.notes.append(f"kernel resources not read: {type(exc).__name__}: {exc}")
    watchdog.cancel()
    run.write(final=True)
    status, why = run.verdict()
    print((run.dir / "gpu_check.md").read_text())
    print(f"[gpu_check] {status} in {run.elapsed():.0f} s" + "".join(f"\n  {w}" for w in why), flush=True)
    return STATUS_EXIT[status]


if __name__ == "__main__":
    sys.exit(main())
