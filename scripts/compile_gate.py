"""GPU-less compile gate for the log-prob kernels: compile, count registers/spills, read the SASS.

    python scripts/compile_gate.py                 # table on stdout, exit 1 on any failure
    python scripts/compile_gate.py --json out.json # also write the rows as JSON

Every kernel of ``safedpo_kernels.kernels`` is compiled at every configuration of the block
table (``safedpo_kernels/kernels/config.py``) for sm_90a and sm_80 with Triton's own compiler,
on the CPU (no GPU needed), for each input dtype the configuration serves. ``ptxas -v`` (shipped in
Triton's wheel) reports registers, shared memory and spills; ``cuobjdump --dump-sass`` shows the
tensor-core instructions. A row FAILS on a compile error, on any spill, or (sm_90a) when a
16-bit / tf32 matmul is not HGMMA of the input's type (e.g. TF32 from an interpreter upcast left
on, or HMMA/FFMA fallbacks). float32 "ieee" rows (exact fp32, PyTorch's default) use FFMA by
design and are checked for spills only.

TRITON_INTERPRET must be unset: triton.jit decides at decoration time whether a kernel is
compiled or interpreted, so the script re-executes itself without the variable when it is set
(the test-suite's conftest sets it).

Variants: every config in bf16 (with and without gradient filtering for the backward kernels),
float32 in both dot precisions, float16 at each kernel's default config (its code differs from
bf16 only in the operand type).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (dtype name, triton pointer type, dot precision, expected Hopper HGMMA operand tag or None)
DTYPES = {
    "16bit": [("bf16", "*bf16", "tf32", "BF16"), ("fp16", "*fp16", "tf32", "F16")],
    "32bit": [("fp32-ieee", "*fp32", "ieee", None), ("fp32-tf32", "*fp32", "tf32", "TF32")],
}
ARCH_CAPABILITY = {"sm90": 90, "sm80": 80}
#: Kernel name -> (function name in its module, flag constexprs compiled: the heaviest variant).
FLAGS = {
    "forward": {"HAS_BIAS": True},
    "backward": {"HAS_BIAS": True, "COMPUTE_DH": True, "COMPUTE_DW": True, "COMPUTE_DB": True, "FILTER": False},
    "grad_hidden": {"HAS_BIAS": True, "FILTER": False},
    "grad_weight": {"HAS_BIAS": True, "COMPUTE_DW": True, "COMPUTE_DB": True, "FILTER": False},
}
#: Extra variants compiled for bf16 only (gradient filtering adds a branch).
FILTER_VARIANTS = ("backward", "grad_hidden", "grad_weight")
_INPUT_PTRS = ("hidden_ptr", "weight_ptr", "bias_ptr")
_UNIT_STRIDES = ("stride_hk", "stride_wk")
_ALIGNED_INTS = ("H", "stride_hm", "stride_wv", "stride_dhm", "stride_dwv")


def _kernel_fn(name: str):
    from safedpo_kernels.kernels import backward, deterministic, forward

    return {
        "forward": forward._forward_kernel,
        "backward": backward._backward_kernel,
        "grad_hidden": deterministic._grad_hidden_kernel,
        "grad_weight": deterministic._grad_weight_kernel,
    }[name]


def _source(name: str, ptr_type: str, precision: str, cfg, extra: dict):
    """ASTSource for one kernel as a real launch would specialize it (unit strides, aligned sizes)."""
    import triton

    fn = _kernel_fn(name)
    constexprs = {
        "UPCAST": False,
        "DOT_PRECISION": precision,
        "BLOCK_M": cfg.block_m,
        "BLOCK_V": cfg.block_v,
        "BLOCK_H": cfg.block_h,
        **FLAGS[name],
        **extra,
    }
    if "GROUP_M" in fn.arg_names:
        constexprs["GROUP_M"] = cfg.group_m
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs or arg in _UNIT_STRIDES:
            signature[arg] = "constexpr"
            if arg in _UNIT_STRIDES:
                constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            signature[arg] = ptr_type if arg in _INPUT_PTRS else ("*i64" if arg == "labels_ptr" else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "filter_eps":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "smem_static": re.compile(r"(\d+) bytes smem"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_MMA_RE = re.compile(r"\b(HGMMA|HMMA|IMMA)\.([0-9A-Za-z.]+)")


def _mma_kinds(sass: str) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for op, rest in _MMA_RE.findall(sass):
        parts = [p for p in rest.split(".") if p and p not in ("SP",)]
        # drop shape and modifiers we do not judge: keep accumulator and operand types
        types = [p for p in parts if p in ("F32", "F16", "BF16", "TF32", "E4M3", "E5M2", "S8")]
        if len(types) == 1:  # HMMA.16816.F32 / HGMMA.64x128x16.F32: fp16 operands carry no tag
            types.append("F16")
        key = f"{op}.{parts[0]}." + ".".join(types) if parts else op
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def compile_one(job: tuple) -> dict:
    """Compile one (arch, kernel, dtype, config, variant); return its resource row."""
    arch, name, dtype_name, ptr_type, precision, expect, cfg, extra = job
    import triton
    from triton.backends.compiler import GPUTarget

    row = {
        "arch": arch, "kernel": name + ("+filter" if extra.get("FILTER") else ""), "dtype": dtype_name,
        "config": str(cfg), "ok": False, "errors": [],
    }  # fmt: skip
    t0 = time.time()
    try:
        src = _source(name, ptr_type, precision, cfg, extra)
        target = GPUTarget("cuda", ARCH_CAPABILITY[arch], 32)
        kernel = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as exc:  # noqa: BLE001 - report any compiler failure as a failed row
        row["errors"].append(f"compile error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return row
    row["shared"] = int(kernel.metadata.shared)
    gpu = "sm_90a" if arch == "sm90" else "sm_80"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run(
            [_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp, "k.o"))],
            capture_output=True, text=True,
        )  # fmt: skip
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True).stdout
    for key, rx in _PTXAS_RE.items():
        found = rx.findall(log.stderr)
        row[key] = max((int(x) for x in found), default=0)
    row["mma"] = _mma_kinds(sass)
    row["seconds"] = round(time.time() - t0, 2)
    if row["spill_stores"] or row["spill_loads"]:
        row["errors"].append(f"spills: {row['spill_stores']} B stores, {row['spill_loads']} B loads")
    if arch == "sm90" and expect is not None:
        bad = [k for k in row["mma"] if not (k.startswith("HGMMA.") and k.endswith("." + expect))]
        if not row["mma"] or bad:
            row["errors"].append(f"expected only HGMMA ... {expect}, got {sorted(row['mma']) or 'no tensor-core ops'}")
    if arch == "sm80" and expect in ("BF16", "F16"):
        if not any(k.startswith("HMMA.") and k.endswith("." + expect) for k in row["mma"]):
            row["errors"].append(f"expected HMMA ... {expect}, got {sorted(row['mma']) or 'no tensor-core ops'}")
    row["ok"] = not row["errors"]
    return row


def jobs() -> list[tuple]:
    sys.path.insert(0, str(ROOT))
    from safedpo_kernels.kernels.config import CONFIGS, all_configs

    out = []
    for arch, name, cls, cfg in all_configs():
        is_default = cfg == CONFIGS[arch][name][cls][0]
        for dtype_name, ptr_type, precision, expect in DTYPES[cls]:
            if dtype_name == "fp16" and not is_default:
                continue  # same code as bf16 but for the operand type: default config only
            out.append((arch, name, dtype_name, ptr_type, precision, expect, cfg, {}))
            if name in FILTER_VARIANTS and dtype_name == "bf16":
                out.append((arch, name, dtype_name, ptr_type, precision, expect, cfg, {"FILTER": True}))
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'arch':5} {'kernel':19} {'dtype':9} {'config':18} {'regs':>4} {'smem':>7} {'spill':>5}  {'tensor-core ops':40} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = ", ".join(f"{k} x{n}" for k, n in sorted(r.get("mma", {}).items())) or "none (FFMA)"
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        status = "ok" if r["ok"] else "FAIL: " + "; ".join(r["errors"])
        lines.append(
            f"{r['arch']:5} {r['kernel']:19} {r['dtype']:9} {r['config']:18} {r.get('registers', '-'):>4} "
            f"{r.get('shared', '-'):>7} {spill:>5}  {mma:40} {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    import triton

    todo = jobs()
    t0 = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, todo))
    else:
        rows = [compile_one(j) for j in todo]
    failed = [r for r in rows if not r["ok"]]
    print(f"# compile gate: triton {triton.__version__}, {len(rows)} kernel variants, {time.time() - t0:.0f} s")
    print(format_table(rows))
    print(f"# {len(rows) - len(failed)} ok, {len(failed)} failed")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
