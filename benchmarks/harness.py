"""Shared benchmark machinery: timing, peak memory, GEMM rate, correctness guard, result files.

Everything a benchmark row needs besides the workload itself lives here, so every benchmark
measures the same way:

* time: median of ``reps`` (>= 10) repetitions after warm-up; CUDA events on a GPU, ``perf_counter``
  on the CPU.
* peak memory above the inputs: ``torch.cuda.max_memory_allocated`` minus the allocation after the
  inputs exist (GPU); on the CPU the peak resident set size (``VmHWM``) minus the RSS
  right after the inputs were allocated, with the kernel's peak mark reset there, each case in a
  fresh process (:func:`run_worker` starts one) so no earlier case's allocator state leaks in.
  The CPU workers run with glibc's default allocator settings (what users get); pass
  ``env={"MALLOC_MMAP_THRESHOLD_": "131072"}`` to measure live buffers only (freed buffers then
  leave the resident set at once; lower numbers, as the results before 2026-11-29 were measured).
* several implementations timed side by side: :func:`time_interleaved`.
* the card's dense GEMM rate, measured in the same run (:func:`gemm_tflops`), so "% of GEMM" is
  relative to what this machine really does, not to a datasheet.
* a correctness guard (:func:`rel_err`, :data:`TOLERANCE`): every implementation's loss and gradients
  against a reference computed in the same run; a mismatch is flagged in the table, never hidden.
* out of memory is a result (``"OOM"``), not a crash (:func:`is_oom`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

#: Marker of the one JSON line a worker process prints on stdout.
RESULT_MARKER = "@@BENCH_RESULT "
MiB = 2**20

#: Largest relative error (Frobenius norm of the difference over the reference's) still counted as a
#: match, per input dtype. float32: chunked / fused sums reorder float32 additions over H and V
#: (errors ~1e-6..1e-5 seen); bf16/fp16: the inputs' own rounding (8 / 11 mantissa bits) bounds
#: what any implementation can reach against float64, so an eager same-dtype path lands near
#: 2^-8 ~ 4e-3 (bf16) and 2^-11 ~ 5e-4 (fp16); the thresholds leave a factor ~5 above that.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


# ---------------------------------------------------------------------------------------------
# Run identity
# ---------------------------------------------------------------------------------------------


def git_commit() -> str:
    """Short commit of the working tree, with ``+dirty`` when tracked files differ from it.

    ``SAFEDPO_BENCH_COMMIT`` overrides it (a GPU host that gets a copy of the tree without .git)."""
    if os.environ.get("SAFEDPO_BENCH_COMMIT"):
        return os.environ["SAFEDPO_BENCH_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU's marketing name or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """Short folder-friendly device name: ``cpu``, ``h100``, ``h200``, ``a100``... or the GPU's name."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100", "l40s", "a10g", "l4", "4090", "3090"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def environment(device: torch.device) -> dict:
    """What every result file records about the run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m " + " ".join([_module_name()] + sys.argv[1:]),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(wall ms, process CPU ms or None) of one call; CUDA events on a GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), None
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def _stats(times: list[float], cpu_times: list[float]) -> dict:
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}
    if cpu_times:
        # CPU time of all this process's threads: on a shared machine it moves far less than the
        # wall time when other processes compete for the cores.
        out["cpu_median_ms"] = statistics.median(cpu_times)
    return out


def time_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 10, warmup: int = 1) -> dict:
    """Median (and min, max) wall time of ``fn()`` in milliseconds over ``reps`` runs after ``warmup``.

    On CUDA each repetition is bracketed by CUDA events (device time, no host launch gaps hidden
    by a trailing synchronize); on the CPU by ``time.perf_counter``, and the median process CPU
    time (all threads, ``cpu_median_ms``) is recorded too.
    """
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, cpu_times = [], []
    for _ in range(reps):
        wall, cpu = _time_once(fn, device)
        times.append(wall)
        if cpu is not None:
            cpu_times.append(cpu)
    return _stats(times, cpu_times)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, reps: int = 10) -> dict[str, dict]:
    """:func:`time_ms` of several functions side by side: repetition r calls every function once,
    starting at a rotating position, so load changes on a shared machine hit all of them alike and
    their ratios stay meaningful. Warm them up before. ``{name: stats}`` with ``"interleaved": True``."""
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    names = list(fns)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    synchronize(device)
    for r in range(reps):
        k = r % max(1, len(names))
        for n in names[k:] + names[:k]:
            wall, cpu = _time_once(fns[n], device)
            walls[n].append(wall)
            if cpu is not None:
                cpus[n].append(cpu)
    return {n: {**_stats(walls[n], cpus[n]), "interleaved": True} for n in names}


def gemm_tflops(device: torch.device, dtype: torch.dtype | None = None, size: int | None = None,
                reps: int = 10) -> dict:
    """Measured dense GEMM rate (TFLOP/s) of ``size^3`` matmuls in ``dtype`` on this device, now.

    Defaults: bf16 8192^3 on a GPU (the figure KERNEL_NOTES quotes); float32 1024^3 on the CPU
    (bf16 GEMMs are emulated slowly on most CPUs, so float32 is the CPU's real peak).
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = time_ms(lambda: a @ b, device, reps=reps, warmup=2)
    # On the CPU the rate comes from process CPU time, like the CPU rows' rates (see rate_ms).
    return {"dtype": str(dtype).removeprefix("torch."), "size": size,
            "tflops": 2 * size**3 / (rate_ms(t) * 1e-3) / 1e12,
            "tflops_wall": 2 * size**3 / (t["median_ms"] * 1e-3) / 1e12}


def rate_ms(timing: dict) -> float:
    """The time rates are computed from: CUDA-event time on a GPU; process CPU time on the CPU.

    On a shared CPU machine the wall time mostly measures the other jobs (load averages of 5-10 on
    2 cores were seen while the committed results ran), while the CPU time of a single-threaded
    worker is the work itself; with several threads it also counts OpenMP spin-waiting.
    """
    return timing.get("cpu_median_ms") or timing["median_ms"]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's memory map (``VmHWM``; ``getrusage`` without /proc).

    ``VmHWM`` rather than ``getrusage().ru_maxrss``: the latter is floored at the parent's RSS when
    a child was forked from a large parent (the kernel records the pre-exec map's peak in it), so a
    fresh worker of a 600 MB parent would report at least 600 MB whatever it did.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def current_rss_bytes() -> int:
    """Resident set size now (``/proc/self/statm``); the peak when /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.extra_bytes``: peak above the entry level.

    CUDA: ``max_memory_allocated`` after a reset, minus what was allocated at entry.
    CPU: peak RSS (``VmHWM``, see :func:`peak_rss_bytes`) at exit minus the RSS at entry, after resetting the
    kernel's peak mark at entry (``/proc/self/clear_refs``). Where that reset is refused the entry
    level is the process's peak so far (``pm.exact`` is then False), which is only right in a fresh
    process whose inputs were the largest thing allocated so far: run cases in fresh processes.
    ``base_bytes`` (CPU): an earlier, lower entry level, e.g. the RSS before the warm-up runs, so
    that memory the allocator kept resident from the warm-up (and the measured run reuses) counts.
    """

    def __init__(self, device: torch.device, base_bytes: int | None = None):
        self.device = device
        self.extra_bytes = 0
        self.exact = True
        self.base_bytes = base_bytes

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import gc

            gc.collect()
            self.exact = reset_peak_rss()
            self._base = current_rss_bytes() if self.exact else peak_rss_bytes()
            if self.base_bytes is not None:
                self._base = min(self._base, self.base_bytes)
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.extra_bytes = max(0, peak_rss_bytes() - self._base)


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors of any device (CUDA OOM, CPU allocator failure, MemoryError)."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Correctness guard
# ---------------------------------------------------------------------------------------------


def rel_err(value: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||value - ref|| / ||ref|| in float64 on ref's device (absolute error when ref is all zeros);
    nan when either is missing, inf on a shape mismatch."""
    if value is None or ref is None:
        return float("nan")
    b = ref.detach().to(torch.float64).reshape(-1)
    a = value.detach().to(device=b.device, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape:
        return float("inf")
    diff = torch.linalg.vector_norm(a - b).item()
    scale = torch.linalg.vector_norm(b).item()
    return diff / scale if scale > 0 else diff


def check_outputs(outputs: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None],
                  dtype: torch.dtype) -> dict:
    """Relative error of every output against the reference and whether all are within TOLERANCE."""
    errors = {k: rel_err(outputs.get(k), ref.get(k)) for k in ref}
    tol = TOLERANCE[dtype]
    ok = all(e <= tol for e in errors.values())  # nan/inf compare False: flagged
    return {"errors": errors, "max_err": max(errors.values(), default=0.0), "tol": tol, "ok": ok}


# ---------------------------------------------------------------------------------------------
# Fresh worker processes (CPU memory)
# ---------------------------------------------------------------------------------------------


def emit_result(result: dict) -> None:
    """Print a worker's result as the one marked JSON line its parent reads."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(module: str, spec: dict, *, timeout_s: float = 1800, env: dict | None = None) -> dict:
    """Run ``python -m module --worker '<spec json>'`` in a fresh process and return its result dict.

    The worker inherits this environment plus ``env`` (no allocator tuning by default: the memory it
    reports is what a user's process holds, allocator caching included). A worker killed by SIGKILL (the kernel's OOM killer) counts as ``{"status": "OOM"}``; any other
    failure as ``{"status": "error", "error": <last stderr lines>}``; a timeout as ``"timeout"``.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    root = Path(__file__).resolve().parents[1]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(root) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root, env=full_env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    if proc.returncode == -signal.SIGKILL:
        return {"status": "OOM", "error": "worker killed by SIGKILL (out of memory)"}
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    if is_oom(RuntimeError(tail)):
        return {"status": "OOM", "error": tail}
    return {"status": "error", "error": f"exit {proc.returncode}: {tail}"}


# ---------------------------------------------------------------------------------------------
# Tables and files
# ---------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{digits}f}"


def fmt_err(x: float | None) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.1e}"


def results_dir(base: str | Path, device: torch.device) -> Path:
    """``base/<device>-<date>/`` (created)."""
    out = Path(base) / f"{device_slug(device)}-{today()}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
