"""Padded and packed pair collators: layouts, flags, reference log-probs, bad rows."""

from __future__ import annotations

import pytest
import torch

from safedpo_kernels.data import PackedPairCollator, PaddedPairCollator, shift_packed_labels

IGNORE = -100


def _row(prompt_len, chosen_len, rejected_len, cu=False, ru=True, start=10, **extra):
    """A tokenized pair with distinct token ids (prompt ids from `start`, response ids after)."""
    p = list(range(start, start + prompt_len))
    c = list(range(start + 100, start + 100 + chosen_len))
    r = list(range(start + 200, start + 200 + rejected_len))
    return {"chosen_input_ids": p + c, "chosen_labels": [IGNORE] * prompt_len + c,
            "rejected_input_ids": p + r, "rejected_labels": [IGNORE] * prompt_len + r,
            "chosen_unsafe": cu, "rejected_unsafe": ru, "prompt": "x", **extra}


def test_padded_layout():
    rows = [_row(3, 4, 2, cu=False, ru=True, start=10), _row(2, 1, 5, cu=True, ru=False, start=20)]
    batch = PaddedPairCollator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "chosen_unsafe", "rejected_unsafe"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (4, 7) and ids.dtype == labels.dtype == mask.dtype == torch.long
    order = [rows[0]["chosen_input_ids"], rows[1]["chosen_input_ids"], rows[0]["rejected_input_ids"],
             rows[1]["rejected_input_ids"]]
    order_labels = [rows[0]["chosen_labels"], rows[1]["chosen_labels"], rows[0]["rejected_labels"],
                    rows[1]["rejected_labels"]]
    for i, (seq, lab) in enumerate(zip(order, order_labels)):
        n = len(seq)
        assert ids[i, :n].tolist() == seq and ids[i, n:].eq(0).all()
        assert labels[i, :n].tolist() == lab and labels[i, n:].eq(IGNORE).all()
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()
    assert batch["chosen_unsafe"].tolist() == [False, True] and batch["rejected_unsafe"].tolist() == [True, False]
    assert batch["chosen_unsafe"].dtype == torch.bool
    wide = PaddedPairCollator(pad_token_id=3, pad_to_multiple_of=8)(rows)
    assert wide["input_ids"].shape == (4, 8) and wide["input_ids"][0, 7] == 3


def test_reference_logps_are_carried():
    rows = [_row(2, 2, 2, ref_chosen_logps=-1.5, ref_rejected_logps=-2.5),
            _row(2, 3, 1, ref_chosen_logps=-3.0, ref_rejected_logps=float("nan"))]
    for collator in (PaddedPairCollator(0), PackedPairCollator()):
        batch = collator(rows)
        assert batch["ref_chosen_logps"].dtype == torch.float32
        assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0]
        assert batch["ref_rejected_logps"][0] == -2.5 and batch["ref_rejected_logps"][1].isnan()  # NaN not hidden
    with pytest.raises(ValueError, match="some rows carry"):
        PaddedPairCollator(0)([rows[0], _row(2, 2, 2)])


def test_packed_layout():
    rows = [_row(3, 4, 2, start=10), _row(2, 1, 5, cu=True, ru=False, start=20)]
    batch = PackedPairCollator()(rows)
    lengths = [7, 3, 5, 7]  # chosen 0, chosen 1, rejected 0, rejected 1
    total = sum(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 7, 10, 15, 22]
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    seqs = [rows[0]["chosen_input_ids"], rows[1]["chosen_input_ids"], rows[0]["rejected_input_ids"],
            rows[1]["rejected_input_ids"]]
    assert batch["input_ids"][0].tolist() == [t for s in seqs for t in s]
    labs = [rows[0]["chosen_labels"], rows[1]["chosen_labels"], rows[0]["rejected_labels"], rows[1]["rejected_labels"]]
    expect = [IGNORE if j == 0 else t for lab in labs for j, t in enumerate(lab)]
    assert batch["labels"][0].tolist() == expect
    assert batch["chosen_unsafe"].tolist() == [False, True]


