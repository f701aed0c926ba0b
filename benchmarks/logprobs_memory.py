"""Peak memory, time and error of ``linear_logprobs`` forward+backward: torch path vs eager logits.

    python -m benchmarks.logprobs_memory                      # N=4096, H=1024, V=32000, float32
    python -m benchmarks.logprobs_memory --preset issue13 --threads 1 --reps 3 --compile
    python -m benchmarks.logprobs_memory --n 1024 --reps 10 --out /tmp/bench

Every case (shape, dtype, mode) runs the same work for every implementation (all tokens are loss
tokens) and measures:

* time, in one worker process that runs the implementations **interleaved** (eager, ours, eager,
  ours, ...) after one warm-up call each, so load from other jobs on a shared machine hits all of
  them alike; medians of wall time and process CPU time, and the median of the per-round ratios;
* peak extra memory, each implementation in its own fresh process with glibc's **default**
  allocator (no ``MALLOC_MMAP_THRESHOLD_``: what users get, heap retention included): peak RSS over
  a first (cold) and a second call minus the RSS once the inputs exist; gradient outputs included;
* error against float64, computed in a separate worker without materializing float64 logits: log-
  probs and grad_hidden for every token, grad_weight on a fixed random subset of vocabulary rows
  (all rows when V <= 4096), each as a relative Frobenius error.

Modes: ``full`` (weight and hidden train; impls eager, torch.compile(eager) with ``--compile``, and
ours) and ``frozen`` (frozen head: only hidden trains; impls eager, compiled eager, ours (the
frozen-head path, chosen automatically) and our recompute path forced). Liger-Kernel has no CPU
path (its kernels are Triton GPU kernels), so it has no CPU row.
Results: ``--out/<device>-<date>/logprobs_memory[_<preset>][_threads<k>].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness
from safedpo_kernels import linear_logprobs
from safedpo_kernels import logprobs as lp
from safedpo_kernels.reference import reference_linear_logprobs

IMPL_LABELS = {
    "eager": "eager (reference_linear_logprobs: materialized logits)",
    "compile": "torch.compile(eager)",
    "torch": "torch chunked (linear_logprobs impl='torch')",
    "recompute": "torch chunked, recompute path forced",
}
MODE_IMPLS = {"full": ("eager", "compile", "torch"), "frozen": ("eager", "compile", "torch", "recompute")}
PRESETS = {
    "issue13": [(4096, 1024, 32000), (2048, 2048, 128256)],
}
GOALS = {"full": {"time": 1.35, "memory": 1 / 8}, "frozen": {"time": 1.1, "memory": 1 / 8, "vs_recompute": 1.3}}
MEMORY_GOAL = GOALS["full"]["memory"]
TIME_GOAL = GOALS["full"]["time"]
WEIGHT_ROWS_CHECKED = 4096


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int, frozen: bool = False, requires_grad: bool = True):
    """hidden (n, h), weight (v, h) with logits of std ~2, labels (n,) in [0, v), upstream grad g (n,)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_(requires_grad)
    weight = torch.randn(v, h, generator=gen).mul_(2.0 / h**0.5).to(dtype).requires_grad_(requires_grad and not frozen)
    labels = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    return hidden, weight, labels, g


