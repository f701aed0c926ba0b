"""Every kernel specialization that ships, for the GPU-less compile gate (``scripts/compile_gate.py``).

``compile_targets()`` yields one ``CompileTarget`` per (architecture, kernel, block configuration,
input dtype, constexpr flag combination) that a launch can produce, including the variants
(``variants.py``), the frozen-head kernel, the logit softcap, and ``UPCAST=True`` (the interpreter's
bfloat16 workaround, which a GPU launch never uses: the gate can show it is the only TF32 path).
Each target builds the exact ``triton.compiler.ASTSource`` a real launch with contiguous, 16-byte
aligned tensors would compile (``target.ast_source()``), so the gate needs no knowledge of the
kernels' signatures.

Count (Triton 3.8, this table): see ``len(list(compile_targets()))``; filter with the ``archs``,
``dtypes`` and ``kernels`` arguments, or ``default_configs_only=True`` for the first (default)
configuration of each table entry.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, NamedTuple

from safedpo_kernels.kernels.config import ARCHS, CONFIGS, BlockConfig, dtype_class, entry_parts

#: dtype name -> (Triton pointer type of hidden/weight/bias, dot precisions a launch can use)
DTYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "bf16": ("*bf16", ("tf32",)),
    "fp16": ("*fp16", ("tf32",)),
    "fp32": ("*fp32", ("ieee", "tf32")),
}
_ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
#: int arguments a launch specializes to the constant 1 (contiguous rows)
UNIT_STRIDE_ARGS = ("stride_hk", "stride_wk")
#: int arguments a launch sees divisible by 16 (H a multiple of 16, contiguous aligned rows)
ALIGNED_INT_ARGS = ("H", "stride_hm", "stride_wv", "stride_dhm", "stride_dwv", "stride_rm")
_FLOAT_ARGS = ("filter_eps", "logit_scale", "softcap")
_INPUT_PTRS = ("hidden_ptr", "weight_ptr", "bias_ptr")


class CompileTarget(NamedTuple):
    """One compiled specialization.

    Fields:
        kernel: table entry name in ``config.CONFIGS``: "forward", "backward", "grad_hidden",
            "grad_weight", "frozen", or a tagged entry ``kernel[_pair][_lowp][+softcap]`` that
            serves that kernel's launches with PAIR / a 16-bit grad_weight accumulator / a softcap
            (``config.entry_name``); the untagged entry then serves only the other launches.
        fn: the ``@triton.jit`` function.
        flags: every constexpr except the block sizes: HAS_BIAS, HAS_SOFTCAP, UPCAST,
            DOT_PRECISION and, per kernel, GROUPED (forward), COMPUTE_DH / COMPUTE_DW / COMPUTE_DB,
            FILTER, STAGGER (backward), PAIR (deterministic pair).
        config: the ``BlockConfig`` (block sizes, warps, stages).
        arch: "sm90" or "sm80" (compile for sm_90a / sm_80).
        dtype: "bf16", "fp16" or "fp32": the hidden/weight/bias element type.
        dw_dtype: element type of the grad_weight accumulator ("fp32", or the 16-bit input type
            in the "dw_lowp" variant); "fp32" for kernels without one.
        is_default_config: True for the first (default) configuration of its table entry.
    """

    kernel: str
    fn: Any
    flags: dict
    config: BlockConfig
    arch: str
    dtype: str
    dw_dtype: str = "fp32"
    is_default_config: bool = True

    @property
    def name(self) -> str:
        """Short readable id, e.g. ``sm90 backward bf16 128x128x32 w8 s3 HAS_BIAS,COMPUTE_DH``."""
        on = ",".join(k for k, v in self.flags.items() if v is True)
        prec = f" {self.flags['DOT_PRECISION']}" if self.dtype == "fp32" else ""
        dw = f" dw={self.dw_dtype}" if self.dw_dtype != "fp32" else ""
        return f"{self.arch} {self.kernel} {self.dtype}{prec} {self.config} {on}{dw}"

    def constexprs(self) -> dict:
        """All constexpr values: the flags, the block sizes and, where the kernel has it, GROUP_M."""
        out = dict(self.flags, BLOCK_M=self.config.block_m, BLOCK_V=self.config.block_v, BLOCK_H=self.config.block_h)
        if "GROUP_M" in self.fn.arg_names:
            out["GROUP_M"] = self.config.group_m
        for arg in UNIT_STRIDE_ARGS:
            if arg in self.fn.arg_names:
                out[arg] = 1
        return out

    def signature(self) -> dict[str, str]:
        """Triton signature: pointer / scalar types per argument, "constexpr" for constexprs."""
        const = self.constexprs()
        ptr = DTYPES[self.dtype][0]
        sig = {}
        for arg in self.fn.arg_names:
            if arg in const:
                sig[arg] = "constexpr"
            elif arg in _INPUT_PTRS:
                sig[arg] = ptr
            elif arg == "labels_ptr":
                sig[arg] = "*i64"
            elif arg == "skipped_ptr":
                sig[arg] = "*i32"
            elif arg == "dw_ptr":
                sig[arg] = "*" + self.dw_dtype
            elif arg.endswith("_ptr"):
                sig[arg] = "*fp32"
            elif arg in _FLOAT_ARGS:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        return sig

    def ast_source(self):
        """``triton.compiler.ASTSource`` as a launch with contiguous, 16-byte aligned tensors."""
        import triton

        sig = self.signature()
        attrs = {}
        for i, arg in enumerate(self.fn.arg_names):
            if sig[arg].startswith("*") or arg in ALIGNED_INT_ARGS:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return triton.compiler.ASTSource(fn=self.fn, signature=sig, constexprs=self.constexprs(), attrs=attrs)

    def options(self) -> dict:
        """``triton.compile`` options."""
        return {"num_warps": self.config.num_warps, "num_stages": self.config.num_stages}


def _kernel_fns() -> dict:
    from safedpo_kernels.kernels import backward, deterministic, forward, frozen

    return {
        "forward": forward._forward_kernel,
        "backward": backward._backward_kernel,
        "grad_hidden": deterministic._grad_hidden_kernel,
        "grad_weight": deterministic._grad_weight_kernel,
        "frozen": frozen._frozen_forward_kernel,
    }


def _grads(has_bias: bool) -> list[tuple[bool, bool, bool]]:
    """(COMPUTE_DH, COMPUTE_DW, COMPUTE_DB) combinations a backward can request."""
    combos = [c for c in itertools.product((False, True), repeat=3) if any(c)]
    return [c for c in combos if has_bias or not c[2]]


def _flag_sets(kernel: str, dtype: str, pairs: tuple[bool, ...], lowps: tuple[bool, ...]) -> Iterator[tuple[dict, str]]:
    """(kernel-specific flags, dw dtype) for every combination a launch can produce."""
    lowp_dtype = dtype if dtype in ("bf16", "fp16") else None
    dw_dtypes = [d for d, on in (("fp32", False), (lowp_dtype, True)) if on in lowps and d]
    if kernel == "forward":
        for grouped in (False, True):
            yield {"GROUPED": grouped}, "fp32"
    elif kernel == "frozen":
        for pair in pairs:
            yield {"PAIR": pair}, "fp32"
    elif kernel == "backward":
        for has_bias in (False, True):
            for dh, dw, db in _grads(has_bias):
                for filt, stagger in itertools.product((False, True), repeat=2):
                    flags = {"HAS_BIAS": has_bias, "COMPUTE_DH": dh, "COMPUTE_DW": dw, "COMPUTE_DB": db,
                             "FILTER": filt, "STAGGER": stagger}  # fmt: skip
                    for dw_dtype in dw_dtypes if dw else (["fp32"] if False in lowps else []):
                        yield flags, dw_dtype
    elif kernel == "grad_hidden":
        for filt, pair in itertools.product((False, True), pairs):
            yield {"FILTER": filt, "PAIR": pair}, "fp32"
    elif kernel == "grad_weight":
        for has_bias in (False, True):
            for dw, db in [(True, False), (False, True), (True, True)]:
                if db and not has_bias:
                    continue
                for filt, pair in itertools.product((False, True), pairs):
                    yield {"HAS_BIAS": has_bias, "COMPUTE_DW": dw, "COMPUTE_DB": db, "FILTER": filt, "PAIR": pair}, "fp32"
    else:  # pragma: no cover - table and code out of sync
        raise KeyError(kernel)


def _served(tagged: bool, sibling_exists: bool) -> tuple[bool, ...]:
    """Values of a tag an entry serves: only True for a tagged entry, only False when a tagged
    sibling exists, else both."""
    if tagged:
        return (True,)
    return (False,) if sibling_exists else (False, True)


def compile_targets(
    *,
    archs: tuple[str, ...] = ARCHS,
    dtypes: tuple[str, ...] = tuple(DTYPES),
    kernels: tuple[str, ...] | None = None,
    default_configs_only: bool = False,
) -> Iterator[CompileTarget]:
    """Every shipped specialization: arch x table entry x config x dtype x dot precision x flags.

    HAS_BIAS and HAS_SOFTCAP vary for every kernel; UPCAST=True is added for bf16 (with the
    "ieee" dot precision the interpreter launch uses). ``kernels`` filters by table entry name.
    """
    fns = _kernel_fns()
    for arch in archs:
        table = CONFIGS[arch]
        for name, classes in table.items():
            if kernels is not None and name not in kernels:
                continue
            base, pair, lowp, cap = entry_parts(name)
            stem = name.partition("+")[0]
            softcaps = _served(cap, f"{stem}+softcap" in table)
            pairs = _served(pair, f"{base}_pair" in table)
            lowps = _served(lowp, f"{base}_lowp" in table)
            for dtype in dtypes:
                cfgs = classes.get(dtype_class(_ELEMENT_SIZE[dtype]), [])
                for ci, cfg in enumerate(cfgs[:1] if default_configs_only else cfgs):
                    precisions = [(p, False) for p in DTYPES[dtype][1]]
                    if dtype == "bf16":
                        precisions.append(("ieee", True))
                    combos = itertools.product(precisions, _flag_sets(base, dtype, pairs, lowps))
                    for (precision, upcast), (flags, dw_dtype) in combos:
                        if upcast and dw_dtype != "fp32":
                            continue  # the launcher never accumulates in bf16 under the interpreter
                        bias_values = (flags["HAS_BIAS"],) if "HAS_BIAS" in flags else (False, True)
                        for has_bias, softcap in itertools.product(bias_values, softcaps):
                            full = {"HAS_BIAS": has_bias, "HAS_SOFTCAP": softcap, **flags,
                                    "UPCAST": upcast, "DOT_PRECISION": precision}  # fmt: skip
                            yield CompileTarget(name, fns[base], full, cfg, arch, dtype, dw_dtype, ci == 0)
