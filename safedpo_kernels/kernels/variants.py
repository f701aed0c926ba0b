"""Kernel variants: selectable implementations of the same math, so one GPU run can pick defaults.

``triton_linear_logprobs(..., variant="name")`` (or ``variant=None`` for "default") selects one.
Every variant computes the same log-probs and gradients (tested against float64 in the
interpreter and compiled by the compile gate); they differ in launch order, accumulation scheme
and memory traffic. Which one is expected to win, and why, is in docs/kernels.md; until a GPU run
decides, "default" is today's kernels. A variant that belongs to a mode switches that mode on
("det_pair" implies ``deterministic=True``, "filter_sorted" implies ``grad_filter=True``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelVariant:
    """One selectable kernel configuration (all fields False = today's kernels)."""

    name: str
    description: str
    #: forward: 1-D launch in grouped order (GROUP_M token blocks x all vocabulary splits run
    #: together) and a split count that fills whole waves of one program per SM.
    grouped_forward: bool = False
    #: backward (atomics): each program walks the hidden dimension starting at a different
    #: block (rotation by its tile id), so concurrent programs add into different addresses.
    stagger: bool = False
    #: backward (atomics), 16-bit inputs: grad_weight accumulated with atomics directly in the
    #: weight's dtype (each tile's partial product is float32); half the accumulator memory
    #: and atomic traffic, at 16-bit rounding per addition (error measured in docs/kernels.md).
    dw_lowp: bool = False
    #: deterministic mode: two tiles of the walked dimension per accumulator step, so the float32
    #: accumulator rows are loaded and stored half as often. Implies ``deterministic=True``.
    det_pair: bool = False
    #: gradient filtering with the vocabulary ordered by mean logit (Cut Cross-Entropy's
    #: ordering): likely columns cluster in few blocks, so more tiles are skipped. Implies
    #: ``grad_filter=True``.
    vocab_order: bool = False
    #: frozen head (only hidden needs a gradient): use the frozen-head kernel (4NHV) rather than
    #: the forward + recompute backward (8NHV).
    frozen_kernel: bool = True
    #: frozen-head kernel with two vocabulary blocks per update of its float32 (M, H) accumulator:
    #: half the accumulator traffic, one more logits tile in registers (smaller tiles).
    frozen_pair: bool = False


VARIANTS: dict[str, KernelVariant] = {
    v.name: v
    for v in (
        KernelVariant("default", "today's kernels: 2-D forward grid, ~2 programs/SM of vocabulary splits, atomics backward"),
        KernelVariant("fwd_grouped", "forward in grouped (L2-friendly) tile order with a full-wave split count", grouped_forward=True),
        KernelVariant("bwd_stagger", "atomics backward with a per-program rotation of the hidden-dimension order", stagger=True),
        KernelVariant("dw_lowp", "grad_weight accumulated in the 16-bit input dtype with float32 tile partials", dw_lowp=True),
        KernelVariant("det_pair", "deterministic mode with two tiles per float32 accumulator load/store", det_pair=True),
        KernelVariant("filter_sorted", "gradient filtering on a vocabulary sorted by mean logit", vocab_order=True),
        KernelVariant("fwd_grouped+bwd_stagger", "both launch-order changes together", grouped_forward=True, stagger=True),
        KernelVariant("frozen_pair", "frozen-head kernel updating its accumulator once per two vocabulary blocks", frozen_pair=True),
        KernelVariant("no_frozen_kernel", "frozen head through the forward + recompute backward (for comparison)", frozen_kernel=False),
    )
}

#: Public names of the variants, "default" first.
KERNEL_VARIANTS: tuple[str, ...] = tuple(VARIANTS)


def get_variant(name: str | None) -> KernelVariant:
    """The variant called ``name`` (None -> "default"); ValueError naming the choices otherwise."""
    if name is None:
        return VARIANTS["default"]
    if not isinstance(name, str) or name not in VARIANTS:
        raise ValueError(f"variant: expected None or one of {KERNEL_VARIANTS}, got {name!r}")
    return VARIANTS[name]


@dataclass
class KernelStats:
    """What the kernels did, filled in by each backward of ``triton_linear_logprobs(...,
    stats=KernelStats())`` (adds up over several backwards). Reading ``skipped_fraction`` or
    ``skipped_tiles`` synchronizes with the device once.

    Fields:
        variant: name of the variant that ran.
        frozen_head: True when the frozen-head kernel ran (no backward matmul at all).
        evaluated_tiles: (token block x vocabulary block) tiles the backward kernels examined
            (the deterministic mode examines each tile twice, once per kernel).
        skipped_counter: int32 (1,) device tensor: tiles skipped by gradient filtering.
    """

    variant: str = "default"
    frozen_head: bool = False
    evaluated_tiles: int = 0
    skipped_counter: "torch.Tensor | None" = None

    def counter(self, device) -> "torch.Tensor":
        """The device counter the kernels add into (created on first use)."""
        import torch

        if self.skipped_counter is None:
            self.skipped_counter = torch.zeros(1, dtype=torch.int32, device=device)
        return self.skipped_counter

    @property
    def skipped_tiles(self) -> int:
        return 0 if self.skipped_counter is None else int(self.skipped_counter.item())

    @property
    def skipped_fraction(self) -> float:
        """Skipped tiles / evaluated tiles (0.0 before any backward)."""
        return self.skipped_tiles / self.evaluated_tiles if self.evaluated_tiles else 0.0