def _eager_core(hidden, weight, labels):
    """The eager math without argument checks (what torch.compile traces)."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1)


def make_impl(impl: str):
    """impl name -> function (hidden, weight, labels) -> log-probs."""
    if impl == "eager":
        return reference_linear_logprobs
    if impl == "compile":
        return torch.compile(_eager_core, dynamic=False)
    if impl == "torch":
        return lambda h, w, y: linear_logprobs(h, w, y, impl="torch")
    if impl == "recompute":
        return lambda h, w, y: lp.ChunkedLinearLogprobs.apply(h, w, None, y, lp.HeadOptions())
    raise ValueError(f"impl: expected one of {tuple(IMPL_LABELS)}, got {impl!r}")


def forward_backward(fn, hidden, weight, labels, g) -> torch.Tensor:
    """One forward+backward of ``sum(g * logp)``; returns the detached log-probs."""
    hidden.grad = None
    weight.grad = None
    logp = fn(hidden, weight, labels)
    (logp * g.to(logp.dtype)).sum().backward()
    return logp.detach()


def checked_rows(v: int, seed: int) -> torch.Tensor:
    """The vocabulary rows whose weight gradient is compared with float64 (all when V is small)."""
    if v <= WEIGHT_ROWS_CHECKED:
        return torch.arange(v)
    return torch.randperm(v, generator=torch.Generator().manual_seed(seed + 1))[:WEIGHT_ROWS_CHECKED].sort().values


# ---------------------------------------------------------------------------------------------
# Workers (each in a fresh process)
# ---------------------------------------------------------------------------------------------


def _case_inputs(spec: dict):
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    return make_inputs(spec["n"], spec["h"], spec["v"], getattr(torch, spec["dtype"]), spec["seed"],
                       frozen=spec["mode"] == "frozen")


def memory_worker(spec: dict) -> dict:
    """Peak extra RSS over a cold and a measured call of one implementation (default allocator)."""
    hidden, weight, labels, g = _case_inputs(spec)
    fn = make_impl(spec["impl"])
    device = torch.device("cpu")
    with harness.PeakMemory(device) as pm:
        for _ in range(1):
            forward_backward(fn, hidden, weight, labels, g)
            hidden.grad = weight.grad = None  # each call's outputs are dropped, as a training step does
            gc.collect()
        forward_backward(fn, hidden, weight, labels, g)  # the measured call keeps its gradients
    grad_bytes = hidden.numel() * hidden.element_size()
    if weight.requires_grad:
        grad_bytes += weight.numel() * weight.element_size()
    return {"status": "ok", "extra_bytes": pm.extra_bytes, "grad_bytes": grad_bytes, "exact_peak": pm.exact}


def time_worker(spec: dict) -> dict:
    """Interleaved timing of every implementation of the case; saves each one's outputs."""
    hidden, weight, labels, g = _case_inputs(spec)
    fns = {impl: make_impl(impl) for impl in spec["impls"]}
    rows = checked_rows(spec["v"], spec["seed"])
    result = {}
    for impl, fn in fns.items():  # warm-up (compilation for torch.compile) and the saved outputs
        t0 = time.perf_counter()
        logp = forward_backward(fn, hidden, weight, labels, g)
        out = {"logp": logp, "grad_hidden": hidden.grad}
        if weight.requires_grad:
            out["grad_weight_rows"] = weight.grad[rows].clone()
        torch.save(out, Path(spec["save_dir"]) / f"{impl}.pt")
        result[impl] = {"first_call_s": time.perf_counter() - t0, "wall_ms": [], "cpu_ms": []}
        del out, logp
        hidden.grad = weight.grad = None
    for _ in range(spec["reps"]):
        for impl, fn in fns.items():
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            forward_backward(fn, hidden, weight, labels, g)
            result[impl]["wall_ms"].append((time.perf_counter() - t0) * 1e3)
            result[impl]["cpu_ms"].append((time.process_time() - c0) * 1e3)
            hidden.grad = weight.grad = None
    return {"status": "ok", "impls": result}


def reference_worker(spec: dict) -> dict:
    """float64 log-probs, grad_hidden and grad_weight rows, token chunk by vocabulary block.

    lse and the softmax-weighted row mean sum_v p_v W_v come from float64 tiles (never (N, V)),
    then logp = z_y - lse, grad_hidden = g (W[y] - mean), grad_weight[r] = sum_i g_i (1[y_i=r] - p_ir) h_i.
    """
    hidden, weight, labels, g = _case_inputs(spec)
    h64, g64 = hidden.detach().double(), g.double()
    rows = checked_rows(spec["v"], spec["seed"])
    n, v = h64.shape[0], weight.shape[0]
    block = 4096
    lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    for v0 in range(0, v, block):
        lse = torch.logaddexp(lse, torch.logsumexp(h64 @ weight[v0:v0 + block].double().T, -1))
    w_y = weight[labels].double()
    logp = (h64 * w_y).sum(-1) - lse
    mean = torch.zeros_like(h64)
    for v0 in range(0, v, block):
        w = weight[v0:v0 + block].double()
        mean += torch.exp(h64 @ w.T - lse[:, None]) @ w
    out = {"logp": logp, "grad_hidden": g64[:, None] * (w_y - mean)}
    if spec["mode"] == "full":
        w_r = weight[rows].double()
        grad_z = -torch.exp(h64 @ w_r.T - lse[:, None]) * g64[:, None]
        hit = labels[:, None] == rows[None, :]
        grad_z += hit * g64[:, None]
        out["grad_weight_rows"] = grad_z.T @ h64
    torch.save(out, Path(spec["save_dir"]) / "float64.pt")
    return {"status": "ok"}


WORKERS = {"memory": memory_worker, "time": time_worker, "reference": torch.no_grad()(reference_worker)}


