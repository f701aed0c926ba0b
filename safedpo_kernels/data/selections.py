"""Pair selections over canonical pairs: SafeDPO's T(D) and the paper's DPO baselines.

=============  ==============================================================================
selection      what it does (input: helpfulness-ordered pairs, chosen = better)
=============  ==============================================================================
safedpo        T(D): keep when chosen is safe; swap when chosen is unsafe and rejected safe;
               drop when both are unsafe. Afterwards ``chosen_unsafe`` is False everywhere.
better         DPO-Helpful: keep every pair as is (chosen = better response).
safer          DPO-Harmless: chosen = the safer response (swap where ``chosen_is_safer`` is False).
safe_better    DPO-SafeBetter: keep better pairs whose chosen response is safe, drop the others.
=============  ==============================================================================

``safedpo_loss`` applies T(D) itself, so feeding it ``better`` pairs or ``safedpo`` pairs trains the same
objective (T is idempotent); the ``safedpo`` selection makes the swaps and drops visible up front.
"""

from __future__ import annotations

from collections import Counter

from safedpo_kernels.data.reports import SelectionReport
from safedpo_kernels.data.schema import REF_COLUMNS

__all__ = ["select_pairs", "SELECTIONS"]

SELECTIONS = ("safedpo", "better", "safer", "safe_better")
_REQUIRED = ("prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe", "chosen_is_safer")


def _decide(selection: str, chosen_unsafe: bool, rejected_unsafe: bool, chosen_is_safer: bool) -> tuple[str, str]:
    """(action in keep/swap/drop, reason) for one pair."""
    if selection == "safedpo":
        if not chosen_unsafe:
            return "keep", "chosen safe" + (", rejected unsafe" if rejected_unsafe else ", rejected safe")
        if not rejected_unsafe:
            return "swap", "chosen unsafe, rejected safe"
        return "drop", "both unsafe"
    if selection == "better":
        return "keep", "helpfulness order"
    if selection == "safer":
        return ("keep", "chosen is safer") if chosen_is_safer else ("swap", "rejected is safer")
    if selection == "safe_better":
        return ("keep", "chosen safe") if not chosen_unsafe else ("drop", "chosen unsafe")
    raise ValueError(f"selection: expected one of {list(SELECTIONS)}, got {selection!r}")


def _apply(batch: dict[str, list], *, selection: str) -> dict[str, list]:
    out = {k: list(v) for k, v in batch.items()}
    out["_action"], out["_reason"] = [], []
    swap_pairs = [("chosen", "rejected"), ("chosen_unsafe", "rejected_unsafe")] + (
        [REF_COLUMNS] if all(c in batch for c in REF_COLUMNS) else []
    )
    for i in range(len(batch["prompt"])):
        action, reason = _decide(selection, batch["chosen_unsafe"][i], batch["rejected_unsafe"][i],
                                 batch["chosen_is_safer"][i])
        if action == "swap":
            for a, b in swap_pairs:
                out[a][i], out[b][i] = batch[b][i], batch[a][i]
            out["chosen_is_safer"][i] = not batch["chosen_is_safer"][i]
        out["_action"].append(action)
        out["_reason"].append(f"{action}: {reason}")
    return out


def select_pairs(ds, selection: str):
    """Apply a pair selection to canonical pairs (the output of :func:`load_pairs`).

    Args:
        ds: ``datasets.Dataset`` with columns ``prompt, chosen, rejected, chosen_unsafe,
            rejected_unsafe, chosen_is_safer`` (other columns are carried; ``ref_chosen_logps`` /
            ``ref_rejected_logps`` are swapped together with the responses).
        selection: ``"safedpo"``, ``"better"``, ``"safer"`` or ``"safe_better"``.

    Returns:
        ``(dataset, SelectionReport)``; the dataset has the same columns, ``kept + swapped`` rows, in
        the input order. The report counts kept / swapped / dropped and every reason.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection: expected one of {list(SELECTIONS)}, got {selection!r}")
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"ds: expected a datasets.Dataset (from load_pairs), got {type(ds).__name__}")
    missing = [c for c in _REQUIRED if c not in ds.column_names]
    if missing:
        raise ValueError(f"ds: missing canonical columns {missing} (load data with load_pairs first)")
    report = SelectionReport(selection=selection, total=len(ds))
    if len(ds) == 0:
        return ds, report
    marked = ds.map(_apply, batched=True, fn_kwargs={"selection": selection}, desc=f"selection {selection}")
    action_list = list(marked["_action"])
    actions = Counter(action_list)
    report.kept, report.swapped, report.dropped = actions["keep"], actions["swap"], actions["drop"]
    report.reasons = dict(sorted(Counter(marked["_reason"]).items()))
    if report.dropped:
        marked = marked.select([i for i, a in enumerate(action_list) if a != "drop"])
    return marked.remove_columns(["_action", "_reason"]), report
