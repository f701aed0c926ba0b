"""select_pairs: T(D) and the DPO baselines, with counted reasons; agreement with the loss's own T(D)."""

from __future__ import annotations

import pytest
import torch
from data_testutils import canonical_ds

from safedpo_kernels.data import load_pairs, select_pairs
from safedpo_kernels.losses import safety_transform

# all four (chosen_unsafe, rejected_unsafe) combinations, each with a distinct text and ref log-probs
FLAGS = [(False, False), (False, True), (True, False), (True, True)]


def _four_pairs(chosen_is_safer=None):
    rows = []
    for i, (cu, ru) in enumerate(FLAGS):
        row = {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_unsafe": cu,
               "rejected_unsafe": ru, "ref_chosen_logps": -float(i), "ref_rejected_logps": -10.0 - i}
        if chosen_is_safer is not None:
            row["chosen_is_safer"] = chosen_is_safer[i]
        rows.append(row)
    return canonical_ds(rows)


def test_safedpo_is_the_safety_transform():
    out, report = select_pairs(_four_pairs(), "safedpo")
    assert (report.kept, report.swapped, report.dropped, report.total, report.rows_out) == (2, 1, 1, 4, 3)
    assert report.reasons == {"drop: both unsafe": 1, "keep: chosen safe, rejected safe": 1,
                              "keep: chosen safe, rejected unsafe": 1, "swap: chosen unsafe, rejected safe": 1}
    assert out["prompt"] == ["p0", "p1", "p2"]
    assert out["chosen"] == ["c0", "c1", "r2"] and out["rejected"] == ["r0", "r1", "c2"]
    assert out["chosen_unsafe"] == [False, False, False]  # after T the winner is always safe
    assert out["rejected_unsafe"] == [False, True, True]
    # ref log-probs travel with their responses
    assert out["ref_chosen_logps"] == [0.0, -1.0, -12.0] and out["ref_rejected_logps"] == [-10.0, -11.0, -2.0]
    assert out["chosen_is_safer"] == [True, True, True]
    # idempotent: T(T(D)) == T(D)
    again, report2 = select_pairs(out, "safedpo")
    assert again.to_list() == out.to_list() and (report2.swapped, report2.dropped) == (0, 0)


def test_selection_agrees_with_loss_safety_transform():
    ds, _ = load_pairs("fixture:pku_tiny", split="train")
    cu, ru = torch.tensor(ds["chosen_unsafe"]), torch.tensor(ds["rejected_unsafe"])
    t = safety_transform(cu, ru)
    _, report = select_pairs(ds, "safedpo")
    assert report.dropped == int((~t.keep).sum())
    assert report.swapped == int(t.swap.sum())
    assert report.kept == int((t.keep & ~t.swap).sum())


def test_better_keeps_everything():
    out, report = select_pairs(_four_pairs(), "better")
    assert out.to_list() == _four_pairs().to_list()
    assert (report.kept, report.swapped, report.dropped) == (4, 0, 0)


def test_safer_orders_by_safer_label():
    ds = _four_pairs(chosen_is_safer=[False, True, False, True])
    out, report = select_pairs(ds, "safer")
    assert (report.kept, report.swapped, report.dropped) == (2, 2, 0)
    assert out["chosen"] == ["r0", "c1", "r2", "c3"]
    assert out["chosen_unsafe"] == [False, False, False, True]
    assert out["rejected_unsafe"] == [False, True, True, True]
    assert out["chosen_is_safer"] == [True] * 4
    assert out["ref_chosen_logps"] == [-10.0, -1.0, -12.0, -3.0]


def test_safe_better_drops_unsafe_winners():
    out, report = select_pairs(_four_pairs(), "safe_better")
    assert out["prompt"] == ["p0", "p1"]
    assert (report.kept, report.swapped, report.dropped) == (2, 0, 2)
    assert report.reasons == {"drop: chosen unsafe": 2, "keep: chosen safe": 2}


def test_fixture_counts_are_realistic():
    ds, _ = load_pairs("fixture:pku_tiny", split="train")
    _, r = select_pairs(ds, "safedpo")
    assert (r.kept, r.swapped, r.dropped) == (302, 120, 58)
    assert 0.20 <= r.swapped / r.total <= 0.30 and 0.10 <= r.dropped / r.total <= 0.15
    test, _ = load_pairs("fixture:pku_tiny", split="test")
    _, r = select_pairs(test, "safedpo")
    assert (r.kept, r.swapped, r.dropped) == (76, 30, 14)
    for name in ("better", "safer", "safe_better"):
        out, rep = select_pairs(ds, name)
        assert rep.kept + rep.swapped + rep.dropped == rep.total == len(ds) and len(out) == rep.rows_out
        assert rep.as_dict()["rows_out"] == len(out)


def test_bad_input():
    with pytest.raises(ValueError, match="selection"):
        select_pairs(_four_pairs(), "harmless")
    with pytest.raises(ValueError, match=r"missing canonical columns \['chosen_is_safer'\]"):
        select_pairs(_four_pairs().remove_columns("chosen_is_safer"), "safer")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        select_pairs([{"prompt": "x"}], "better")
    empty, report = select_pairs(_four_pairs().select([]), "safedpo")
    assert len(empty) == 0 and report.total == 0
