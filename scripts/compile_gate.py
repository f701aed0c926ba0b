"""GPU-less compile gate for the log-prob kernels: compile what ships, read the cubin, judge it.

    python scripts/compile_gate.py                       # CI subset (~20 compiles), table on stdout
    python scripts/compile_gate.py --full --out benchmarks/results/compile_gate.txt   # everything (minutes)
    python scripts/compile_gate.py --full --json rows.json                            # also the raw rows

What is compiled: every target of ``compile_targets()`` (``safedpo_kernels.kernels``: every
kernel x variant x constexpr flag combination x block configuration that a launch can pick; a
fallback enumeration of the same from the launchers' own rules when the package has no such
function) for sm_90a and sm_80, with Triton's own compiler on the CPU. Dtypes: bfloat16 at every
configuration and flag combination, float16 at every flag combination of the default
configuration (its code differs from bf16 only in the operand type), float32 in both dot
precisions ("ieee", PyTorch's default, and "tf32") for the 32-bit configurations.

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
class Target:
    """One compilable kernel specialization (before the dtype is chosen)."""

    arch: str
    kernel: str
    variant: str
    fn: object = field(compare=False, repr=False)
    dtype_class: str
    flags: tuple  # sorted (name, value) pairs of the flag constexprs
    config: object  # BlockConfig
    default: bool  # the table's default config for (arch, kernel, dtype class)

    def flag_text(self) -> str:
        """Short flag list: ``bias,dh,dw,filter`` (booleans that are on), ``name=value`` for others."""
        short = [k.lower().removeprefix("compute_").removeprefix("has_") if v is True else f"{k.lower()}={v}"
                 for k, v in self.flags if v is not False]
        return ",".join(short) or "-"


# ------------------------------------------------------------------------------------------------
# What ships
# ------------------------------------------------------------------------------------------------


def _fallback_flag_combos(kernel: str) -> list[dict]:
    """The constexpr flag combinations the launchers can pass (``forward_logprobs``,
    ``backward_logprobs``): bias or not, each requested gradient subset, filtering or not."""
    out = []
    for has_bias, filt in itertools.product((False, True), (False, True)):
        if kernel == "forward":
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


def _fallback_targets() -> list[tuple]:
    """(kernel, jit fn, flags, config, arch, dtype class) of today's four kernels and their table."""
    from safedpo_kernels.kernels import backward, deterministic, forward
    from safedpo_kernels.kernels.config import all_configs

    fns = {"forward": forward._forward_kernel, "backward": backward._backward_kernel,
           "grad_hidden": deterministic._grad_hidden_kernel, "grad_weight": deterministic._grad_weight_kernel}
    return [(kernel, fns[kernel], flags, cfg, arch, cls)
            for arch, kernel, cls, cfg in all_configs() for flags in _fallback_flag_combos(kernel)]


def _package_targets():
    """``compile_targets()`` of the package (kernels/targets.py or kernels/config.py), or None."""
    import importlib

    for module in ("safedpo_kernels.kernels.targets", "safedpo_kernels.kernels.config", "safedpo_kernels.kernels"):
        try:
            fn = getattr(importlib.import_module(module), "compile_targets", None)
        except ImportError:
            continue
        if fn is not None:
            return list(fn())
    return None


def _get(item, name, index=None, default=None):
    if isinstance(item, dict):
        return item.get(name, default)
    if hasattr(item, name):
        return getattr(item, name)
    if index is not None and isinstance(item, tuple) and len(item) > index:
        return item[index]
    return default


def targets() -> tuple[list[Target], str]:
    """Every target that ships and where the list came from ("package" or "fallback").

    Accepts items of ``compile_targets()`` as objects/dicts with the fields kernel, fn, flags (or
    constexprs), config and optionally arch, dtype_class, variant, or as tuples (kernel, fn,
    flags, config[, arch, dtype_class]); a target without arch / dtype class is compiled for
    every (arch, class) whose table row holds its config, or for all of them when none does.
    """
    from safedpo_kernels.kernels.config import ARCHS, CONFIGS

    items = _package_targets()
    source = "package" if items is not None else "fallback"
    if items is None:
        items = _fallback_targets()
    out: list[Target] = []
    for it in items:
        kernel = _get(it, "kernel", 0)
        fn = _get(it, "fn", 1) or _get(it, "jit_fn")
        flags = _get(it, "flags", 2) or _get(it, "constexprs") or {}
        cfg = _get(it, "config", 3)
        arch, cls = _get(it, "arch", 4), _get(it, "dtype_class", 5)
        variant = _get(it, "variant", default="default") or "default"
        combos = [(arch, cls)] if arch and cls else [
            (a, c) for a in ARCHS for c in ("16bit", "32bit") if cfg in CONFIGS.get(a, {}).get(kernel, {}).get(c, [])
        ] or [(a, c) for a in ARCHS for c in ("16bit", "32bit")]
        for a, c in combos:
            table = CONFIGS.get(a, {}).get(kernel, {}).get(c, [])
            default = bool(table) and table[0] == cfg
            flag_items = tuple(sorted((k, v) for k, v in dict(flags).items() if k != "UPCAST"))
            out.append(Target(a, kernel, variant, fn, c, flag_items, cfg, default))
    return out, source


