"""Canonical pair format and the adapters that map source rows onto it.

Canonical columns (one row = one preference pair in **helpfulness** order):

=================  =====  =========================================================================
column             type   meaning
=================  =====  =========================================================================
prompt             str    the user request (no template applied)
chosen             str    the response preferred for helpfulness (``y_w``)
rejected           str    the other response (``y_l``)
chosen_unsafe      bool   ``h_w``: True when ``chosen`` is UNSAFE
rejected_unsafe    bool   ``h_l``: True when ``rejected`` is UNSAFE
chosen_is_safer    bool   True when ``chosen`` is the safer response (``safer_response_id``; when the
                          source has no safer label: chosen safe and rejected unsafe, or equal flags)
ref_chosen_logps   float  optional: precomputed reference log-prob of ``chosen`` (carried through)
ref_rejected_logps float  optional: the same for ``rejected``
=================  =====  =========================================================================

Adapters: :data:`PKU` (PKU-SafeRLHF / -30K rows: ``is_response_*_safe`` is True for SAFE, the
opposite polarity of the unsafe flags), ``canonical`` (rows already in the format above) and a user
``column_mapping`` (canonical or PKU column name -> the user's column name; ``chosen_safe`` /
``rejected_safe`` may be mapped instead of the unsafe flags when the user's flags mean SAFE).
"""

from __future__ import annotations

import numbers
from typing import Any

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
FLAG_COLUMNS = ("chosen_unsafe", "rejected_unsafe")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
CANONICAL_COLUMNS = TEXT_COLUMNS + FLAG_COLUMNS + ("chosen_is_safer",)

PKU_REQUIRED = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                "better_response_id")
PKU_OPTIONAL = ("safer_response_id",)
# Canonical sources may give safe flags instead of unsafe ones (True = SAFE).
SAFE_FLAG_ALIASES = {"chosen_unsafe": "chosen_safe", "rejected_unsafe": "rejected_safe"}
MAPPABLE = set(CANONICAL_COLUMNS) | set(REF_COLUMNS) | set(SAFE_FLAG_ALIASES.values()) | set(PKU_REQUIRED) | set(
    PKU_OPTIONAL)


class RowError(ValueError):
    """A bad value in one row; ``reason`` is the short, countable description."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def as_flag(value: Any, column: str) -> bool:
    """A bool from a bool or an integer 0/1 (numpy scalars included); anything else raises RowError."""
    if isinstance(value, bool) or (getattr(getattr(value, "dtype", None), "kind", None) == "b"
                                   and getattr(value, "ndim", None) == 0):
        return bool(value)  # Python or NumPy bool
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    raise RowError(f"{column}: not a bool or 0/1", f"got {value!r} ({type(value).__name__})")


def as_response_id(value: Any, column: str) -> int:
    """0 or 1 from an integer (bools are rejected: an id is not a flag)."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return int(value)
    raise RowError(f"{column}: not 0 or 1", f"got {value!r} ({type(value).__name__})")


def as_text(value: Any, column: str) -> str:
    """A non-empty string (whitespace-only counts as empty); returned unchanged."""
    if value is None:
        raise RowError(f"{column}: missing text", "got None")
    if not isinstance(value, str):
        raise RowError(f"{column}: not a string", f"got {value!r} ({type(value).__name__})")
    if not value.strip():
        raise RowError(f"{column}: empty text", f"got {value!r}")
    return value


