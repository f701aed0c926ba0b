"""Argument validation shared by the public API.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument and says what was
expected, so a user sees ``labels: expected values in [0, 32000) or ignore_index=-100, got 32000``
rather than a CUDA assert or a silently wrong loss.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IMPLS = ("auto", "torch", "triton")
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    t = check_tensor(name, value)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}"
        )
    return t


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _real_number(name: str, value: object) -> float:
    """A Python / numpy real number or a 0-dim real tensor as a float; bools and others refused."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name}: expected a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_positive_finite(name: str, value: object) -> float:
    """A finite real number > 0 (Python, numpy or 0-dim tensor) as a float."""
    x = _real_number(name, value)
    if not math.isfinite(x) or not x > 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return x


def check_beta_delta(beta: object, delta: object | None = None) -> tuple[float, float | None]:
    """beta: finite > 0; delta (when given): finite >= 0. Numpy scalars and 0-dim tensors accepted.

    Returns ``(float(beta), float(delta) or None)``. Raises TypeError for bools and non-numbers,
    ValueError for inf, NaN and out-of-range values; each message names beta or delta.
    """
    b = check_positive_finite("beta", beta)
    if delta is None:
        return b, None
    d = _real_number("delta", delta)
    if not math.isfinite(d) or not d >= 0:
        raise ValueError(f"delta: expected a finite number >= 0, got {delta!r}")
    return b, d


def check_ignore_index(name: str, value: object) -> int:
    """An integer label marker: Python / numpy integers or a 0-dim integer tensor; never truncated.

    Floats (even -100.0 or -100.9), bools and non-numbers raise TypeError naming ``name``.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    return int(value)


def check_logit_transform(logit_scale: object, softcap: object | None) -> tuple[float, float | None]:
    """logit_scale: finite > 0; softcap: None or finite > 0. -> (float scale, float cap or None)."""
    scale = check_positive_finite("logit_scale", logit_scale)
    cap = None if softcap is None else check_positive_finite("softcap", softcap)
    return scale, cap


def env_positive_float(var: str, default: float) -> float:
    """A finite number > 0 read from the environment variable ``var`` (``default`` when unset)."""
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        x = float(raw)
    except ValueError:
        raise ValueError(f"{var}: expected a finite number > 0, got {raw!r}") from None
    if not math.isfinite(x) or not x > 0:
        raise ValueError(f"{var}: expected a finite number > 0, got {raw!r}")
    return x


LINEAR_NAMES = ("hidden", "weight", "labels", "bias")


def check_linear_inputs(
    hidden: object,
    weight: object,
    labels: object,
    bias: object,
    ignore_index: object,
    *,
    names: tuple[str, str, str, str] = LINEAR_NAMES,
) -> int:
    """Validate the ``(hidden, weight, labels, bias)`` of a linear-head log-prob computation.

    hidden (..., H) float with H >= 1, weight (V, H) same dtype and device with V >= 1, labels (...)
    integer in [0, V) or ``ignore_index``, bias (V,) or None. ``names`` are the four arguments'
    names as the caller's users wrote them (e.g. ``("_input", "lin_weight", "target", "bias")``).
    Returns ``ignore_index`` as an int (see :func:`check_ignore_index`).
    """
    hidden_name, weight_name, labels_name, bias_name = names
    ignore_index = check_ignore_index("ignore_index", ignore_index)
    h = check_float_tensor(hidden_name, hidden)
    w = check_float_tensor(weight_name, weight)
    y = check_tensor(labels_name, labels)
    if w.dim() != 2:
        raise ValueError(f"{weight_name}: expected shape (V, H), got {tuple(w.shape)}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{weight_name}: expected shape (V, H) with V >= 1 and H >= 1, got {tuple(w.shape)}")
    if h.dim() < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{hidden_name}: expected shape (..., H) with H={w.shape[1]} (from {weight_name}), "
            f"got {tuple(h.shape)}"
        )
    if h.dtype != w.dtype:
        raise TypeError(f"{hidden_name} and {weight_name}: dtypes differ ({h.dtype} vs {w.dtype})")
    if h.device != w.device:
        raise ValueError(f"{hidden_name} and {weight_name}: devices differ ({h.device} vs {w.device})")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{labels_name}: expected an integer tensor, got {y.dtype}")
    if tuple(y.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"{labels_name}: expected shape {tuple(h.shape[:-1])} ({hidden_name} without its last dim), "
            f"got {tuple(y.shape)}"
        )
    if y.device != h.device:
        raise ValueError(f"{labels_name}: expected device {h.device}, got {y.device}")
    if bias is not None:
        b = check_float_tensor(bias_name, bias)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{bias_name}: expected shape ({w.shape[0]},), got {tuple(b.shape)}")
        if b.device != w.device:
            raise ValueError(f"{bias_name}: expected device {w.device}, got {b.device}")
    if y.numel():
        valid = y != ignore_index
        if bool(valid.any()):
            lo, hi = int(y[valid].min()), int(y[valid].max())
            if lo < 0 or hi >= w.shape[0]:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{labels_name}: expected values in [0, {w.shape[0]}) or "
                    f"ignore_index={ignore_index}, got {bad}"
                )
    return ignore_index


def as_flags(name: str, value: object, size: int, device: torch.device) -> torch.Tensor:
    """Unsafe flags as a bool tensor of shape (size,); accepts bool or integer/float 0/1 values."""
    t = check_tensor(name, value)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{name}: expected shape ({size},), got {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.dtype.is_complex:
            raise TypeError(f"{name}: expected bool or 0/1 values, got {t.dtype}")
        if t.numel() and not bool(((t == 0) | (t == 1)).all()):
            bad = t[(t != 0) & (t != 1)][0].item()
            raise ValueError(f"{name}: expected bool or 0/1 values, got {bad}")
        t = t != 0
    return t.to(device)


def check_pair_logps(names: tuple[str, ...], values: tuple[object, ...]) -> torch.Tensor:
    """All per-pair log-prob tensors must be float, 1-D, the same length and device."""
    first = None
    for name, value in zip(names, values):
        t = check_float_tensor(name, value)
        if t.dim() != 1:
            raise ValueError(f"{name}: expected shape (B,), got {tuple(t.shape)}")
        if first is None:
            first = (name, t)
        elif t.shape != first[1].shape:
            raise ValueError(
                f"{name}: expected shape {tuple(first[1].shape)} (as {first[0]}), got {tuple(t.shape)}"
            )
        elif t.device != first[1].device:
            raise ValueError(f"{name}: expected device {first[1].device} (as {first[0]}), got {t.device}")
    assert first is not None
    return first[1]
