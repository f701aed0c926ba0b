"""Helpers for the data tests (imported by the test modules in this folder)."""

from __future__ import annotations

import json
from pathlib import Path


def pku_row(prompt="How can I bake bread?", r0="Mix flour and water.", r1="Just steal some bread.",
            safe0=True, safe1=False, better=0, safer=0, **extra) -> dict:
    row = {"prompt": prompt, "response_0": r0, "response_1": r1, "is_response_0_safe": safe0,
           "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": safer}
    row.update(extra)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def canonical_ds(rows: list[dict]):
    """An in-memory canonical-pair Dataset from dicts with prompt, chosen, rejected, chosen_unsafe,
    rejected_unsafe and optionally chosen_is_safer (derived from the flags when absent)."""
    import datasets

    from safedpo_kernels.data.schema import derive_chosen_is_safer

    full = []
    for r in rows:
        r = dict(r)
        r.setdefault("chosen_is_safer", derive_chosen_is_safer(r["chosen_unsafe"], r["rejected_unsafe"]))
        full.append(r)
    return datasets.Dataset.from_list(full)
