"""The committed pku_long fixture: reproducible, PKU schema and lengths, held-out prompts, judge-consistent labels."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from safedpo_kernels.data import fixture_path, judge_long, load_fixture_tokenizer
from safedpo_kernels.data import long_vocab as V
from safedpo_kernels.data import make_long_fixture

PKU_COLUMNS = ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
               "better_response_id", "safer_response_id"]
SPLITS = ("train", "validation", "test")


def _rows(split):
    return [json.loads(line) for line in (fixture_path("pku_long") / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_fixture_tokenizer("pku_long")


def test_generator_reproduces_committed_files(tmp_path):
    make_long_fixture.main(["--out", str(tmp_path)])
    for split in SPLITS:
        assert (tmp_path / "pku_long" / f"{split}.jsonl").read_bytes() == (fixture_path("pku_long") / f"{split}.jsonl").read_bytes()
    committed = fixture_path("pku_long") / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "pku_long" / "tokenizer" / name).read_bytes() == (committed / name).read_bytes()
    assert make_long_fixture.generate_dataset(seed=1)["train"] != _rows("train")


def test_schema_and_size():
    folder = fixture_path("pku_long")
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000
    for split in SPLITS:
        rows = _rows(split)
        assert len(rows) == round(make_long_fixture.PAIRS_PER_PROMPT[split] * len(make_long_fixture.split_prompts(split)))
        for row in rows:
            assert list(row) == PKU_COLUMNS
            assert all(isinstance(row[f"is_response_{i}_safe"], bool) for i in (0, 1))
            assert row["better_response_id"] in (0, 1) and row["safer_response_id"] in (0, 1)
            assert row["response_0"] != row["response_1"]


def test_responses_have_pku_like_length(tokenizer):
    for split in SPLITS:
        lengths = [len(tokenizer(row[f"response_{i}"], add_special_tokens=False)["input_ids"])
                   for row in _rows(split) for i in (0, 1)]
        assert statistics.median(lengths) >= 80, split
        assert max(lengths) <= 170, split  # fits max_length 192 with the prompt


def test_splits_are_disjoint_in_prompts_topics_and_templates():
    prompts = {split: {row["prompt"] for row in _rows(split)} for split in SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    train_text = " ".join(prompts["train"]).lower()
    for split in ("validation", "test"):
        for topic in V.topics(split=split):
            assert topic.request.lower() not in train_text, topic.request  # held-out topic
        for template in V.TEMPLATES[split]:
            stem = re.escape(template.split("{request}")[0])
            assert not any(re.match(stem, p) for p in prompts["train"]), template  # held-out template
        # every prompt of the split (each topic with each template) occurs
        assert prompts[split] == {p for p, _ in make_long_fixture.split_prompts(split)}
    for topic in V.TOPICS:
        assert topic.split in SPLITS and len(topic.steps) == 4


def test_every_split_has_harmful_benign_and_sensitive_prompts():
    for split in SPLITS:
        categories = [judge_long(row["prompt"], "")["category"] for row in _rows(split)]
        counts = {c: categories.count(c) for c in V.CATEGORIES}
        assert all(counts[c] > 0 for c in V.CATEGORIES), (split, counts)
        assert None not in categories


def test_harmful_steps_are_topic_specific():
    steps = [s for t in V.topics("harmful") for s in t.steps]
    assert len(set(steps)) == len(steps)
    # no step shares its first four words with a step of another topic (not one shared template)
    heads = {}
    for topic in V.topics("harmful"):
        for s in topic.steps:
            heads.setdefault(" ".join(s.split()[:4]), set()).add(topic.request)
    assert all(len(owners) == 1 for owners in heads.values())


@pytest.mark.parametrize("split", SPLITS)
def test_judge_agrees_with_labels(split):
    for row in _rows(split):
        verdicts = [judge_long(row["prompt"], row[f"response_{i}"]) for i in (0, 1)]
        for i, v in enumerate(verdicts):
            assert v["unsafe"] == (not row[f"is_response_{i}_safe"]), (row["prompt"], row[f"response_{i}"])
            assert v["fluent"], row[f"response_{i}"]
        better = row["better_response_id"]
        assert verdicts[better]["helpful"] > verdicts[1 - better]["helpful"]
        if verdicts[0]["category"] == "harmful":  # a safe answer to a harmful prompt is a refusal
            for i, v in enumerate(verdicts):
                assert v["refusal"] == row[f"is_response_{i}_safe"], row[f"response_{i}"]


def test_fixture_has_every_pair_kind_in_train():
    rows = _rows("train")
    flags = {(r[f"is_response_{r['better_response_id']}_safe"], r[f"is_response_{1 - r['better_response_id']}_safe"])
             for r in rows}
    assert flags == {(True, True), (True, False), (False, True), (False, False)}
