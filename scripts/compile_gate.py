"""GPU-less compile gate for the log-prob kernels: compile what ships, read the cubin, judge it.

    python scripts/compile_gate.py                       # CI subset (~20 compiles), table on stdout
    python scripts/compile_gate.py --full --out benchmarks/results/compile_gate.txt   # everything (minutes)
    python scripts/compile_gate.py --full --json rows.json                            # also the raw rows

What is compiled, for sm_90a and sm_80 with Triton's own compiler on the CPU: the specializations
of ``compile_targets()`` (``safedpo_kernels/kernels/targets.py``: every kernel incl. the frozen-head
one x block configuration x dtype x dot precision x constexpr flag combination a launch can
produce: bias, softcap, gradient subsets, filtering, the variants' flags, the 16-bit grad-weight
accumulator, and ``UPCAST``; each target builds the exact ``ASTSource`` a launch compiles). A
package without that function gets the same enumeration of today's kernels from this script.
``--full`` compiles, in bfloat16 at each kernel's default configuration, every flag combination
for sm_90a and, for sm_80, the heaviest combination (most flags on) and, per flag, the heaviest
launchable combination with that flag off (every flag compiled on and off); every other (dtype / dot precision, configuration) at
its heaviest combination. The CI subset compiles, per (arch, kernel), the default configuration in
bf16 at its heaviest combination. float32 runs in both dot precisions ("ieee", PyTorch's default, and "tf32").

What is read, all from the cubin Triton produced and would load (no second compiler run):

* registers, stack and local memory (``LOCAL``: what ``cuFuncGetAttribute`` reports at load and
  Triton turns into ``CompiledKernel.n_spills = LOCAL / 4``) from ``cuobjdump --dump-resource-usage``;
* spill stores / loads and registers from the ``ptxas -v`` log of Triton's own compile
  (``knobs.nvidia.dump_ptxas_log``), cross-checked against the cubin's register count;
* shared memory: ``metadata.shared`` (what the launch requests) plus the cubin's static shared;
* tensor-core instructions from ``cuobjdump --dump-sass``.

A row FAILS on: a compile or ptxas error; a tool's non-zero exit or output it cannot parse; any
spill or local memory; registers in the log and the cubin that disagree; shared memory over the
architecture's per-block limit (sm_90a 227 KiB, sm_80 163 KiB; rows over Ada's/Ampere-consumer's
99 KiB get a note: those cards share the sm80 table); a Hopper 16-bit/tf32 matmul that is not
HGMMA of the input's type; an Ampere 16-bit kernel without HMMA of its type. float32 "ieee" rows
use FFMA by design and are judged on the rest.

Controls (``UPCAST`` rows): every kernel (the CI subset: the forward kernel) is also compiled once
per architecture with the interpreter's bf16 workaround on (``UPCAST=True``). These rows must FAIL the matmul check (the
upcast turns BF16 HGMMA into FFMA): they prove the check can fail; a control that passes is a gate
failure. The launchers pass ``UPCAST=True`` only under the interpreter; the gate checks that
``upcast_flag(torch.bfloat16)`` is False in this (non-interpreting) process.

TRITON_INTERPRET must be unset (triton.jit decides at decoration time whether a kernel is compiled
or interpreted): the script re-executes itself without it when it is set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: dtype name -> (triton pointer type of the inputs, dot precision, expected tensor-core operand tag).
DTYPES = {
    "bf16": ("*bf16", "tf32", "BF16"),
    "fp16": ("*fp16", "tf32", "F16"),
    "fp32-ieee": ("*fp32", "ieee", None),
    "fp32-tf32": ("*fp32", "tf32", "TF32"),
}
CLASS_DTYPES = {"16bit": ("bf16", "fp16"), "32bit": ("fp32-ieee", "fp32-tf32")}
ARCH_CAPABILITY = {"sm90": 90, "sm80": 80}
ARCH_GPU_NAME = {"sm90": "sm_90a", "sm80": "sm_80"}
#: Largest dynamic shared memory per block (opt-in): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {"sm90": 232448, "sm80": 166912}
#: sm_86 / sm_89 (A10G, L4, L40S, RTX 30xx/40xx) use the sm80 table but allow 99 KiB.
SHARED_LIMIT_CONSUMER = 101376
_INPUT_PTRS = ("hidden_ptr", "weight_ptr", "bias_ptr")
_UNIT_STRIDES = ("stride_hk", "stride_wk")
_ALIGNED_INTS = ("H", "stride_hm", "stride_wv", "stride_dhm", "stride_dwv")
#: Runtime scalars that are floats (everything else that is not a pointer is an int32).
_FLOAT_SCALAR = re.compile(r"eps|scale|softcap|cap$|temperature")


@dataclass(frozen=True)
class Job:
    """One compile: a kernel specialization in one dtype (and dot precision) for one architecture."""

    arch: str
    kernel: str
    dtype: str  # "bf16", "fp16", "fp32-ieee", "fp32-tf32"
    config: object  # BlockConfig
    flags: tuple  # sorted (name, value) of the flag constexprs, UPCAST / DOT_PRECISION excluded
    control: bool  # UPCAST=True: the interpreter's bf16 workaround (must be caught)
    default: bool  # the table's default config of (arch, kernel, dtype class)
    build: object = field(compare=False, repr=False)  # () -> (ASTSource, compile options)

    def flag_text(self) -> str:
        """Short flag list: ``bias,dh,dw,filter`` (booleans that are on), ``name=value`` for others."""
        short = [k.lower().removeprefix("compute_").removeprefix("has_") if v is True else f"{k.lower()}={v}"
                 for k, v in self.flags if v is not False]
        return ",".join(short) or "-"

    def weight(self) -> int:
        return sum(v is not False for _, v in self.flags)


# ------------------------------------------------------------------------------------------------
# What ships
# ------------------------------------------------------------------------------------------------


def _fallback_flag_combos(kernel: str) -> list[dict]:
    """The constexpr flag combinations the launchers can pass (``forward_logprobs``,
    ``backward_logprobs``): bias or not, each requested gradient subset, filtering or not."""
    out = []
    for has_bias, filt in itertools.product((False, True), (False, True)):
        if kernel in ("forward", "frozen"):
            if not filt:
                out.append({"HAS_BIAS": has_bias})
        elif kernel == "grad_hidden":
            out.append({"HAS_BIAS": has_bias, "FILTER": filt})
        else:
            names = ("COMPUTE_DH", "COMPUTE_DW", "COMPUTE_DB") if kernel == "backward" else ("COMPUTE_DW", "COMPUTE_DB")
            for needs in itertools.product((False, True), repeat=len(names)):
                need = dict(zip(names, needs))
                if not any(needs) or (need["COMPUTE_DB"] and not has_bias):
                    continue  # nothing to do / no bias gradient without a bias: never launched
                out.append({"HAS_BIAS": has_bias, **need, "FILTER": filt})
    return out


def _fallback_jobs() -> list[Job]:
    """Today's four kernels x their table x every launchable flag combination x dtypes, built here
    (for a package without ``compile_targets()``), plus an UPCAST control per (arch, kernel, config)."""
    import importlib

    from safedpo_kernels.kernels.config import CONFIGS, all_configs

    where = {"forward": ("forward", "_forward_kernel"), "backward": ("backward", "_backward_kernel"),
             "grad_hidden": ("deterministic", "_grad_hidden_kernel"),
             "grad_weight": ("deterministic", "_grad_weight_kernel"), "frozen": ("frozen", "_frozen_forward_kernel")}
    fns = {}
    for kernel, (module, name) in where.items():
        try:
            fns[kernel] = getattr(importlib.import_module(f"safedpo_kernels.kernels.{module}"), name)
        except (ImportError, AttributeError):
            pass
    out = []
    for arch, kernel, cls, cfg in all_configs():
        if kernel not in fns:
            raise KeyError(f"kernel {kernel!r} of the config table has no jit function known to the fallback "
                           "enumeration: add compile_targets() to safedpo_kernels.kernels")
        default = CONFIGS[arch][kernel][cls][0] == cfg
        for flags in _fallback_flag_combos(kernel):
            dtypes = [(d, False) for d in CLASS_DTYPES[cls]] + ([("bf16", True)] if cls == "16bit" else [])
            for dtype, upcast in dtypes:
                build = functools.partial(_fallback_source, fns[kernel], dtype, upcast, cfg, flags)
                out.append(Job(arch, kernel, dtype, cfg, tuple(sorted(flags.items())), upcast, default, build))
    return out


def _fallback_source(fn, dtype: str, upcast: bool, cfg, flags: dict):
    """ASTSource as a real launch specializes it (unit K strides, 16-aligned sizes and pointers)."""
    import triton

    ptr_type, precision, _ = DTYPES[dtype]
    constexprs = {"UPCAST": upcast, "DOT_PRECISION": "ieee" if upcast else precision,
                  "BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h, **flags}
    if "GROUP_M" in fn.arg_names:
        constexprs["GROUP_M"] = cfg.group_m
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    for arg, param in zip(fn.arg_names, fn.params):  # flags this enumeration does not know: off
        if param.is_constexpr and arg not in constexprs and arg not in _UNIT_STRIDES:
            constexprs[arg] = False
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs or arg in _UNIT_STRIDES:
            signature[arg] = "constexpr"
            if arg in _UNIT_STRIDES:
                constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            signature[arg] = ptr_type if arg in _INPUT_PTRS else ("*i64" if arg == "labels_ptr" else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif _FLOAT_SCALAR.search(arg):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return src, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _package_jobs() -> list[Job] | None:
    """Jobs from the package's ``compile_targets()`` (kernels/targets.py or kernels/config.py), or None.

    Each target carries kernel, fn, flags (UPCAST and DOT_PRECISION included), config, arch,
    dtype ("bf16" / "fp16" / "fp32"), dw_dtype, is_default_config and builds its own
    ``ast_source()`` and ``options()``: the gate compiles exactly what a launch would.
    """
    import importlib

    fn = None
    for module in ("safedpo_kernels.kernels.targets", "safedpo_kernels.kernels.config"):
        try:
            fn = getattr(importlib.import_module(module), "compile_targets", None)
        except ImportError:
            continue
        if fn is not None:
            break
    if fn is None:
        return None
    out = []
    for t in fn():
        flags = dict(t.flags)
        upcast = bool(flags.pop("UPCAST", False))
        precision = flags.pop("DOT_PRECISION", "tf32")
        dtype = t.dtype if t.dtype != "fp32" else f"fp32-{precision}"
        if getattr(t, "dw_dtype", "fp32") != "fp32":
            flags["dw"] = t.dw_dtype
        build = functools.partial(lambda tt: (tt.ast_source(), tt.options()), t)
        out.append(Job(t.arch, t.kernel, dtype, t.config, tuple(sorted(flags.items())), upcast,
                       bool(getattr(t, "is_default_config", True)), build))
    return out


def all_jobs() -> tuple[list[Job], str]:
    """Every specialization that ships, and where the list came from ("package" or "fallback")."""
    jobs_ = _package_jobs()
    return (jobs_, "package") if jobs_ is not None else (_fallback_jobs(), "fallback")


def jobs(subset: str) -> list[Job]:
    """The compiles of a subset, in a fixed order.

    full: on sm_90a every flag combination in bf16 at each kernel's default configuration; on sm_80
    (bf16, default configuration) the heaviest combination (most flags on) and, per flag, the
    heaviest launchable combination with that flag off, so every flag is compiled on and off; every other (arch, dtype /
    dot precision, configuration) at its heaviest combination; one UPCAST control per (arch,
    kernel). ci: per (arch, kernel) the default configuration in bf16 at its heaviest combination,
    and the forward kernel's UPCAST control per arch.
    """
    everything, _ = all_jobs()
    heaviest: dict[tuple, Job] = {}
    for j in everything:
        key = (j.arch, j.kernel, j.dtype, str(j.config), j.control)
        if key not in heaviest or j.weight() > heaviest[key].weight():
            heaviest[key] = j
    # sm_80: per kernel and flag, the heaviest launchable combination with that flag off
    flag_off: set[int] = set()
    groups: dict[tuple, list[Job]] = {}
    for j in everything:
        if j.arch != "sm90" and j.dtype == "bf16" and j.default and not j.control:
            groups.setdefault((j.arch, j.kernel, str(j.config)), []).append(j)
    for group in groups.values():
        for name in {k for j in group for k, _ in j.flags}:
            off = [j for j in group if dict(j.flags).get(name, False) is False]
            if off:
                flag_off.add(id(max(off, key=Job.weight)))
    out: list[Job] = []
    for j in everything:
        top = heaviest[(j.arch, j.kernel, j.dtype, str(j.config), j.control)]
        is_heaviest = top is j
        if j.control:
            keep = is_heaviest and j.default and j.dtype == "bf16" and (subset == "full" or j.kernel == "forward")
        elif subset == "ci":
            keep = is_heaviest and j.default and j.dtype == "bf16"
        elif j.dtype == "bf16" and j.default and j.arch == "sm90":
            keep = True
        elif j.dtype == "bf16" and j.default:
            keep = is_heaviest or id(j) in flag_off
        else:
            keep = is_heaviest
        if keep:
            out.append(j)
    return out


# ------------------------------------------------------------------------------------------------
# Compiling and reading one job
# ------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_PTXAS_RE = {
    "ptxas_registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_RESOURCE_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MMA_RE = re.compile(r"\b(HGMMA|HMMA|IMMA)\.([0-9A-Za-z.]+)")


def mma_kinds(sass: str) -> dict[str, int]:
    """Tensor-core instruction kinds in a SASS dump: ``HGMMA.64x128x16.F32.BF16`` -> count."""
    kinds: dict[str, int] = {}
    for op, rest in _MMA_RE.findall(sass):
        parts = [p for p in rest.split(".") if p and p != "SP"]
        types = [p for p in parts if p in ("F32", "F16", "BF16", "TF32", "E4M3", "E5M2", "S8")]
        if len(types) == 1:  # HMMA.16816.F32 / HGMMA.64x128x16.F32: fp16 operands carry no tag
            types.append("F16")
        key = f"{op}.{parts[0]}." + ".".join(types) if parts else op
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def parse_resources(text: str, name: str) -> dict:
    """REG / STACK / SHARED / LOCAL of function ``name`` from ``cuobjdump --dump-resource-usage``."""
    for fn_name, reg, stack, shared, local in _RESOURCE_RE.findall(text):
        if fn_name == name:
            return {"registers": int(reg), "stack": int(stack), "static_shared": int(shared), "local": int(local)}
    raise ValueError(f"no resource line for {name!r} in cuobjdump output: {text[:300]!r}")


def parse_ptxas_log(log: str) -> dict:
    """Registers and spill bytes from a ``ptxas -v`` log (the largest value when several functions)."""
    out = {}
    for key, rx in _PTXAS_RE.items():
        found = rx.findall(log)
        if not found:
            raise ValueError(f"ptxas log has no {key!r}: {log[:300]!r}")
        out[key] = max(int(x) for x in found)
    return out


def judge(row: dict, arch: str, expect: str | None, upcast: bool) -> list[str]:
    """The row's failures (empty when it passes); see the module docstring."""
    errors = []
    if row["local"] or row["stack"] or row["spill_stores"] or row["spill_loads"]:
        errors.append(f"spills: {row['spill_stores']} B stores, {row['spill_loads']} B loads, "
                      f"{row['stack']} B stack, {row['local']} B local")
    if row["ptxas_registers"] != row["registers"]:
        errors.append(f"registers: ptxas log {row['ptxas_registers']} != cubin {row['registers']}")
    if row["shared"] > SHARED_LIMIT[arch]:
        errors.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[arch]} B ({arch} per-block limit)")
    mma = row["mma"]
    if arch == "sm90" and expect is not None:
        bad = [k for k in mma if not (k.startswith("HGMMA.") and k.endswith("." + expect))]
        if not mma or bad:
            errors.append(f"expected only HGMMA ... {expect}, got {sorted(mma) or 'no tensor-core ops'}")
    if arch == "sm80" and expect in ("BF16", "F16"):
        if not any(k.startswith("HMMA.") and k.endswith("." + expect) for k in mma):
            errors.append(f"expected HMMA ... {expect}, got {sorted(mma) or 'no tensor-core ops'}")
    return errors


