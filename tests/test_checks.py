"""safedpo_kernels._checks: each bad value gives a TypeError/ValueError naming the argument."""

import numpy as np
import pytest
import torch

from safedpo_kernels._checks import (
    check_beta_delta,
    check_ignore_index,
    check_linear_inputs,
    check_logit_transform,
    env_positive_float,
)


@pytest.mark.parametrize("value,expected", [(-100, -100), (0, 0), (np.int64(-100), -100), (np.int32(7), 7),
                                            (torch.tensor(-100), -100), (torch.tensor(3, dtype=torch.int32), 3)])
def test_ignore_index_accepts_integers(value, expected):
    out = check_ignore_index("ignore_index", value)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [-100.9, -100.0, True, False, np.float32(-100), "x", None,
                                   torch.tensor(-100.0), torch.tensor([1]), torch.tensor(True), np.bool_(True)])
def test_ignore_index_refuses_non_integers(value):
    with pytest.raises(TypeError, match="my_index: expected an integer"):
        check_ignore_index("my_index", value)


@pytest.mark.parametrize("beta", [0.1, 1, np.float32(0.1), np.float64(0.5), np.int64(2), torch.tensor(0.3)])
def test_beta_accepts_real_numbers(beta):
    b, d = check_beta_delta(beta, np.float32(2.5))
    assert b == pytest.approx(float(beta)) and d == 2.5 and type(b) is float
    assert check_beta_delta(beta) == (pytest.approx(float(beta)), None)
    assert check_beta_delta(beta, 0)[1] == 0.0


@pytest.mark.parametrize(
    "beta,delta,exc,match",
    [
        (float("inf"), 1.0, ValueError, "beta: expected a finite number > 0"),
        (float("nan"), 1.0, ValueError, "beta"),
        (np.float32("inf"), 1.0, ValueError, "beta"),
        (0.0, 1.0, ValueError, "beta"),
        (-0.1, 1.0, ValueError, "beta"),
        (True, 1.0, TypeError, "beta: expected a real number"),
        ("0.1", 1.0, TypeError, "beta"),
        (torch.tensor([0.1, 0.2]), 1.0, TypeError, "beta"),
        (0.1, float("inf"), ValueError, "delta: expected a finite number >= 0"),
        (0.1, float("nan"), ValueError, "delta"),
        (0.1, -1.0, ValueError, "delta"),
        (0.1, True, TypeError, "delta"),
        (0.1, 1 + 2j, TypeError, "delta"),
    ],
)
def test_beta_delta_refuses(beta, delta, exc, match):
    with pytest.raises(exc, match=match):
        check_beta_delta(beta, delta)


def test_logit_transform():
    assert check_logit_transform(1, None) == (1.0, None)
    assert check_logit_transform(np.float32(0.5), 30) == (0.5, 30.0)
    for scale, cap, match in [(0.0, None, "logit_scale"), (float("inf"), None, "logit_scale"),
                              (float("nan"), None, "logit_scale"), (-1.0, None, "logit_scale"),
                              (1.0, 0.0, "softcap"), (1.0, float("inf"), "softcap"), (1.0, -5.0, "softcap")]:
        with pytest.raises(ValueError, match=match):
            check_logit_transform(scale, cap)
    with pytest.raises(TypeError, match="softcap"):
        check_logit_transform(1.0, True)


def test_env_positive_float(monkeypatch):
    monkeypatch.delenv("SAFEDPO_TEST_VAR", raising=False)
    assert env_positive_float("SAFEDPO_TEST_VAR", 3.0) == 3.0
    monkeypatch.setenv("SAFEDPO_TEST_VAR", "2.5")
    assert env_positive_float("SAFEDPO_TEST_VAR", 3.0) == 2.5
    for bad in ("nan", "inf", "-inf", "0", "-2", "abc", ""):
        monkeypatch.setenv("SAFEDPO_TEST_VAR", bad)
        with pytest.raises(ValueError, match="SAFEDPO_TEST_VAR: expected a finite number > 0"):
            env_positive_float("SAFEDPO_TEST_VAR", 3.0)


def _args(**over):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8), labels=torch.tensor([0, 1, -100, 9]),
                bias=None, ignore_index=-100)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(hidden=torch.zeros(4, 9)), ValueError, r"_input: expected shape \(\.\.\., H\) with H=8 \(from lin_weight\)"),
        (dict(weight=torch.zeros(10)), ValueError, r"lin_weight: expected shape \(V, H\)"),
        (dict(hidden=torch.zeros(4, 0), weight=torch.zeros(10, 0)), ValueError, r"lin_weight: .*H >= 1"),
        (dict(weight=torch.zeros(0, 8), labels=torch.full((4,), -100)), ValueError, r"lin_weight: .*V >= 1"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"target: expected shape \(4,\) \(_input"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"target: expected values in \[0, 10\)"),
        (dict(labels=torch.zeros(4)), TypeError, "target: expected an integer tensor"),
        (dict(bias=torch.zeros(9)), ValueError, r"b: expected shape \(10,\)"),
        (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "_input and lin_weight: dtypes differ"),
        (dict(ignore_index=-100.9), TypeError, "ignore_index: expected an integer"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
    ],
)
def test_linear_inputs_use_the_callers_names(over, exc, match):
    with pytest.raises(exc, match=match):
        check_linear_inputs(**_args(**over), names=("_input", "lin_weight", "target", "b"))


def test_linear_inputs_returns_the_ignore_index():
    assert check_linear_inputs(**_args(ignore_index=np.int64(-100))) == -100
