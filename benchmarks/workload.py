"""Benchmark cases and their inputs: shapes from real model heads, random data with a fixed seed.

A :class:`Case` names one measurement: an operation on N loss tokens of a head (H, V) in a dtype.

* ``op="loss"``: SafeDPO from hidden states, forward+backward. B pairs = 2B rows of T positions;
  the first ``T // 8`` positions of every row are prompt (``ignore_index``), so N = 2B * (T - T//8)
  tokens carry a loss. A frozen reference head gets its own hidden states (forward only), as in
  ``FusedLinearSafeDPOLoss(ref_input=..., ref_weight=...)``; half of the pairs carry unsafe flags
  so T(D) swaps, drops and the margin are all exercised.
* ``op="logprobs"``: ``linear_logprobs`` forward+backward of ``sum(g * logp)`` on N tokens, no
  ignored tokens (the issue 3 kernel goal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

#: Heads of real models the GPU preset uses: name -> (H, V).
HEADS = {
    "llama3-8b": (4096, 128256),
    "llama2-13b": (5120, 32000),
    "gemma2-2b": (2304, 256000),
    "qwen3.5-cce": (2048, 248320),  # the TRL PR 6858 / Cut Cross-Entropy comparison shape
}
IGNORE_INDEX = -100
ROWS_PER_PAIR = 2
BETA = 0.1
DELTA = 10.0


@dataclass(frozen=True)
class Case:
    """One benchmark shape. ``n`` = loss tokens; ``pairs`` only matters for op="loss"."""

    op: str
    n: int
    h: int
    v: int
    dtype: str
    head: str = "custom"
    pairs: int = 4

    def __post_init__(self):
        if self.op not in ("loss", "logprobs"):
            raise ValueError(f"op: expected 'loss' or 'logprobs', got {self.op!r}")
        for name in ("n", "h", "v", "pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not hasattr(torch, self.dtype) or not isinstance(getattr(torch, self.dtype), torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype name, got {self.dtype!r}")
        if self.op == "loss" and self.n % (ROWS_PER_PAIR * self.pairs):
            raise ValueError(f"n: expected a multiple of 2 * pairs = {2 * self.pairs}, got {self.n}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def rows(self) -> int:
        return ROWS_PER_PAIR * self.pairs

    @property
    def loss_tokens_per_row(self) -> int:
        return self.n // self.rows

    @property
    def seq_len(self) -> int:
        """T such that T - T//8 == loss tokens per row (prompt = T//8 ignored positions)."""
        t = self.loss_tokens_per_row
        while t - t // 8 < self.loss_tokens_per_row:
            t += 1
        return t

    @property
    def positions(self) -> int:
        """Positions an implementation that does not drop ignored tokens computes logits for."""
        return self.n if self.op == "logprobs" else self.rows * self.seq_len

    def label(self) -> str:
        return f"{self.op} {self.head} N={self.n} H={self.h} V={self.v} {self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


def _randn(shape, gen, device, dtype, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Inputs of a case on ``device`` (generated in float32 there, then cast): leaves that need
    gradients have ``requires_grad``. Logits have std ~2 (hidden ~N(0,1), weight ~N(0, 4/H))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    weight = _randn((case.v, case.h), gen, device, dt, 2.0 / case.h**0.5).requires_grad_(True)
    if case.op == "logprobs":
        hidden = _randn((case.n, case.h), gen, device, dt).requires_grad_(True)
        labels = torch.randint(0, case.v, (case.n,), generator=gen, device=device)
        g = torch.randn(case.n, generator=gen, device=device)
        return {"hidden": hidden, "weight": weight, "labels": labels, "g": g}
    rows, t = case.rows, case.seq_len
    _input = _randn((rows, t, case.h), gen, device, dt).requires_grad_(True)
    ref_input = _randn((rows, t, case.h), gen, device, dt)
    # The reference head: the policy's weight plus a small perturbation (a fine-tuned policy).
    ref_weight = (weight.detach().float() + _randn((case.v, case.h), gen, device, torch.float32, 0.1 / case.h**0.5)).to(dt)
    target = torch.randint(0, case.v, (rows, t), generator=gen, device=device)
    target[:, : t // 8] = IGNORE_INDEX
    # Flags: pairs cycle through (safe, safe), (unsafe, safe) -> swap, (safe, unsafe), (unsafe, unsafe) -> drop.
    idx = torch.arange(case.pairs, device=device)
    chosen_unsafe = (idx % 4 == 1) | (idx % 4 == 3)
    rejected_unsafe = (idx % 4 == 2) | (idx % 4 == 3)
    return {"_input": _input, "weight": weight, "target": target, "ref_input": ref_input, "ref_weight": ref_weight,
            "chosen_unsafe": chosen_unsafe, "rejected_unsafe": rejected_unsafe}


def grad_leaves(inputs: dict) -> dict:
    """The tensors whose gradients the benchmark reads, by output name."""
    if "hidden" in inputs:
        return {"grad_hidden": inputs["hidden"], "grad_weight": inputs["weight"]}
    return {"grad_input": inputs["_input"], "grad_weight": inputs["weight"]}


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def grad_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in grad_leaves(inputs).values())


def upcast(inputs: dict, dtype: torch.dtype = torch.float64) -> dict:
    """A copy of the inputs with float tensors in ``dtype`` (grad leaves re-made as leaves)."""
    leaves = {id(t) for t in grad_leaves(inputs).values()}
    out = {}
    for k, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and k != "g":
            c = t.detach().to(dtype)
            out[k] = c.requires_grad_(True) if id(t) in leaves else c
        else:
            out[k] = t
    return out


def cost_flops(case: Case, recompute: bool, *, loss_tokens_only: bool = True) -> float:
    """Cost-model FLOPs of one forward+backward (KERNEL_NOTES): 6NHV materialized, 8NHV recomputing
    the logits in backward, plus 2NHV for the reference head's forward when op="loss".
    N = loss tokens (ignored prompt tokens are not counted even where an implementation computes them)."""
    n = case.n if loss_tokens_only else case.positions
    per = 8 if recompute else 6
    if case.op == "loss":
        per += 2
    return float(per) * n * case.h * case.v