def compile_one(job: Job) -> dict:
    """Compile one job and return its row."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True
    row = {"arch": job.arch, "kernel": job.kernel, "dtype": job.dtype, "config": str(job.config),
           "flags": job.flag_text(), "control": job.control, "ok": False, "errors": [], "notes": []}
    row["key"] = row_key(row)
    t0 = time.time()
    captured = io.StringIO()
    try:
        src, options = job.build()
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(src, target=GPUTarget("cuda", ARCH_CAPABILITY[job.arch], 32), options=options)
    except Exception as exc:  # noqa: BLE001 - any compiler failure (incl. ptxas) is a failed row
        msg = str(exc).strip().splitlines()
        row["errors"].append(f"compile error: {type(exc).__name__}: {msg[0][:200] if msg else ''}")
        return row
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp, "k.cubin")
            cubin.write_bytes(kernel.asm["cubin"])
            res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
            sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True)
        for name, proc in (("cuobjdump --dump-resource-usage", res), ("cuobjdump --dump-sass", sass)):
            if proc.returncode != 0:
                raise ValueError(f"{name} exit {proc.returncode}: {proc.stderr.strip()[:200]}")
        if "Function : " + kernel.name not in sass.stdout:
            raise ValueError(f"cuobjdump --dump-sass: no function {kernel.name!r} in its output")
        row.update(parse_resources(res.stdout, kernel.name))
        row.update(parse_ptxas_log(captured.getvalue()))
    except (ValueError, OSError) as exc:
        row["errors"].append(f"unparsed: {exc}")
        return row
    row["shared"] = int(kernel.metadata.shared) + row["static_shared"]
    row["mma"] = mma_kinds(sass.stdout)
    row["seconds"] = round(time.time() - t0, 2)
    failures = judge(row, job.arch, DTYPES[job.dtype][2], job.control)
    if job.arch == "sm80" and row["shared"] > SHARED_LIMIT_CONSUMER:
        row["notes"].append(f"{row['shared']} B shared > 99 KiB: does not launch on sm_86/sm_89")
    if job.control:  # a control must be caught by the matmul check
        caught = [e for e in failures if e.startswith("expected")]
        row["errors"] = [] if caught else ["control NOT caught: UPCAST=True passed the matmul check"]
        row["notes"].append("control caught: " + (caught[0][:70] if caught else "-"))
    else:
        row["errors"] = failures
    row["ok"] = not row["errors"]
    return row


_JOBS: dict[str, list[tuple]] = {}


def compile_index(subset_and_index: tuple[str, int]) -> dict:
    """``compile_one(jobs(subset)[index])``: what a worker process runs (jit functions do not pickle)."""
    subset, index = subset_and_index
    if subset not in _JOBS:
        _JOBS[subset] = jobs(subset)
    return compile_one(_JOBS[subset][index])


def job_key(job: Job) -> str:
    return row_key({"arch": job.arch, "kernel": job.kernel, "dtype": job.dtype, "config": str(job.config),
                    "flags": job.flag_text(), "control": job.control})


def row_key(row: dict) -> str:
    """Identity of a row across runs (what the committed full table is checked against)."""
    ctl = " UPCAST" if row.get("control") else ""
    return f"{row['arch']} {row['kernel']} {row['dtype']} {row['config']} {row['flags']}{ctl}"


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    head = (f"{'arch':5} {'kernel':12} {'dtype':9} {'config':19} {'flags':30} {'regs':>4} {'smem':>6} "
            f"{'spill':>5}  {'tensor-core ops':52} status")
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = ", ".join(f"{k} x{n}" for k, n in sorted(r.get("mma", {}).items())) or "none (FFMA)"
        spill = sum(r.get(k, 0) for k in ("spill_stores", "spill_loads", "stack", "local"))
        status = "ok" if r["ok"] else "FAIL: " + "; ".join(r["errors"])
        if r.get("notes"):
            status += " (" + "; ".join(r["notes"]) + ")"
        flags = r["flags"] + (" UPCAST" if r.get("control") else "")
        lines.append(f"{r['arch']:5} {r['kernel']:12} {r['dtype']:9} {r['config']:19} "
                     f"{flags:30} {r.get('registers', '-'):>4} {r.get('shared', '-'):>6} {spill:>5}  {mma:52} {status}")
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, str]:
    """``row key -> "ok" | "FAIL"`` from a table written by :func:`format_table` (the committed file)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[0] not in ARCH_CAPABILITY:
            continue
        row = {"arch": parts[0], "kernel": parts[1], "dtype": parts[2],
               "config": " ".join(parts[3:6]), "flags": parts[6], "control": parts[7] == "UPCAST"}
        out[row_key(row)] = "FAIL" if "FAIL:" in line else "ok"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every target (default: the CI subset)")
    parser.add_argument("--out", type=Path, help="also write the table (with its header) to this file")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--progress", type=Path,
                        help="append every finished row to this JSON-lines file; rows already in it (same key) "
                             "are taken from it instead of compiled again, so an interrupted --full run resumes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    import torch
    import triton

    from safedpo_kernels.kernels import common

    if getattr(common, "INTERPRETING", False) or common.upcast_flag(torch.bfloat16):
        print("FAIL: upcast_flag(torch.bfloat16) is True in a compiling process: GPU builds would upcast")
        return 1
    subset = "full" if args.full else "ci"
    planned = jobs(subset)
    keys = [job_key(j) for j in planned]
    done: dict[str, dict] = {}
    if args.progress and args.progress.exists():
        for line in args.progress.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    todo = [(subset, i) for i, k in enumerate(keys) if k not in done]
    _, source = all_jobs()
    t0 = time.time()
    log = args.progress.open("a") if args.progress else None
    print(f"# {len(planned)} compiles planned, {len(planned) - len(todo)} taken from {args.progress}", file=sys.stderr)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for n, row in enumerate(pool.map(compile_index, todo, chunksize=1), 1):
            done[row["key"]] = row
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
            print(f"[{n}/{len(todo)} {time.time() - t0:.0f} s] {row['key']}: {'ok' if row['ok'] else 'FAIL'}",
                  file=sys.stderr, flush=True)
    rows = [done[k] for k in keys]
    failed = [r for r in rows if not r["ok"]]
    controls = sum(r["control"] for r in rows)
    header = [
        f"# compile gate ({'full' if args.full else 'CI subset'}): triton {triton.__version__}, "
        f"{len(rows)} compiles ({controls} UPCAST controls), targets from {source} "
        f"({'compile_targets()' if source == 'package' else 'the launchers rules, in this script'}), "
        f"{time.time() - t0:.0f} s for {len(todo)} of them"
        + (f" ({len(planned) - len(todo)} rows from an earlier run, --progress)" if len(todo) < len(planned) else ""),
        f"# command: python scripts/compile_gate.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        "# regs/smem/spill from the cubin Triton produced (cuobjdump --dump-resource-usage; spill = ptxas-log "
        "spill stores + loads + STACK + LOCAL bytes); launch flags: upcast_flag(bf16) = False",
    ]
    text = "\n".join(header) + "\n" + format_table(rows) + f"\n# {len(rows) - len(failed)} ok, {len(failed)} failed\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
