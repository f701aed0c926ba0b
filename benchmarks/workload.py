"""Benchmark cases and their inputs: shapes from real model heads, random data with a fixed seed.

A :class:`Case` names one measurement: an operation on N loss tokens of a head (H, V) in a dtype.

* ``op="loss"``: SafeDPO from hidden states, forward+backward. B pairs = 2B rows of T positions.
  **Same work for every implementation** (the default, ``prompt=False``): every position carries
  a loss (T = N / 2B), as if the batch had been compacted before the head, so all implementations
  compute exactly N tokens of logits. With ``prompt=True`` the first ``T // 8`` positions of every
  row are prompt (``ignore_index``), N = 2B * (T - T//8): ours drops them before the matmul, the
  others compute and mask them (what users see on uncompacted batches; not the default because
  the comparison is then not of equal work). A frozen reference head gets its own hidden states
  (forward only), as in ``FusedLinearSafeDPOLoss(ref_input=..., ref_weight=...)``; the pairs'
  unsafe flags cycle so T(D) swaps, drops and the margin are all exercised.
* ``op="logprobs"``: ``linear_logprobs`` forward+backward of ``sum(g * logp)`` on N tokens, no
  ignored tokens (the issue 3 kernel goal). ``frozen=True``: the head weight needs no gradient
  (LoRA / frozen ``lm_head``; the issue 13 frozen-head path).

Logits: ``logits="random"`` (hidden ~ N(0, 1), weight ~ N(0, 4/H): logits of std ~2, a nearly flat
softmax) or ``"lm"`` (each hidden row leans towards its label's weight row so that the label holds
most of the probability and the rest is spread over the vocabulary, as in a trained LM: what
gradient filtering sees in practice).
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
    prompt: bool = False
    frozen: bool = False
    logits: str = "random"

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
        if self.logits not in ("random", "lm"):
            raise ValueError(f"logits: expected 'random' or 'lm', got {self.logits!r}")
        if self.frozen and self.op != "logprobs":
            raise ValueError("frozen: only op='logprobs' has a frozen-head case")
        if self.logits == "lm" and self.op != "logprobs":
            raise ValueError("logits='lm': only op='logprobs' cases")

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
        """T: loss tokens per row, plus T//8 ignored prompt positions when ``prompt``."""
        t = self.loss_tokens_per_row
        if not self.prompt:
            return t
        while t - t // 8 < self.loss_tokens_per_row:
            t += 1
        return t

    @property
    def positions(self) -> int:
        """Positions an implementation that does not drop ignored tokens computes logits for."""
        return self.n if self.op == "logprobs" else self.rows * self.seq_len

    def label(self) -> str:
        extra = "".join([" frozen-head" if self.frozen else "", " +prompt" if self.prompt else "",
                         " lm-logits" if self.logits == "lm" else ""])
        return f"{self.op} {self.head} N={self.n} H={self.h} V={self.v} {self.dtype}{extra}"

    def as_dict(self) -> dict:
        return asdict(self)


def _randn(shape, gen, device, dtype, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Inputs of a case on ``device`` (generated in float32 there, then cast): leaves that need
    gradients have ``requires_grad``. Logits have std ~2 (hidden ~N(0,1), weight ~N(0, 4/H))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    weight = _randn((case.v, case.h), gen, device, dt, 2.0 / case.h**0.5).requires_grad_(not case.frozen)
    if case.op == "logprobs":
        labels = torch.randint(0, case.v, (case.n,), generator=gen, device=device)
        if case.logits == "lm":
            hidden = _lm_hidden(weight.detach(), labels, gen).to(dt).requires_grad_(True)
        else:
            hidden = _randn((case.n, case.h), gen, device, dt).requires_grad_(True)
        g = torch.randn(case.n, generator=gen, device=device)
        return {"hidden": hidden, "weight": weight, "labels": labels, "g": g}
    rows, t = case.rows, case.seq_len
    _input = _randn((rows, t, case.h), gen, device, dt).requires_grad_(True)
    ref_input = _randn((rows, t, case.h), gen, device, dt)
    # The reference head: the policy's weight plus a small perturbation (a fine-tuned policy).
    ref_weight = (weight.detach().float() + _randn((case.v, case.h), gen, device, torch.float32, 0.1 / case.h**0.5)).to(dt)
    target = torch.randint(0, case.v, (rows, t), generator=gen, device=device)
    if case.prompt:
        target[:, : t // 8] = IGNORE_INDEX
    # Flags: pairs cycle through (safe, safe), (unsafe, safe) -> swap, (safe, unsafe), (unsafe, unsafe) -> drop.
    idx = torch.arange(case.pairs, device=device)
    chosen_unsafe = (idx % 4 == 1) | (idx % 4 == 3)
    rejected_unsafe = (idx % 4 == 2) | (idx % 4 == 3)
    return {"_input": _input, "weight": weight, "target": target, "ref_input": ref_input, "ref_weight": ref_weight,
            "chosen_unsafe": chosen_unsafe, "rejected_unsafe": rejected_unsafe}


def _lm_hidden(weight: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, noise: float = 0.5) -> torch.Tensor:
    """float32 hidden rows pointing at their label's weight row: p(label) ~ 0.8, a flat tail."""
    import math

    h = weight.shape[1]
    w = weight[labels].float()
    direction = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scale = (weight.float().pow(2).sum(1).mean().sqrt()).item()  # typical row norm of the head
    peak = math.log(weight.shape[0]) + 1.5
    peak += (noise**2 + peak**2 / h) / 2  # the other logits' spread raises the log-partition
    noise_t = torch.randn(labels.shape[0], h, generator=gen, device=labels.device)
    return noise * noise_t / scale + (peak / scale) * direction


def grad_leaves(inputs: dict) -> dict:
    """The tensors whose gradients the benchmark reads, by output name (a frozen weight has none)."""
    if "hidden" in inputs:
        if not inputs["weight"].requires_grad:
            return {"grad_hidden": inputs["hidden"]}
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


def flops_per_nhv(case: Case, recompute: bool, *, frozen_fast: bool = True) -> float:
    """Cost-model FLOPs of one forward+backward in units of N*H*V (KERNEL_NOTES): 6 materialized,
    8 recomputing the logits in backward, +2 for the reference head's forward when op="loss".
    Frozen head (no weight gradient): 4 materialized, 4 for a fused path that accumulates the
    softmax-weighted rows in the forward (``frozen_fast``), 6 for a recomputing one."""
    if case.frozen:
        return 6.0 if recompute and not frozen_fast else 4.0
    per = 8.0 if recompute else 6.0
    return per + (2.0 if case.op == "loss" else 0.0)


def cost_flops(case: Case, recompute: bool, *, loss_tokens_only: bool = True, frozen_fast: bool = True) -> float:
    """Cost-model FLOPs (see :func:`flops_per_nhv`) over N loss tokens (``loss_tokens_only=False``:
    over every position, ignored prompt tokens included, what a masking implementation computes)."""
    n = case.n if loss_tokens_only else case.positions
    return flops_per_nhv(case, recompute, frozen_fast=frozen_fast) * n * case.h * case.v