def jobs(subset: str) -> list[tuple]:
    """(target, dtype name, upcast control?) to compile. ``subset``: "full" or "ci".

    ci: per (arch, kernel, variant) the default configuration in bf16 at its flag combination with
    the most flags on, and the UPCAST controls of the forward kernel(s); full: every target in
    its dtypes and one UPCAST control per (arch, kernel, variant).
    """
    all_targets, _ = targets()
    out = []
    heaviest: dict[tuple, Target] = {}
    for t in all_targets:
        if t.dtype_class == "16bit" and t.default:
            key = (t.arch, t.kernel, t.variant)
            best = heaviest.get(key)
            if best is None or sum(v is True for _, v in t.flags) > sum(v is True for _, v in best.flags):
                heaviest[key] = t
    for t in all_targets:
        if subset == "full":
            for dt in CLASS_DTYPES[t.dtype_class]:
                if dt == "fp16" and not t.default:
                    continue
                out.append((t, dt, False))
    if subset == "ci":
        out += [(t, "bf16", False) for t in heaviest.values()]
    out += [(t, "bf16", True) for t in heaviest.values() if subset == "full" or t.kernel == "forward"]
    return out


# ------------------------------------------------------------------------------------------------
# Compiling and reading one target
# ------------------------------------------------------------------------------------------------


def _source(target: Target, dtype: str, upcast: bool):
    """ASTSource as a real launch specializes it (unit K strides, 16-aligned sizes and pointers)."""
    import triton

    fn = target.fn
    ptr_type, precision, _ = DTYPES[dtype]
    cfg = target.config
    constexprs = {"UPCAST": upcast, "DOT_PRECISION": "ieee" if upcast else precision,
                  "BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h, **dict(target.flags)}
    if "GROUP_M" in fn.arg_names:
        constexprs["GROUP_M"] = cfg.group_m
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
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
    missing = [a for a, p in zip(fn.arg_names, fn.params) if p.is_constexpr and a not in constexprs]
    if missing:
        raise ValueError(f"constexpr parameters without a value in the target: {missing}")
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


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


def compile_one(job: tuple) -> dict:
    """Compile one (target, dtype, upcast control) and return its row."""
    target, dtype, upcast = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True
    cfg = target.config
    row = {"arch": target.arch, "kernel": target.kernel, "variant": target.variant, "dtype": dtype,
           "config": str(cfg), "flags": target.flag_text(), "control": upcast, "ok": False, "errors": [], "notes": []}
    row["key"] = row_key(row)
    t0 = time.time()
    captured = io.StringIO()
    try:
        src = _source(target, dtype, upcast)
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(src, target=GPUTarget("cuda", ARCH_CAPABILITY[target.arch], 32),
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
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
    failures = judge(row, target.arch, DTYPES[dtype][2], upcast)
    if target.arch == "sm80" and row["shared"] > SHARED_LIMIT_CONSUMER:
        row["notes"].append(f"{row['shared']} B shared > 99 KiB: does not launch on sm_86/sm_89")
    if upcast:  # a control must be caught by the matmul check, and only fail that way
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


def row_key(row: dict) -> str:
    """Identity of a row across runs (what the committed full table is checked against)."""
    ctl = " UPCAST" if row.get("control") else ""
    return f"{row['arch']} {row['kernel']}[{row['variant']}] {row['dtype']} {row['config']} {row['flags']}{ctl}"


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    head = (f"{'arch':5} {'kernel[variant]':28} {'dtype':9} {'config':19} {'flags':30} {'regs':>4} {'smem':>6} "
            f"{'spill':>5}  {'tensor-core ops':52} status")
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = ", ".join(f"{k} x{n}" for k, n in sorted(r.get("mma", {}).items())) or "none (FFMA)"
        spill = sum(r.get(k, 0) for k in ("spill_stores", "spill_loads", "stack", "local"))
        status = "ok" if r["ok"] else "FAIL: " + "; ".join(r["errors"])
        if r.get("notes"):
            status += " (" + "; ".join(r["notes"]) + ")"
        flags = r["flags"] + (" UPCAST" if r.get("control") else "")
        lines.append(f"{r['arch']:5} {r['kernel'] + '[' + r['variant'] + ']':28} {r['dtype']:9} {r['config']:19} "
                     f"{flags:30} {r.get('registers', '-'):>4} {r.get('shared', '-'):>6} {spill:>5}  {mma:52} {status}")
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, str]:
    """``row key -> "ok" | "FAIL"`` from a table written by :func:`format_table` (the committed file)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[0] not in ARCH_CAPABILITY or not parts[1].endswith("]"):
            continue
        kernel, variant = parts[1][:-1].split("[", 1)
        row = {"arch": parts[0], "kernel": kernel, "variant": variant, "dtype": parts[2],
               "config": " ".join(parts[3:6]), "flags": parts[6], "control": parts[7] == "UPCAST"}
        out[row_key(row)] = "FAIL" if "FAIL:" in line else "ok"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every target (default: the CI subset)")
    parser.add_argument("--out", type=Path, help="also write the table (with its header) to this file")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
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
    todo = [(subset, i) for i in range(len(jobs(subset)))]
    _, source = targets()
    t0 = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_index, todo, chunksize=1))
    else:
        rows = [compile_index(j) for j in todo]
    failed = [r for r in rows if not r["ok"]]
    controls = sum(r["control"] for r in rows)
    header = [
        f"# compile gate ({'full' if args.full else 'CI subset'}): triton {triton.__version__}, "
        f"{len(rows)} compiles ({controls} UPCAST controls), targets from {source}, {time.time() - t0:.0f} s",
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
