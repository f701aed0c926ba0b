"""Safety-preference data: load, select (T(D) and baselines), tokenize, collate; offline fixtures.

    from safedpo_kernels.data import load_pairs, select_pairs, tokenize_pairs, PaddedPairCollator
    ds, load_report = load_pairs("PKU-Alignment/PKU-SafeRLHF-30K", split="train")   # or "fixture:pku_tiny"
    ds, sel_report = select_pairs(ds, "safedpo")
    tok_ds, tok_report = tokenize_pairs(ds, tokenizer, max_length=512)
    batch = PaddedPairCollator(tokenizer.pad_token_id)(list(tok_ds.select(range(8))))

Names are imported lazily: importing this package does not import ``datasets`` or ``transformers``
(only the functions that need them do, when called). See docs/data.md.
"""

from __future__ import annotations

from safedpo_kernels._lazy import lazy_exports
from typing import TYPE_CHECKING

_EXPORTS = {
    "load_pairs": "load",
    "fixture_path": "load",
    "load_fixture_tokenizer": "load",
    "fixture_tokenizer_path": "load",
    "judge_long": "rule_judge",
    "prompt_category": "rule_judge",
    "select_pairs": "selections",
    "SELECTIONS": "selections",
    "tokenize_pairs": "tokenize",
    "build_prompts": "tokenize",
    "DEFAULT_TEMPLATE": "tokenize",
    "PaddedPairCollator": "collate",
    "PackedPairCollator": "collate",
    "shift_packed_labels": "collate",
    "judge_response": "judge",
    "LoadReport": "reports",
    "SelectionReport": "reports",
    "TokenizeReport": "reports",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from safedpo_kernels.data.collate import PackedPairCollator, PaddedPairCollator, shift_packed_labels
    from safedpo_kernels.data.judge import judge_response
    from safedpo_kernels.data.load import fixture_path, fixture_tokenizer_path, load_fixture_tokenizer, load_pairs
    from safedpo_kernels.data.rule_judge import judge_long, prompt_category
    from safedpo_kernels.data.reports import LoadReport, SelectionReport, TokenizeReport
    from safedpo_kernels.data.selections import SELECTIONS, select_pairs
    from safedpo_kernels.data.tokenize import DEFAULT_TEMPLATE, build_prompts, tokenize_pairs


__getattr__, __dir__ = lazy_exports("safedpo_kernels.data", _EXPORTS, globals())