def _run(kind: str, spec: dict) -> dict:
    print(f"[logprobs_memory] {kind} {spec.get('impl', '')} N={spec['n']} H={spec['h']} V={spec['v']} "
          f"{spec['dtype']} {spec['mode']} ...", file=sys.stderr, flush=True)
    res = harness.run_worker("benchmarks.logprobs_memory", {**spec, "kind": kind}, timeout_s=7200)
    print(f"[logprobs_memory] -> {json.dumps(res)[:300]}", file=sys.stderr, flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def run_case(n: int, h: int, v: int, dtype: str, mode: str, args: argparse.Namespace) -> dict:
    """Memory (fresh process each), interleaved time, float64 errors. -> {"rows": {impl: row}, "goals": {}}."""
    impls = [i for i in MODE_IMPLS[mode] if i != "compile" or args.compile]
    base = {"n": n, "h": h, "v": v, "dtype": dtype, "mode": mode, "seed": args.seed, "threads": args.threads}
    rows = {impl: {} for impl in impls}
    for impl in impls:
        rows[impl].update(_run("memory", {**base, "impl": impl}))
    with tempfile.TemporaryDirectory() as tmp:
        timing = _run("time", {**base, "impls": impls, "reps": args.reps, "save_dir": tmp})
        check = not args.no_check
        ref = None
        if check:
            ref_res = _run("reference", {**base, "save_dir": tmp})
            if ref_res.get("status") == "ok":
                ref = torch.load(Path(tmp) / "float64.pt", weights_only=True)
        for impl in impls:
            row = rows[impl]
            if timing.get("status") != "ok":
                row.setdefault("status", timing.get("status"))
                row["error"] = timing.get("error", "")
                continue
            t = timing["impls"][impl]
            row.update({"wall_median_ms": statistics.median(t["wall_ms"]), "cpu_median_ms": statistics.median(t["cpu_ms"]),
                        "wall_ms": t["wall_ms"], "cpu_ms": t["cpu_ms"], "first_call_s": t["first_call_s"],
                        "median_ms": statistics.median(t["wall_ms"])})
            if ref is not None:
                out = torch.load(Path(tmp) / f"{impl}.pt", weights_only=True)
                errs = {k: harness.rel_err(out[k], ref[k]) for k in ref if k in out}
                tol = harness.TOLERANCE[getattr(torch, dtype)]
                row["check"] = {"max_err": max(errs.values()), "errors": errs, "ok": all(e <= tol for e in errs.values())}
    return {"rows": rows, "goals": goals_of(rows, mode, impls)}


def _ratio(rows: dict, a: str, b: str, key: str) -> float:
    """Median over interleaved rounds of a's time / b's time (``key``: wall_ms or cpu_ms)."""
    return statistics.median(x / y for x, y in zip(rows[a][key], rows[b][key]))


def goals_of(rows: dict, mode: str, impls: list[str]) -> dict:
    e, t = rows.get("eager", {}), rows.get("torch", {})
    if e.get("status") != "ok" or t.get("status") != "ok" or "wall_ms" not in t or "wall_ms" not in e:
        return {}
    goal = GOALS[mode]
    mem = t["extra_bytes"] / max(e["extra_bytes"], 1)
    out = {
        "memory_ratio": mem, "memory_goal": goal["memory"], "memory_pass": mem <= goal["memory"],
        "memory_ratio_without_grads": (t["extra_bytes"] - t["grad_bytes"]) / max(e["extra_bytes"] - e["grad_bytes"], 1),
        "time_ratio": _ratio(rows, "torch", "eager", "wall_ms"), "cpu_time_ratio": _ratio(rows, "torch", "eager", "cpu_ms"),
        "time_goal": goal["time"],
    }
    out["time_pass"] = out["time_ratio"] <= goal["time"]
    out["cpu_time_pass"] = out["cpu_time_ratio"] <= goal["time"]
    if "check" in t and "check" in e:
        out["error_no_worse_than_eager"] = {k: t["check"]["errors"][k] <= 1.1 * e["check"]["errors"][k] + 1e-7
                                            for k in t["check"]["errors"]}
    if mode == "frozen" and rows.get("recompute", {}).get("status") == "ok":
        out["recompute_over_ours_wall"] = _ratio(rows, "recompute", "torch", "wall_ms")
        out["recompute_over_ours_cpu"] = _ratio(rows, "recompute", "torch", "cpu_ms")
        out["vs_recompute_goal"] = goal["vs_recompute"]
        out["vs_recompute_pass"] = out["recompute_over_ours_cpu"] >= goal["vs_recompute"]
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def case_table(case: dict) -> list[str]:
    n, h, v, dtype, mode = case["n"], case["h"], case["v"], case["dtype"], case["mode"]
    headers = ["implementation", "wall median (ms)", "CPU median (ms)", "time / eager (wall, CPU)",
               "peak extra (MiB)", "extra / eager", "err logp", "err grad_hidden", "err grad_weight", "guard"]
    table = []
    e = case["rows"].get("eager", {})
    for impl, row in case["rows"].items():
        if row.get("status") != "ok" or "wall_ms" not in row:
            table.append([IMPL_LABELS[impl], row.get("status"), "-", "-", "-", "-", "-", "-", "-", row.get("error", "")[:80]])
            continue
        errs = row.get("check", {}).get("errors", {})
        ratio = "-" if "wall_ms" not in e else f"{_ratio(case['rows'], impl, 'eager', 'wall_ms'):.2f}x, {_ratio(case['rows'], impl, 'eager', 'cpu_ms'):.2f}x"
        table.append([
            IMPL_LABELS[impl], harness.fmt(row["wall_median_ms"], 0), harness.fmt(row["cpu_median_ms"], 0), ratio,
            harness.fmt(row["extra_bytes"] / harness.MiB, 0),
            "-" if e.get("status") != "ok" else f"{row['extra_bytes'] / max(e['extra_bytes'], 1):.3f}",
            harness.fmt_err(errs.get("logp")), harness.fmt_err(errs.get("grad_hidden")),
            harness.fmt_err(errs.get("grad_weight_rows")),
            "-" if "check" not in row else ("ok" if row["check"]["ok"] else "**MISMATCH**"),
        ])
    lines = [f"## N={n}, H={h}, V={v}, {dtype}, {'frozen head (hidden trains)' if mode == 'frozen' else 'weight and hidden train'}",
             "", harness.markdown_table(headers, table), ""]
    g = case["goals"]
    if g:
        verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
        text = (f"Goal (issue 2) and issue 13: time ours/eager {g['time_ratio']:.2f}x wall, {g['cpu_time_ratio']:.2f}x CPU "
                f"(goal <= {g['time_goal']}x: wall {verdict(g['time_pass'])}, CPU {verdict(g['cpu_time_pass'])}); "
                f"memory {g['memory_ratio']:.3f} (goal <= {g['memory_goal']:.3f}: {verdict(g['memory_pass'])}; "
                f"{g['memory_ratio_without_grads']:.3f} without the gradient outputs)")
        if "error_no_worse_than_eager" in g:
            text += "; error no worse than eager (+10%): " + ", ".join(
                f"{k} {verdict(ok)}" for k, ok in g["error_no_worse_than_eager"].items())
        if "recompute_over_ours_cpu" in g:
            text += (f"; recompute path / frozen-head path {g['recompute_over_ours_wall']:.2f}x wall, "
                     f"{g['recompute_over_ours_cpu']:.2f}x CPU (goal >= {g['vs_recompute_goal']}x: "
                     f"{verdict(g['vs_recompute_pass'])})")
        lines += [text + ".", ""]
    return lines


def report(cases: list[dict], args: argparse.Namespace, env: dict) -> str:
    threads = args.threads or torch.get_num_threads()
    lines = [
        "# linear_logprobs forward+backward: torch path vs eager (and torch.compile(eager))",
        "",
        f"- command: `{env['command']}`",
        f"- machine: {env['device_name']}; workers use {threads} torch thread(s); torch {env['torch']}; "
        f"load average at start {env['loadavg']} (a shared machine: other jobs ran on the same cores)",
        f"- commit {env['commit']}, {env['date']}",
        "- time: one process runs the implementations interleaved, one warm-up call each (compilation "
        f"included there), then {args.reps} rounds; medians of wall and process CPU time; ratios are "
        "medians of the per-round ratios. Same work for every implementation (no ignored tokens).",
        "- peak extra: each implementation in a fresh process with glibc's default allocator (no "
        "MALLOC_MMAP_THRESHOLD_): peak RSS over a cold and a measured call minus the RSS once "
        "the inputs exist; the measured call's gradient outputs are included (as in eager).",
        "- err: relative Frobenius error vs float64 on the same inputs (grad_weight on "
        f"{WEIGHT_ROWS_CHECKED} random vocabulary rows when V > {WEIGHT_ROWS_CHECKED}).",
        "- FLOPs: eager 6NHV (frozen head 4NHV); ours 8NHV (frozen head: 4NHV, recompute path 6NHV).",
        "",
    ]
    for case in cases:
        lines += case_table(case)
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    """Bars per case: time and peak extra memory of every implementation relative to eager."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 * len(cases) + 2.5))
    labels = [f"N={c['n']} H={c['h']} V={c['v']}\n{c['dtype']} {c['mode']}" for c in cases]
    impls = [i for i in IMPL_LABELS if any(i in c["rows"] for c in cases)]
    height = 0.8 / len(impls)
    for ax, metric in zip(axes, ("time (CPU) / eager", "peak extra memory / eager")):
        for k, impl in enumerate(impls):
            vals = []
            for c in cases:
                r, e = c["rows"].get(impl, {}), c["rows"].get("eager", {})
                ok = r.get("status") == "ok" and e.get("status") == "ok" and "cpu_ms" in r and "cpu_ms" in e
                if not ok:
                    vals.append(0.0)
                elif metric.startswith("time"):
                    vals.append(_ratio(c["rows"], impl, "eager", "cpu_ms"))
                else:
                    vals.append(r["extra_bytes"] / max(e["extra_bytes"], 1))
            ax.barh([i + k * height for i in range(len(cases))], vals, height, label=impl)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], labels, fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel(metric)
        ax.invert_yaxis()
    axes[0].legend(fontsize=8)
    fig.suptitle("linear_logprobs fwd+bwd on the CPU (ratios to eager, same dtype)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_cases(args: argparse.Namespace) -> list[tuple[int, int, int, str, str]]:
    shapes = PRESETS[args.preset] if args.preset else [(args.n, args.h, args.v)]
    dtypes = args.dtypes.split(",") if args.dtypes else [args.dtype]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODE_IMPLS:
            raise SystemExit(f"--modes: expected full and/or frozen, got {m!r}")
    return [(n, h, v, d, m) for (n, h, v) in shapes for d in dtypes for m in modes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="tokens (default 4096)")
    parser.add_argument("--h", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dtypes", default=None, help="comma list of dtypes (overrides --dtype)")
    parser.add_argument("--modes", default="full", help="comma list of full, frozen (default full)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="issue13: both issue-13 shapes")
    parser.add_argument("--compile", action="store_true", help="add torch.compile(eager) rows")
    parser.add_argument("--reps", type=int, default=10, help="timed interleaved rounds (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each worker (default: torch's default, all cores); on a shared "
                             "machine --threads 1 gives timings that other processes disturb far less")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 errors")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG of the ratios (matplotlib)")
    parser.add_argument("--stem", default=None, help="result file name without extension (default "
                        "logprobs_memory[_<preset>][_threads<k>])")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if os.environ.pop("MALLOC_MMAP_THRESHOLD_", None) is not None:
            # The harness fixes glibc's mmap threshold; measure the default allocator instead.
            os.execve(sys.executable, [sys.executable, "-m", "benchmarks.logprobs_memory", "--worker", args.worker],
                      os.environ)
        spec = json.loads(args.worker)
        try:
            result = WORKERS[spec["kind"]](spec)
        except Exception as exc:  # reported to the parent as a result, OOM included
            result = {"status": "OOM" if harness.is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"}
        harness.emit_result(result)
        return 0
    for name in ("n", "h", "v", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    device = torch.device("cpu")
    env = harness.environment(device)
    out = harness.results_dir(args.out, device)
    stem = args.stem or ("logprobs_memory" + (f"_{args.preset}" if args.preset else "")
                         + (f"_threads{args.threads}" if args.threads else ""))
    cases = []
    for n, h, v, dtype, mode in parse_cases(args):
        res = run_case(n, h, v, dtype, mode, args)
        cases.append({"n": n, "h": h, "v": v, "dtype": dtype, "mode": mode, **res})
        text = report(cases, args, env)  # written after every case: a long run keeps what it finished
        (out / f"{stem}.md").write_text(text)
        payload = {"env": env, "args": vars(args), "cases": cases}
        if len(cases) == 1:  # single-case layout kept for the earlier readers
            payload.update(rows=cases[0]["rows"], goals=cases[0]["goals"])
        harness.write_json(out / f"{stem}.json", payload)
    if args.plot:
        plot(cases, out / f"{stem}.png")
    print(text)
    print(f"written: {out / (stem + '.md')}, {out / (stem + '.json')}")
    bad = [c for c in cases for r in c["rows"].values() if r.get("status") != "ok" or not r.get("check", {"ok": True})["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
