"""The implementations the loss benchmark compares, behind one small interface.

Each :class:`Impl` builds a ``step(inputs) -> (value, objective)`` for a :class:`~benchmarks.workload.Case`:
``value`` is what the correctness guard compares (the loss, or the per-token log-probs), and
``objective`` the scalar that ``backward()`` runs from. ``unavailable(case, device)`` says why an
implementation cannot run here (then the table shows the reason instead of a number).

| name | what | FLOPs (cost model) |
| --- | --- | --- |
| triton | ours, fused Triton kernels, exact | 8NHV (logits recomputed in backward) |
| triton[NAME] | ours, one kernel variant (``triton_linear_logprobs(variant=NAME)``; logprobs op) | 8NHV |
| triton-deterministic | ours, Triton, ``deterministic=True`` (owner-computes backward) | 10NHV |
| triton-filtered | ours, Triton with gradient filtering (``grad_filter=True``) | <= 8NHV |
| torch | ours, chunked PyTorch path (``impl="torch"``) | 8NHV |
| eager | ``safedpo_kernels.reference``: materialized logits (what users run today) | 6NHV |
| compile | ``torch.compile`` of the eager log-prob path + our loss | 6NHV |
| liger | Liger-Kernel ``LigerFusedLinearDPOLoss``: plain DPO (no T(D), no margin) | 6NHV |
| cce | Cut Cross-Entropy per-token log-probs (its default gradient filter) + our loss | <= 8NHV |

The reference head (op="loss") adds 2NHV for everyone. Frozen head (``Case.frozen``): 4NHV for
eager and for our fused frozen-head path (``workload.flops_per_nhv``). The kernel variants come
from ``safedpo_kernels.kernels.KERNEL_VARIANTS`` (:func:`kernel_variants`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.workload import BETA, DELTA, IGNORE_INDEX, Case, flops_per_nhv
from safedpo_kernels import FusedLinearSafeDPOLoss, linear_logprobs, safedpo_loss, sequence_logps
from safedpo_kernels.reference import reference_fused_safedpo, reference_linear_logprobs

Step = Callable[[dict], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Impl:
    name: str
    label: str
    loss_kind: str  # "safedpo" or "dpo": which reference its loss is compared with
    recompute: bool  # cost model: 8NHV (True) or 6NHV (False)
    build: Callable[[Case, torch.device], Step]
    unavailable: Callable[[Case, torch.device], "str | None"]
    warmup: int = 2
    note: str = ""
    nhv: float | None = None  # FLOPs per N*H*V when it differs from the recompute / materialize model
    frozen_fast: bool = True  # frozen head: a 4NHV fused path (False: forward + recompute backward, 6NHV)
    exact: bool = True  # False: approximate by design (gradient filtering)
    deterministic: bool = False  # bit-identical run to run (checked by scripts/gpu_check.py)
    frozen_only: bool = False  # a variant that differs from the default only on a frozen head

    def flops_per_nhv(self, case: Case) -> float:
        """Cost-model FLOPs of one forward+backward of this implementation, in units of N*H*V."""
        if self.nhv is not None and not case.frozen:
            return self.nhv + (2.0 if case.op == "loss" else 0.0)
        return flops_per_nhv(case, self.recompute, frozen_fast=self.frozen_fast)

    def flops(self, case: Case) -> float:
        return self.flops_per_nhv(case) * case.n * case.h * case.v


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _logprobs_objective(logp: torch.Tensor, inputs: dict):
    return logp, (logp * inputs["g"].to(logp.dtype)).sum()


def _safedpo_from_token_logps(token_logps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: dict):
    """SafeDPO from a per-token log-prob function f(hidden, weight) -> (rows, T) float32."""
    target = inputs["target"]
    seq = sequence_logps(token_logps(inputs["_input"], inputs["weight"]), target, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        ref = sequence_logps(token_logps(inputs["ref_input"], inputs["ref_weight"]), target, ignore_index=IGNORE_INDEX)
    b = seq.shape[0] // 2
    loss = safedpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], inputs["chosen_unsafe"], inputs["rejected_unsafe"],
                        beta=BETA, delta=DELTA)
    return loss, loss


#: Set to "1" (``scripts/gpu_check.py --dry-run``) to run the Triton rows through the CPU interpreter:
#: a code-path check, never a timing.
INTERPRETER_ROWS_ENV = "SAFEDPO_BENCH_INTERPRETER_ROWS"


def _triton_reason(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda" and os.environ.get(INTERPRETER_ROWS_ENV) != "1":
        return "CPU: Triton runs only through its interpreter here, which is not a performance path"
    try:
        from safedpo_kernels import triton_logprobs
    except ImportError as exc:
        return f"safedpo_kernels.triton_logprobs not importable ({exc})"
    return None if triton_logprobs.triton_is_usable(device) else "triton not usable on this device"


def _never(case: Case, device: torch.device) -> str | None:
    return None


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def _ours(impl: str, grad_filter: bool = False, deterministic: bool = False) -> Callable[[Case, torch.device], Step]:
    kw = {"impl": impl, "grad_filter": grad_filter, "deterministic": deterministic}

    def build(case: Case, device: torch.device) -> Step:
        if case.op == "logprobs":
            return lambda x: _logprobs_objective(linear_logprobs(x["hidden"], x["weight"], x["labels"], **kw), x)
        if grad_filter or deterministic:  # the module has no such switches: the same composition, by hand
            return lambda x: _safedpo_from_token_logps(lambda h, w: linear_logprobs(h, w, x["target"], **kw), x)
        module = FusedLinearSafeDPOLoss(beta=BETA, delta=DELTA, ignore_index=IGNORE_INDEX, impl=impl)

        def step(x):
            loss, _ = module(x["weight"], x["_input"], x["target"], chosen_unsafe=x["chosen_unsafe"],
                             rejected_unsafe=x["rejected_unsafe"],
                             ref_input=x["ref_input"], ref_weight=x["ref_weight"])
            return loss, loss

        return step

    return build


def kernel_variants() -> tuple[str, ...]:
    """``safedpo_kernels.kernels.KERNEL_VARIANTS`` (empty when the package has none or no triton)."""
    try:
        from safedpo_kernels import kernels
    except ImportError:
        return ()
    return tuple(getattr(kernels, "KERNEL_VARIANTS", ()))


#: ``KernelStats`` of the last build of each Triton row that reports them (``triton[NAME]``,
#: ``triton-filtered`` on the logprobs op): tiles skipped by filtering, frozen-head kernel used.
LAST_STATS: dict[str, object] = {}


def _direct(row: str, **kw) -> Callable[[Case, torch.device], Step]:
    """logprobs op through ``triton_linear_logprobs`` itself (no ignored tokens there, so the same work
    as ``linear_logprobs``), with a ``KernelStats`` kept in :data:`LAST_STATS` when the package has it."""

    def build(case: Case, device: torch.device) -> Step:
        from safedpo_kernels import triton_logprobs

        stats_cls = getattr(triton_logprobs, "KernelStats", None)
        if stats_cls is None:
            try:
                from safedpo_kernels.kernels import KernelStats as stats_cls
            except ImportError:
                stats_cls = None
        extra = {}
        if stats_cls is not None:
            extra["stats"] = LAST_STATS[row] = stats_cls()
        return lambda x: _logprobs_objective(
            triton_logprobs.triton_linear_logprobs(x["hidden"], x["weight"], x["labels"], None, **kw, **extra), x)

    return build


def _triton_exact(case: Case, device: torch.device) -> Step:
    if case.op == "logprobs":
        return _direct("triton")(case, device)
    return _ours("triton")(case, device)


def _filtered(case: Case, device: torch.device) -> Step:
    if case.op == "logprobs":
        return _direct("triton-filtered", grad_filter=True)(case, device)
    return _ours("triton", grad_filter=True)(case, device)


def _variant_impl(name: str) -> Impl:
    """The row of one kernel variant, with its cost model and mode from its ``KernelVariant``."""
    try:
        from safedpo_kernels.kernels import get_variant

        v = get_variant(name)
    except ImportError:
        v = None
    det = bool(getattr(v, "det_pair", False))
    return Impl(f"triton[{name}]", f"ours: Triton variant {name}", "safedpo", True, _direct(f"triton[{name}]", variant=name),
                _variant_reason, nhv=10.0 if det else None, frozen_fast=bool(getattr(v, "frozen_kernel", True)),
                exact=not getattr(v, "vocab_order", False), deterministic=det,
                frozen_only=bool(getattr(v, "frozen_pair", False)) or not getattr(v, "frozen_kernel", True),
                note=getattr(v, "description", ""))


def _variant_reason(case: Case, device: torch.device) -> str | None:
    if case.op != "logprobs":
        return "kernel variants are measured on the logprobs op (the loss adds the same small terms to each)"
    return _triton_reason(case, device)


# ---------------------------------------------------------------------------------------------
# Eager PyTorch and torch.compile
# ---------------------------------------------------------------------------------------------


def _build_eager(case: Case, device: torch.device) -> Step:
    if case.op == "logprobs":
        return lambda x: _logprobs_objective(reference_linear_logprobs(x["hidden"], x["weight"], x["labels"]), x)

    def step(x):
        loss, _ = reference_fused_safedpo(
            x["weight"], x["_input"], x["target"], x["chosen_unsafe"], x["rejected_unsafe"],
            ref_input=x["ref_input"], ref_weight=x["ref_weight"], beta=BETA, delta=DELTA, ignore_index=IGNORE_INDEX)
        return loss, loss

    return step


def eager_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The eager path without argument checks (graph-break free for torch.compile): logits in the
    input dtype, log-softmax in float32, gathered, 0 at ignore_index."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    valid = labels != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


#: torch.compile backend of the "compile" rows: inductor (what users get); ``scripts/gpu_check.py
#: --dry-run`` sets "eager" to exercise the row's code path without minutes of CPU compilation.
COMPILE_BACKEND_ENV = "SAFEDPO_BENCH_COMPILE_BACKEND"


def _build_compile(case: Case, device: torch.device) -> Step:
    compiled = torch.compile(eager_token_logps, dynamic=False, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
    if case.op == "logprobs":
        return lambda x: _logprobs_objective(compiled(x["hidden"], x["weight"], x["labels"]), x)
    return lambda x: _safedpo_from_token_logps(lambda h, w: compiled(h, w, x["target"]), x)


def _compile_reason(case: Case, device: torch.device) -> str | None:
    if device.type == "cpu" and not any(os.access(os.path.join(p, "g++"), os.X_OK)
                                        for p in os.environ.get("PATH", "").split(os.pathsep)):
        return "torch.compile on CPU needs a C++ compiler (g++ not found)"
    return None


# ---------------------------------------------------------------------------------------------
# Liger-Kernel
# ---------------------------------------------------------------------------------------------


def _liger_reason(case: Case, device: torch.device) -> str | None:
    if case.op != "loss" or case.frozen:
        return "Liger-Kernel has no per-token log-prob function with gradients (loss op only)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed (pip install liger-kernel)"
    return None


def _build_liger(case: Case, device: torch.device) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # compiled=True wraps its per-chunk step in torch.compile; on CPU that costs minutes of
    # compilation for no kernel of interest, so the CPU runs use its eager chunked path.
    module = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, compiled=device.type == "cuda",
                                     use_ref_model=True)

    def step(x):
        out = module(x["weight"], x["_input"], x["target"], ref_input=x["ref_input"], ref_weight=x["ref_weight"])
        loss = out[0] if isinstance(out, tuple) else out
        return loss, loss

    return step


# ---------------------------------------------------------------------------------------------
# Cut Cross-Entropy
# ---------------------------------------------------------------------------------------------


def _cce_reason(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "Cut Cross-Entropy's kernels need CUDA"
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy not installed"
    try:
        importlib.import_module("cut_cross_entropy")
    except Exception as exc:  # its import needs a working Triton/CUDA stack
        return f"cut_cross_entropy import failed: {type(exc).__name__}: {exc}"
    return None


def cce_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per token from CCE's per-token cross-entropy (0 at ignore_index)."""
    from cut_cross_entropy import linear_cross_entropy

    flat = hidden.reshape(-1, hidden.shape[-1])
    ce = linear_cross_entropy(flat, weight, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return (-ce.float()).reshape(labels.shape)


def _build_cce(case: Case, device: torch.device) -> Step:
    if case.op == "logprobs":
        return lambda x: _logprobs_objective(cce_token_logps(x["hidden"], x["weight"], x["labels"]), x)
    return lambda x: _safedpo_from_token_logps(lambda h, w: cce_token_logps(h, w, x["target"]), x)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

IMPLS: dict[str, Impl] = {
    i.name: i
    for i in [
        Impl("triton", "ours: Triton exact", "safedpo", True, _triton_exact, _triton_reason),
        Impl("triton-filtered", "ours: Triton, grad filter", "safedpo", True, _filtered, _triton_reason,
             exact=False, note="backward skips tiles whose softmax is below the dtype's resolution"),
        Impl("triton-deterministic", "ours: Triton, deterministic", "safedpo", True,
             _ours("triton", deterministic=True), _triton_reason, nhv=10.0, deterministic=True,
             note="owner-computes backward, bit-identical run to run (logits recomputed twice: 10NHV)"),
        Impl("torch", "ours: torch chunked", "safedpo", True, _ours("torch"), _never),
        Impl("eager", "eager PyTorch (logits materialized)", "safedpo", False, _build_eager, _never),
        Impl("compile", "torch.compile(eager)", "safedpo", False, _build_compile, _compile_reason, warmup=3),
        Impl("liger", "Liger LigerFusedLinearDPOLoss", "dpo", False, _build_liger, _liger_reason,
             note="plain DPO: Liger has no safety flags, T(D) or margin; compared with reference DPO"),
        Impl("cce", "Cut Cross-Entropy + our loss", "safedpo", True, _build_cce, _cce_reason, exact=False,
             note="CCE's default filter_eps='high' (gradient filtering on)"),
    ]
}
for _name in kernel_variants():
    IMPLS[f"triton[{_name}]"] = _variant_impl(_name)
