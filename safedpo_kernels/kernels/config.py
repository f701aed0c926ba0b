"""Block configurations for the log-prob kernels: one table, one default per architecture.

Every launch picks its block sizes here. ``CONFIGS[arch][kernel][dtype_class]`` is a list whose
first entry is the default; the others are the candidates tried when autotuning is switched on
with ``SAFEDPO_TRITON_AUTOTUNE=1`` (never under the interpreter). Autotuning results are cached
per process, keyed on the kernel, the dtype, the vocabulary and hidden sizes and the token count
rounded up to a power of two, so a new batch length does not retune.

Entries ``"<kernel>_pair"``, ``"<kernel>_lowp"``, ``"<kernel>+softcap"`` (and combinations), where
present, serve that kernel's launches with PAIR, a 16-bit grad_weight accumulator or a logit softcap
(``entry_name``); the plain entry then serves only the other launches.

Architectures: ``"sm90"`` (Hopper; also used for newer cards), ``"sm80"`` (Ampere, Ada and
anything older). Dtype classes: ``"16bit"`` (bfloat16, float16) and ``"32bit"`` (float32).
``scripts/compile_gate.py`` compiles every entry of this table for sm_90a and sm_80 and fails on
spills or on a Hopper matmul that is not HGMMA of the input's type; the committed table is in
``benchmarks/results/compile_gate.txt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes (tokens x vocab x hidden) and launch options of one kernel launch."""

    block_m: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def meta(self) -> dict[str, int]:
        """Keyword arguments for the kernel launch."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_V": self.block_v,
            "BLOCK_H": self.block_h,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_v}x{self.block_h} w{self.num_warps} s{self.num_stages}"


_C = BlockConfig
KERNELS = ("forward", "backward", "grad_hidden", "grad_weight", "frozen")
ARCHS = ("sm90", "sm80")

# Kernel names: "forward" (online LSE + target logit), "backward" (fused grad_hidden + grad_weight
# with fp32 atomics, the default), "grad_hidden" / "grad_weight" (the deterministic pair), "frozen"
# (frozen-head forward that also accumulates d logp / d hidden).
CONFIGS: dict[str, dict[str, dict[str, list[BlockConfig]]]] = {
    "sm90": {
        "forward": {
            "16bit": [_C(128, 128, 32, 8, 4), _C(128, 128, 64, 8, 2)],  # s3: fp16 spilled 4 B (grouped, bias, cap)
            "32bit": [_C(64, 128, 32, 8, 3)],
        },
        "backward": {
            "16bit": [_C(128, 128, 32, 8, 3), _C(128, 64, 64, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "backward+softcap": {
            "16bit": [_C(128, 64, 32, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "backward_lowp": {  # 16-bit inputs only (a float32 input accumulates in float32)
            "16bit": [_C(128, 64, 32, 8, 3)],
        },
        "grad_hidden": {
            "16bit": [_C(128, 64, 32, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 3)],
        },
        "grad_hidden_pair": {  # fp32: tiles of 32 rows are too small for HGMMA (tf32 became HMMA)
            "16bit": [_C(64, 64, 64, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "grad_weight_pair": {  # fp32: 32 rows -> HMMA; 64x64x16/32 spilled 32-64 B in ieee
            "16bit": [_C(64, 64, 64, 8, 3)],
            "32bit": [_C(64, 64, 8, 8, 2)],
        },
        "grad_weight+softcap": {
            "16bit": [_C(64, 64, 32, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "grad_weight": {
            "16bit": [_C(128, 64, 64, 8, 3), _C(64, 128, 64, 8, 2)],  # s3 spilled 24 B (db, dw, filter)
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "frozen": {
            "16bit": [_C(128, 64, 64, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "frozen_pair": {  # fp32: 32 rows -> HMMA; 64x64x32 spilled 48 B in ieee
            "16bit": [_C(64, 64, 64, 8, 3)],
            "32bit": [_C(64, 64, 16, 8, 2)],
        },
    },
    "sm80": {
        "forward": {
            "16bit": [_C(128, 64, 64, 8, 3), _C(128, 128, 32, 8, 3)],
            "32bit": [_C(64, 128, 32, 8, 2)],
        },
        "backward": {
            "16bit": [_C(64, 128, 32, 8, 3), _C(128, 64, 32, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "grad_hidden": {
            "16bit": [_C(64, 128, 32, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "grad_hidden_pair": {
            "16bit": [_C(64, 64, 32, 8, 3)],
            "32bit": [_C(32, 64, 32, 8, 2)],
        },
        "grad_weight_pair": {
            "16bit": [_C(64, 64, 32, 8, 3)],
            "32bit": [_C(32, 64, 32, 8, 2)],
        },
        "grad_weight": {  # fp32 ieee with db, dw and filtering spilled 20 B at 64x64x32
            "16bit": [_C(64, 128, 32, 8, 3)],
            "32bit": [_C(64, 64, 16, 8, 2)],
        },
        "grad_weight+softcap": {  # fp32 ieee with the cap and filtering spilled 8 B at 64x64x32
            "16bit": [_C(64, 128, 32, 8, 3)],
            "32bit": [_C(32, 64, 32, 8, 2)],
        },
        "frozen": {
            "16bit": [_C(128, 64, 64, 8, 3)],
            "32bit": [_C(64, 64, 32, 8, 2)],
        },
        "frozen_pair": {
            "16bit": [_C(64, 64, 64, 8, 3)],
            "32bit": [_C(32, 64, 32, 8, 2)],
        },
    },
}

#: Small tiles for the CPU interpreter: tests use shapes such as N=37, H=72, V=333, which then
#: span several blocks in every dimension with a ragged last block.
INTERPRETER_CONFIG = BlockConfig(16, 64, 32, 4, 1, group_m=2)

AUTOTUNE_ENV = "SAFEDPO_TRITON_AUTOTUNE"
_TUNED: dict[tuple, BlockConfig] = {}


def arch_of(capability: tuple[int, int]) -> str:
    """Table row for a CUDA compute capability: Hopper and newer -> "sm90", else "sm80"."""
    return "sm90" if capability[0] >= 9 else "sm80"


def dtype_class(element_size: int) -> str:
    return "32bit" if element_size >= 4 else "16bit"


def autotune_enabled(interpreting: bool) -> bool:
    """``SAFEDPO_TRITON_AUTOTUNE=1`` switches autotuning on; never under the interpreter."""
    return not interpreting and os.environ.get(AUTOTUNE_ENV, "0").lower() in ("1", "true", "yes")


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def entry_name(kernel: str, arch: str, *, softcap: bool = False, pair: bool = False, lowp: bool = False) -> str:
    """Most specific table entry for a launch: ``kernel[_pair][_lowp][+softcap]``, each tag used
    only where the table has such an entry (variants whose extra live values need smaller tiles:
    PAIR kernels, a 16-bit grad_weight accumulator, a logit softcap)."""
    table = CONFIGS[arch]
    name = kernel
    for tag, on in (("_pair", pair), ("_lowp", lowp)):
        if on and name + tag in table:
            name += tag
    if softcap and name + "+softcap" in table:
        name += "+softcap"
    return name


def entry_parts(name: str) -> tuple[str, bool, bool, bool]:
    """(kernel, pair, lowp, softcap) of a table entry name (inverse of ``entry_name``)."""
    base, _, cap = name.partition("+")
    pair, lowp = "_pair" in base, "_lowp" in base
    return base.replace("_pair", "").replace("_lowp", ""), pair, lowp, cap == "softcap"


def pick_config(
    kernel: str,
    *,
    arch: str | None,
    element_size: int,
    sizes: tuple[int, int, int],
    interpreting: bool,
    bench: Callable[[BlockConfig], float] | None = None,
    softcap: bool = False,
    pair: bool = False,
    lowp: bool = False,
) -> BlockConfig:
    """Block configuration for one launch.

    Args:
        kernel: one of ``KERNELS``.
        arch: "sm90" / "sm80" (None under the interpreter).
        element_size: bytes per input element (2 or 4).
        sizes: (tokens, vocab, hidden); tokens are bucketed to a power of two for the cache key.
        interpreting: True under ``TRITON_INTERPRET=1``: returns ``INTERPRETER_CONFIG``.
        bench: ``config -> milliseconds``; used only when autotuning is on.
        softcap, pair, lowp: the launch has HAS_SOFTCAP / PAIR / a 16-bit grad_weight accumulator;
            selects the ``entry_name`` table entry (smaller tiles where those need them).
    """
    if interpreting or arch is None:
        return INTERPRETER_CONFIG
    kernel = entry_name(kernel, arch, softcap=softcap, pair=pair, lowp=lowp)
    candidates = CONFIGS[arch][kernel][dtype_class(element_size)]
    if bench is None or len(candidates) == 1 or not autotune_enabled(interpreting):
        return candidates[0]
    m, v, h = sizes
    key = (kernel, arch, element_size, _bucket(m), v, h)
    if key not in _TUNED:
        timings = [(bench(cfg), i) for i, cfg in enumerate(candidates)]
        _TUNED[key] = candidates[min(timings)[1]]
    return _TUNED[key]


def all_configs() -> list[tuple[str, str, str, BlockConfig]]:
    """Every (arch, kernel, dtype class, config) in the table: what the compile gate compiles."""
    out = []
    for arch, kernels in CONFIGS.items():
        for kernel, classes in kernels.items():
            for cls, cfgs in classes.items():
                for cfg in cfgs:
                    out.append((arch, kernel, cls, cfg))
    return out
