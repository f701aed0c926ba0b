"""Collators from tokenized pairs (rows of :func:`tokenize_pairs`) to the batches the fused losses take.

Padded layout (``PaddedPairCollator``): the B chosen sequences then the B rejected sequences, right
padded to one length T::

    input_ids       (2B, T) long   pad_token_id on padding
    attention_mask  (2B, T) long   1 on tokens, 0 on padding
    labels          (2B, T) long   HF-style (aligned with input_ids), ignore_index on prompt + padding
    chosen_unsafe   (B,)    bool
    rejected_unsafe (B,)    bool
    ref_chosen_logps, ref_rejected_logps (B,) float32   only when the rows carry them

    hidden = model(input_ids, attention_mask=attention_mask).last_hidden_state
    loss_fn(lm_head.weight, hidden[:, :-1], labels[:, 1:], chosen_unsafe, rejected_unsafe)

Padding-free layout (``PackedPairCollator``): the 2B sequences concatenated (chosen first)::

    input_ids    (1, total) long
    position_ids (1, total) long   0, 1, ... restarting at every sequence
    cu_seqlens   (2B + 1,)  int32  sequence starts, 0 first, total last
    labels       (1, total) long   HF-style; the FIRST token of every sequence is ignore_index, so a
                                   shift by one never predicts across a sequence boundary
    flags and refs as above

    hidden = model(input_ids, position_ids=position_ids, use_cache=False).last_hidden_state  # use_cache=False: else attention crosses sequences
    loss_fn(lm_head.weight, hidden, shift_packed_labels(labels), flags..., cu_seqlens=cu_seqlens)

``shift_packed_labels`` shifts left by one and appends ``ignore_index``, so hidden and target keep the
length ``total`` that ``cu_seqlens`` describes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["PaddedPairCollator", "PackedPairCollator", "shift_packed_labels"]

_REQUIRED = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "chosen_unsafe",
             "rejected_unsafe")
_REFS = ("ref_chosen_logps", "ref_rejected_logps")


def _as_long_list(value: Any, what: str, allowed_negative: int | None = None) -> list[int]:
    """``value`` as a list of Python ints, each >= 0 (or equal to ``allowed_negative``: the ignore_index of
    labels). Floats, bools, strings and negative ids raise a ValueError naming ``what`` and the position."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{what}: expected a 1-D integer sequence, got a tensor {tuple(value.shape)} {value.dtype}"
            )
        value = value.tolist()
    elif type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        if getattr(value, "ndim", 1) != 1 or value.dtype.kind not in "iu":
            raise ValueError(f"{what}: expected a 1-D integer sequence, got a NumPy array of dtype {value.dtype}")
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(f"{what}: expected a list of token ids, got {type(value).__name__}")
    out = []
    for j, x in enumerate(value):
        if type(x).__module__ == "numpy" and getattr(x, "dtype", None) is not None and x.dtype.kind in "iu":
            x = int(x)
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"{what}[{j}]: expected an integer token id, got {x!r} ({type(x).__name__})")
        if x < 0 and x != allowed_negative:
            extra = f" or {allowed_negative} (ignore_index)" if allowed_negative is not None else ""
            raise ValueError(f"{what}[{j}]: expected a token id >= 0{extra}, got {x}")
        out.append(x)
    return out


def _as_flag(value: Any, what: str) -> bool:
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or type(value).__module__ == "numpy":
        value = value.item()  # tensor / NumPy scalar -> Python bool or int
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{what}: expected a bool or 0/1, got {value!r}")


def _parse_rows(rows: Any, ignore_index: int):
    """(sequences as [(ids, labels)] chosen first then rejected, chosen_unsafe, rejected_unsafe, refs or None)."""
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError(f"rows: expected a non-empty list of tokenized pair rows (dicts), got {type(rows).__name__}")
    chosen, rejected, c_flags, r_flags = [], [], [], []
    ref_rows = [all(k in row for k in _REFS) if isinstance(row, Mapping) else False for row in rows]
    if any(ref_rows) and not all(ref_rows):
        raise ValueError("rows: some rows carry ref_chosen_logps/ref_rejected_logps and some do not")
    refs: tuple[list[float], list[float]] | None = ([], []) if all(ref_rows) else None
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}]: expected a dict, got {type(row).__name__}")
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ValueError(f"rows[{i}]: missing columns {missing} (tokenize pairs with tokenize_pairs first)")
        for side, bucket in (("chosen", chosen), ("rejected", rejected)):
            ids = _as_long_list(row[f"{side}_input_ids"], f"rows[{i}].{side}_input_ids")
            labels = _as_long_list(row[f"{side}_labels"], f"rows[{i}].{side}_labels", allowed_negative=ignore_index)
            if len(ids) != len(labels) or not ids:
                raise ValueError(f"rows[{i}]: {side}_input_ids ({len(ids)}) and {side}_labels ({len(labels)}) "
                                 "must have the same, non-zero length")
            if all(x == ignore_index for x in labels):
                raise ValueError(f"rows[{i}]: {side}_labels has no response token (all ignore_index={ignore_index})")
            bucket.append((ids, labels))
        c_flags.append(_as_flag(row["chosen_unsafe"], f"rows[{i}].chosen_unsafe"))
        r_flags.append(_as_flag(row["rejected_unsafe"], f"rows[{i}].rejected_unsafe"))
        if refs is not None:
            refs[0].append(float(row["ref_chosen_logps"]))
            refs[1].append(float(row["ref_rejected_logps"]))
    return chosen + rejected, c_flags, r_flags, refs