def as_logp(value: Any, column: str) -> float:
    """A float reference log-prob (NaN is kept: it is never hidden, the loss will show it)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise RowError(f"{column}: not a number", f"got {value!r} ({type(value).__name__})")


def derive_chosen_is_safer(chosen_unsafe: bool, rejected_unsafe: bool) -> bool:
    """Without a safer label: chosen is safer unless it is unsafe and rejected is safe (ties keep chosen)."""
    return not (chosen_unsafe and not rejected_unsafe)


def adapt_pku_row(row: dict[str, Any]) -> dict[str, Any]:
    """One PKU-SafeRLHF row -> canonical pair (chosen = ``response_{better_response_id}``)."""
    better = as_response_id(row["better_response_id"], "better_response_id")
    safe = (as_flag(row["is_response_0_safe"], "is_response_0_safe"),
            as_flag(row["is_response_1_safe"], "is_response_1_safe"))
    texts = (as_text(row["response_0"], "response_0"), as_text(row["response_1"], "response_1"))
    other = 1 - better
    out = {
        "prompt": as_text(row["prompt"], "prompt"),
        "chosen": texts[better],
        "rejected": texts[other],
        "chosen_unsafe": not safe[better],
        "rejected_unsafe": not safe[other],
    }
    safer = row.get("safer_response_id")
    if safer is None and "safer_response_id" in row:
        raise RowError("safer_response_id: not 0 or 1", "got None")
    if safer is None:
        out["chosen_is_safer"] = derive_chosen_is_safer(out["chosen_unsafe"], out["rejected_unsafe"])
    else:
        out["chosen_is_safer"] = as_response_id(safer, "safer_response_id") == better
    return out


def adapt_canonical_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row already in canonical form (possibly with ``*_safe`` flags instead of ``*_unsafe``)."""
    out: dict[str, Any] = {name: as_text(row[name], name) for name in TEXT_COLUMNS}
    for name in FLAG_COLUMNS:
        if name in row:
            out[name] = as_flag(row[name], name)
        else:
            alias = SAFE_FLAG_ALIASES[name]
            out[name] = not as_flag(row[alias], alias)
    if row.get("chosen_is_safer") is not None:
        out["chosen_is_safer"] = as_flag(row["chosen_is_safer"], "chosen_is_safer")
    elif "chosen_is_safer" in row:
        raise RowError("chosen_is_safer: not a bool or 0/1", "got None")
    else:
        out["chosen_is_safer"] = derive_chosen_is_safer(out["chosen_unsafe"], out["rejected_unsafe"])
    for name in REF_COLUMNS:
        if name in row:
            out[name] = as_logp(row[name], name)
    return out


def detect_schema(columns: list[str]) -> str:
    """``"pku"`` or ``"canonical"`` from the column names; ValueError naming what is missing."""
    cols = set(columns)
    if cols.issuperset(PKU_REQUIRED):
        return "pku"
    canonical_ok = cols.issuperset(TEXT_COLUMNS) and all(
        name in cols or alias in cols for name, alias in SAFE_FLAG_ALIASES.items()
    )
    if canonical_ok:
        return "canonical"
    missing_pku = [c for c in PKU_REQUIRED if c not in cols]
    missing_canonical = [c for c in TEXT_COLUMNS if c not in cols] + [
        f"{name} (or {alias})" for name, alias in SAFE_FLAG_ALIASES.items() if name not in cols and alias not in cols
    ]
    raise ValueError(
        f"columns: expected the PKU-SafeRLHF schema (missing {missing_pku}) or the canonical pair schema "
        f"(missing {missing_canonical}); the data has {sorted(cols)}. Pass column_mapping="
        "{'prompt': ..., 'chosen': ..., 'rejected': ..., 'chosen_unsafe': ..., 'rejected_unsafe': ...} "
        "to map your own columns."
    )


def check_column_mapping(column_mapping: Any, columns: list[str]) -> dict[str, str]:
    """Validate ``column_mapping`` (target name -> source column) against the data's columns."""
    if not isinstance(column_mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in column_mapping.items()
    ):
        raise TypeError(f"column_mapping: expected a dict of str -> str, got {column_mapping!r}")
    unknown = sorted(set(column_mapping) - MAPPABLE)
    if unknown:
        raise ValueError(f"column_mapping: unknown target names {unknown}; expected some of {sorted(MAPPABLE)}")
    absent = sorted(v for v in column_mapping.values() if v not in columns)
    if absent:
        raise ValueError(f"column_mapping: source columns {absent} are not in the data (it has {sorted(columns)})")
    return dict(column_mapping)
