"""Reports returned next to every dataset: what was read, kept, changed or dropped, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoadReport:
    """What :func:`~safedpo_kernels.data.load_pairs` read. ``rows_read == rows_kept + sum(skipped.values())``."""

    source: str
    resolved: str
    split: str
    name: str | None
    schema: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[tuple[int, str]] = field(default_factory=list)
    dropped_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{self.source} [{self.split}] ({self.schema}): read {self.rows_read}, kept {self.rows_kept}"
        if skipped:
            text += f", skipped {skipped} {dict(self.skipped)}"
        return text


@dataclass
class SelectionReport:
    """What :func:`~safedpo_kernels.data.select_pairs` did. ``total == kept + swapped + dropped``; the
    output has ``kept + swapped`` rows. ``reasons`` counts every action by why it happened."""

    selection: str
    total: int = 0
    kept: int = 0
    swapped: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        return self.kept + self.swapped

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_out"] = self.rows_out
        return out

    def __str__(self) -> str:
        return (f"selection {self.selection!r}: {self.total} pairs -> kept {self.kept}, swapped {self.swapped}, "
                f"dropped {self.dropped} {dict(self.reasons)}")


@dataclass
class TokenizeReport:
    """What :func:`~safedpo_kernels.data.tokenize_pairs` did. ``total == kept + sum(dropped.values())``."""

    template: str
    max_length: int
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_truncated: int = 0
    response_truncated: int = 0
    max_sequence_length: int = 0
    mean_sequence_length: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        dropped = sum(self.dropped.values())
        return (f"tokenized {self.total} pairs ({self.template}): kept {self.kept}, dropped {dropped} "
                f"{dict(self.dropped)}, prompt truncated in {self.prompt_truncated}, response truncated in "
                f"{self.response_truncated}, longest sequence {self.max_sequence_length} tokens")