def _flags_and_refs(c_flags, r_flags, refs) -> dict[str, torch.Tensor]:
    out = {"chosen_unsafe": torch.tensor(c_flags, dtype=torch.bool),
           "rejected_unsafe": torch.tensor(r_flags, dtype=torch.bool)}
    if refs is not None:
        out["ref_chosen_logps"] = torch.tensor(refs[0], dtype=torch.float32)
        out["ref_rejected_logps"] = torch.tensor(refs[1], dtype=torch.float32)
    return out


def _check_int(name: str, value: Any, allow_none: bool = False, minimum: int | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise TypeError(f"{name}: expected an int{bound}{' or None' if allow_none else ''}, got {value!r}")


class PaddedPairCollator:
    """Rows of tokenized pairs -> a right-padded ``(2B, T)`` batch, chosen rows then rejected rows.

    Args:
        pad_token_id: id written on padding positions of ``input_ids`` (``tokenizer.pad_token_id``).
        ignore_index: label on padding (and already on prompt tokens).
        pad_to_multiple_of: round T up to a multiple of this (e.g. 8 for tensor cores), or None.
    """

    def __init__(self, pad_token_id: int, ignore_index: int = -100, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id: the tokenizer has no pad token; set tokenizer.pad_token "
                             "(tokenize_pairs sets it to the eos token) and pass tokenizer.pad_token_id")
        _check_int("pad_token_id", pad_token_id, minimum=0)
        _check_int("ignore_index", ignore_index)
        _check_int("pad_to_multiple_of", pad_to_multiple_of, allow_none=True, minimum=1)
        self.pad_token_id, self.ignore_index, self.pad_to_multiple_of = pad_token_id, ignore_index, pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, c_flags, r_flags, refs = _parse_rows(rows, self.ignore_index)
        width = max(len(ids) for ids, _ in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, labs) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                **_flags_and_refs(c_flags, r_flags, refs)}


class PackedPairCollator:
    """Rows of tokenized pairs -> one padding-free sequence ``(1, total)`` with ``position_ids`` and
    ``cu_seqlens`` (chosen sequences first, then rejected), for packing-aware attention
    (flash-attention varlen, or transformers' detection of packed ``position_ids``).

    Args:
        ignore_index: label on prompt tokens and on the first token of every sequence.
    """

    def __init__(self, ignore_index: int = -100):
        _check_int("ignore_index", ignore_index)
        self.ignore_index = ignore_index

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, c_flags, r_flags, refs = _parse_rows(rows, self.ignore_index)
        lengths = [len(ids) for ids, _ in seqs]
        input_ids = torch.tensor([t for ids, _ in seqs for t in ids], dtype=torch.long)
        labels = torch.tensor([t for _, labs in seqs for t in labs], dtype=torch.long)
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        labels[cu_seqlens[:-1].long()] = self.ignore_index
        return {"input_ids": input_ids[None], "position_ids": position_ids[None], "cu_seqlens": cu_seqlens,
                "labels": labels[None], **_flags_and_refs(c_flags, r_flags, refs)}


def shift_packed_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Targets for a packed batch: ``labels`` (1, total) or (total,) shifted left by one with
    ``ignore_index`` appended, same shape, so ``target[..., t]`` is the token predicted at ``t`` and the
    sequence offsets ``cu_seqlens`` still apply. Needs the first token of every sequence to be ignored
    (as :class:`PackedPairCollator` does), so no sequence scores the next one's first token."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() not in (1, 2):
        raise ValueError(f"labels: expected an integer tensor (1, total) or (total,), got {labels!r:.80}")
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)
