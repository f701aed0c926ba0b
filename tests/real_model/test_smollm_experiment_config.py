"""recipes/smollm_experiment.py without running it: config checks, rate arithmetic, the judge's text rules."""

from __future__ import annotations

import pytest
import yaml

from recipes import smollm_experiment as exp


def test_config_defaults_and_errors(tmp_path):
    cfg = exp.load_config(None, [])
    assert cfg == {**exp.DEFAULTS, "lr": float(exp.DEFAULTS["lr"]), "beta": 0.1, "delta": 10.0}
    shipped = exp.load_config(str(exp._ROOT / "recipes/configs/smollm_experiment.yaml"), ["steps=3", "lr=1e-5"])
    assert shipped["steps"] == 3 and shipped["lr"] == 1e-5 and shipped["methods"] == list(exp.METHODS)
    with pytest.raises(ValueError, match="config key 'stepz': unknown key"):
        exp.load_config(None, ["stepz=3"])
    with pytest.raises(ValueError, match="config key 'methods'"):
        exp.load_config(None, ["methods=[safedpo, ppo]"])
    with pytest.raises(ValueError, match="config key 'steps': expected an int >= 1"):
        exp.load_config(None, ["steps=0"])
    with pytest.raises(ValueError, match="override 'steps': expected key=value"):
        exp.load_config(None, ["steps"])


def test_prompts_file_is_complete():
    spec = yaml.safe_load((exp._ROOT / "recipes/configs/smollm_eval_prompts.yaml").read_text())
    assert set(spec["prompts"]) == set(exp.HARMFUL_GROUPS) | set(exp.BENIGN_GROUPS)
    assert all(len(v) >= 8 for v in spec["prompts"].values())
    labels = [x["refusal"] for x in spec["judge_labelled"]]
    assert all(isinstance(x, bool) for x in labels) and 10 <= sum(labels) <= len(labels) - 10
    from safedpo_kernels.data import load_pairs

    train, _ = load_pairs("fixture:pku_tiny", split="train")
    held_out = {p for ps in spec["prompts"].values() for p in ps}
    assert not held_out & set(train["prompt"])  # held out: none of them is a training prompt


def test_rates():
    verdicts = {"harmful_heldout": [{"refusal": True}, {"refusal": False}],
                "harmful_fixture_topics": [{"refusal": False}, {"refusal": False}],
                "benign": [{"refusal": False}], "benign_sensitive": [{"refusal": True}, {"refusal": False}]}
    r = exp.rates(verdicts)
    assert r["harmful_compliance"] == 0.75 and r["over_refusal"] == round(1 / 3, 4)
    assert r["refusal/harmful_heldout"] == 0.5 and r["refusal/benign"] == 0.0


def test_opening():
    assert exp._opening("No. I will not explain that. Here is more.") == "No. I will not explain that."
    assert exp._opening("The capital of France is Paris. It is big.") == "The capital of France is Paris."
    assert exp._opening("x" * 500) == "x" * 200
    assert exp._opening("") == ""