def test_packed_first_token_is_ignored_even_when_labeled():
    row = _row(0, 3, 2)  # no prompt: the first token carries a label in the row
    batch = PackedPairCollator()([row, row])
    starts = batch["cu_seqlens"][:-1].long()
    assert batch["labels"][0, starts].eq(IGNORE).all()
    target = shift_packed_labels(batch["labels"])
    assert target.shape == batch["labels"].shape and target[0, -1] == IGNORE
    assert target[0, :-1].tolist() == batch["labels"][0, 1:].tolist()
    # the last position of each sequence predicts nothing (the next sequence's first token is ignored)
    ends = batch["cu_seqlens"][1:].long() - 1
    assert target[0, ends].eq(IGNORE).all()


@pytest.mark.parametrize("collator", [PaddedPairCollator(0), PackedPairCollator()], ids=["padded", "packed"])
def test_bad_rows(collator):
    with pytest.raises(ValueError, match="non-empty list"):
        collator([])
    with pytest.raises(ValueError, match="non-empty list"):
        collator({"chosen_input_ids": [1]})
    bad = _row(2, 2, 2)
    del bad["rejected_labels"]
    with pytest.raises(ValueError, match=r"rows\[1\]: missing columns \['rejected_labels'\]"):
        collator([_row(2, 2, 2), bad])
    bad = _row(2, 2, 2)
    bad["chosen_labels"] = bad["chosen_labels"][:-1]
    with pytest.raises(ValueError, match="same, non-zero length"):
        collator([bad])
    with pytest.raises(ValueError, match="no response token"):
        collator([_row(2, 0, 2)])
    with pytest.raises(ValueError, match="chosen_unsafe: expected a bool or 0/1"):
        collator([_row(2, 2, 2, cu="yes")])


def test_constructor_checks():
    with pytest.raises(ValueError, match="pad_token_id: the tokenizer has no pad token"):
        PaddedPairCollator(None)
    with pytest.raises(TypeError, match="pad_to_multiple_of"):
        PaddedPairCollator(0, pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="ignore_index"):
        PackedPairCollator(ignore_index=1.5)
    with pytest.raises(ValueError, match="labels"):
        shift_packed_labels(torch.zeros(2, 3, 4, dtype=torch.long))


def test_tensor_rows_work():
    """Rows from a dataset with set_format('torch') hold tensors instead of lists."""
    row = {k: (torch.tensor(v) if isinstance(v, (list, bool)) else v) for k, v in _row(2, 3, 2).items()}
    a = PaddedPairCollator(0)([row])
    b = PaddedPairCollator(0)([_row(2, 3, 2)])
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("collator", [PaddedPairCollator(0), PackedPairCollator()], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "column, value, message",
    [
        ("chosen_input_ids", [10, 11.0, 110, 111], r"rows\[0\]\.chosen_input_ids\[1\]: expected an integer token id, got 11\.0"),
        ("rejected_input_ids", [10, 11, -3, 211], r"rows\[0\]\.rejected_input_ids\[2\]: expected a token id >= 0, got -3"),
        ("chosen_labels", [IGNORE, IGNORE, 110, -5], r"rows\[0\]\.chosen_labels\[3\]: expected a token id >= 0 or -100"),
        ("chosen_input_ids", [10, True, 110, 111], r"chosen_input_ids\[1\]: expected an integer token id, got True"),
        ("chosen_input_ids", [10, "11", 110, 111], r"chosen_input_ids\[1\]: expected an integer token id"),
        ("chosen_input_ids", torch.tensor([10.0, 11.0, 110.0, 111.0]), r"chosen_input_ids: expected a 1-D integer"),
        ("chosen_input_ids", torch.tensor([10, 11, -1, 111]), r"chosen_input_ids\[2\]: expected a token id >= 0"),
    ],
)
def test_token_ids_must_be_nonnegative_integers(collator, column, value, message):
    row = _row(2, 2, 2)
    row[column] = value
    with pytest.raises(ValueError, match=message):
        collator([row])


def test_numpy_integer_ids_are_accepted_and_numpy_floats_refused():
    np = pytest.importorskip("numpy")
    row = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in _row(2, 3, 2).items()}
    a = PaddedPairCollator(0)([row])
    b = PaddedPairCollator(0)([_row(2, 3, 2)])
    assert all(torch.equal(a[k], b[k]) for k in b)
    row["rejected_input_ids"] = row["rejected_input_ids"].astype(np.float32)
    with pytest.raises(ValueError, match=r"rows\[0\]\.rejected_input_ids: .*NumPy array of dtype float32"):
        PaddedPairCollator(0)([row])
