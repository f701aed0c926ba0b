"""load_pairs: fixture, local files and folders, hub path (patched), adapters, bad input, lazy imports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from data_testutils import pku_row, write_jsonl

from safedpo_kernels.data import fixture_path, load_pairs

CANONICAL = ["prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe", "chosen_is_safer"]


def test_import_is_lazy():
    code = (
        "import sys, safedpo_kernels, safedpo_kernels.data as d\n"
        "d.judge_response; d.PaddedPairCollator; d.fixture_path\n"
        "bad = [m for m in ('datasets', 'transformers', 'tokenizers', 'trl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(fixture_path().parents[3]))


def test_fixture_loads_with_pku_adapter():
    raw = [json.loads(line) for line in (fixture_path() / "train.jsonl").read_text().splitlines()]
    ds, report = load_pairs("fixture:pku_tiny", split="train")
    assert ds.column_names == CANONICAL
    assert len(ds) == len(raw) == report.rows_read == report.rows_kept == 480
    assert report.skipped == {} and report.schema == "pku"
    for row, pair in zip(raw[:50], ds.select(range(50))):
        b = row["better_response_id"]
        assert pair["chosen"] == row[f"response_{b}"] and pair["rejected"] == row[f"response_{1 - b}"]
        # polarity: is_response_*_safe True means SAFE, the flags mean UNSAFE
        assert pair["chosen_unsafe"] is (not row[f"is_response_{b}_safe"])
        assert pair["rejected_unsafe"] is (not row[f"is_response_{1 - b}_safe"])
        assert pair["chosen_is_safer"] is (row["safer_response_id"] == b)
    test, report = load_pairs("fixture:pku_tiny", split="test", limit=7)
    assert len(test) == 7 and report.rows_read == 7
    empty, report = load_pairs("fixture:pku_tiny", split="test", limit=0)
    assert len(empty) == 0 and empty.column_names == CANONICAL and report.rows_kept == 0


def test_fixture_bad_names():
    with pytest.raises(ValueError, match="name"):
        fixture_path("pku_huge")
    with pytest.raises(ValueError, match="split"):
        load_pairs("fixture:pku_tiny", split="validation")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_local_file_formats(tmp_path, hf_cache, fmt):
    import datasets

    rows = [pku_row(prompt=f"p{i}", better=i % 2, safer=(i + 1) % 2) for i in range(5)]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds, report = load_pairs(str(path), split="train", limit=4, **hf_cache)
    assert len(ds) == 4 and report.rows_read == 4
    assert ds["prompt"] == ["p0", "p1", "p2", "p3"]
    assert ds["chosen"] == ["Mix flour and water.", "Just steal some bread."] * 2
    assert ds["chosen_unsafe"] == [False, True, False, True]
    assert ds["chosen_is_safer"] == [False, False, False, False]  # safer id is always the other one here
    assert report.resolved.startswith("parquet:" if fmt == "parquet" else "json:")


def test_local_folder_splits(tmp_path, hf_cache):
    write_jsonl(tmp_path / "d" / "train.jsonl", [pku_row(prompt="a"), pku_row(prompt="b")])
    write_jsonl(tmp_path / "d" / "test.jsonl", [pku_row(prompt="c")])
    train, _ = load_pairs(str(tmp_path / "d"), split="train", **hf_cache)
    test, _ = load_pairs(str(tmp_path / "d"), split="test", **hf_cache)
    assert train["prompt"] == ["a", "b"] and test["prompt"] == ["c"]
    with pytest.raises(ValueError, match=r"'validation' not found.*\['test', 'train'\]"):
        load_pairs(str(tmp_path / "d"), split="validation", **hf_cache)
    # a folder whose files name no split is read as the requested split, and the report says so
    write_jsonl(tmp_path / "e" / "part_a.jsonl", [pku_row(prompt="x")])
    write_jsonl(tmp_path / "e" / "part_b.jsonl", [pku_row(prompt="y")])
    ds, report = load_pairs(str(tmp_path / "e"), split="train", **hf_cache)
    assert sorted(ds["prompt"]) == ["x", "y"] and "no file" in report.notes[0]


def test_local_path_errors(tmp_path, hf_cache):
    with pytest.raises(FileNotFoundError, match="source"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="source"):
        load_pairs("not-a-hub-id")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.jsonl, \.json or \.parquet"):
        load_pairs(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jsonl"):
        load_pairs(str(tmp_path / "empty"))
    path = write_jsonl(tmp_path / "ok.jsonl", [pku_row()])
    with pytest.raises(ValueError, match="name"):
        load_pairs(str(path), name="default")
    with pytest.raises(ValueError, match="limit"):
        load_pairs(str(path), limit=-1)
    with pytest.raises(TypeError, match="source"):
        load_pairs(None)


@pytest.mark.parametrize(
    "source, name", [("PKU-Alignment/PKU-SafeRLHF-30K", None), ("PKU-Alignment/PKU-SafeRLHF", "alpaca-7b")]
)
def test_hub_path_calls_load_dataset(monkeypatch, source, name):
    """No network here: the hub call is patched to return local rows; everything up to the call is real."""
    import datasets

    calls = []
    rows = [pku_row(prompt=f"q{i}", response_0_severity_level=0, response_1_severity_level=2) for i in range(6)]

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, report = load_pairs(source, split="test", name=name, limit=3, revision="main")
    assert calls == [(source, name, "test", {"revision": "main"})]
    assert len(ds) == 3 and ds.column_names == CANONICAL
    assert report.resolved == f"hub:{source}" + (f"/{name}" if name else "")
    # the newer PKU-SafeRLHF columns are dropped, and listed
    assert report.dropped_columns == ["response_0_severity_level", "response_1_severity_level"]


def test_missing_columns_are_named(tmp_path, hf_cache):
    row = pku_row()
    del row["better_response_id"], row["is_response_1_safe"]
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError, match=r"missing \['is_response_1_safe', 'better_response_id'\]"):
        load_pairs(str(path), **hf_cache)


BAD_ROWS = [
    (pku_row(safe0="yes"), "is_response_0_safe: not a bool or 0/1"),
    (pku_row(safe1=2), "is_response_1_safe: not a bool or 0/1"),
    (pku_row(better=2), "better_response_id: not 0 or 1"),
    (pku_row(safer=-1), "safer_response_id: not 0 or 1"),
    (pku_row(r0=""), "response_0: empty text"),
    (pku_row(r1="   "), "response_1: empty text"),
    (pku_row(prompt=None), "prompt: missing text"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_rows_strict_raises_naming_row_and_column(tmp_path, hf_cache, bad, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [pku_row(), pku_row(), bad])
    with pytest.raises(ValueError, match=rf"row 2: {reason}"):
        load_pairs(str(path), **hf_cache)


def test_bad_rows_lenient_are_counted(tmp_path, hf_cache):
    rows = [pku_row(prompt="good0", safe0=1, safe1=0)]
    rows += [pku_row(prompt="bad0", safe0=True, safe1=False, better=2)]
    rows += [pku_row(prompt="good1", better=1, safer=0)]
    rows += [pku_row(prompt="bad1", r0=None), pku_row(prompt="bad2", r0=None)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds, report = load_pairs(str(path), strict=False, **hf_cache)
    assert ds["prompt"] == ["good0", "good1"]
    assert ds["chosen_unsafe"] == [False, True]  # 0/1 flags are accepted
    assert report.rows_read == 5 and report.rows_kept == 2
    assert report.skipped == {"better_response_id: not 0 or 1": 1, "response_0: missing text": 2}
    assert [i for i, _ in report.skipped_examples] == [1, 3, 4]
    assert report.rows_read == report.rows_kept + sum(report.skipped.values())


def test_safer_id_absent_is_derived(tmp_path, hf_cache):
    rows = []
    for s0 in (True, False):
        for s1 in (True, False):
            row = pku_row(safe0=s0, safe1=s1, better=0)
            del row["safer_response_id"]
            rows.append(row)
    ds, _ = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)), **hf_cache)
    # chosen is safer unless chosen unsafe and rejected safe
    assert ds["chosen_is_safer"] == [True, True, False, True]


def test_canonical_rows_with_refs_and_safe_aliases(tmp_path, hf_cache):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_safe": True, "rejected_safe": False,
         "ref_chosen_logps": -3.5, "ref_rejected_logps": -4.0, "source": "x"},
        {"prompt": "q", "chosen": "c", "rejected": "d", "chosen_safe": False, "rejected_safe": True,
         "ref_chosen_logps": float("nan"), "ref_rejected_logps": -1.0, "source": "y"},
    ]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))  # parquet keeps NaN (JSON would not)
    ds, report = load_pairs(str(tmp_path / "c.parquet"), **hf_cache)
    assert report.schema == "canonical"
    assert ds.column_names == CANONICAL + ["ref_chosen_logps", "ref_rejected_logps"]
    assert ds["chosen_unsafe"] == [False, True] and ds["rejected_unsafe"] == [True, False]
    assert ds["chosen_is_safer"] == [True, False]
    assert ds["ref_chosen_logps"][0] == -3.5 and math.isnan(ds["ref_chosen_logps"][1])  # NaN is kept, not hidden
    assert report.dropped_columns == ["source"]


def test_user_column_mapping(tmp_path, hf_cache):
    rows = [{"question": "p", "good": "a", "bad": "b", "good_harmful": False, "bad_harmful": True},
            {"question": "q", "good": "c", "bad": "d", "good_harmful": True, "bad_harmful": True}]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad", "chosen_unsafe": "good_harmful",
               "rejected_unsafe": "bad_harmful"}
    ds, report = load_pairs(str(path), column_mapping=mapping, **hf_cache)
    assert ds.column_names == CANONICAL and report.schema == "canonical (column_mapping)"
    assert ds["prompt"] == ["p", "q"] and ds["chosen"] == ["a", "c"]
    assert ds["chosen_unsafe"] == [False, True] and ds["chosen_is_safer"] == [True, True]
    with pytest.raises(ValueError, match=r"source columns \['nope'\]"):
        load_pairs(str(path), column_mapping={**mapping, "prompt": "nope"}, **hf_cache)
    with pytest.raises(ValueError, match=r"unknown target names \['question'\]"):
        load_pairs(str(path), column_mapping={"question": "prompt"}, **hf_cache)
    with pytest.raises(TypeError, match="column_mapping"):
        load_pairs(str(path), column_mapping=[("prompt", "question")], **hf_cache)
    # PKU-named targets: a renamed PKU export
    pku = [{"instruction": "p", "a": "x", "b": "y", "a_ok": True, "b_ok": False, "winner": 1}]
    path = write_jsonl(tmp_path / "pku_renamed.jsonl", pku)
    ds, report = load_pairs(str(path), column_mapping={
        "prompt": "instruction", "response_0": "a", "response_1": "b", "is_response_0_safe": "a_ok",
        "is_response_1_safe": "b_ok", "better_response_id": "winner"}, **hf_cache)
    assert report.schema == "pku (column_mapping)"
    assert ds[0] == {"prompt": "p", "chosen": "y", "rejected": "x", "chosen_unsafe": True,
                     "rejected_unsafe": False, "chosen_is_safer": False}


def test_value_parsers():
    import numpy as np

    from safedpo_kernels.data.schema import RowError, as_flag, as_response_id, as_text

    for ok, expected in ((True, True), (0, False), (1, True), (np.True_, True), (np.int64(0), False)):
        assert as_flag(ok, "f") is expected
    for bad in ("true", 2, -1, 1.0, None, np.array([True, False]), np.float64(0.0)):
        with pytest.raises(RowError, match="f: not a bool or 0/1"):
            as_flag(bad, "f")
    assert as_response_id(np.int64(1), "id") == 1
    for bad in (True, 2, "0", 0.0, None):
        with pytest.raises(RowError, match="id: not 0 or 1"):
            as_response_id(bad, "id")
    assert as_text(" hi ", "t") == " hi "  # text is kept unchanged
    for bad, reason in ((None, "missing text"), ("", "empty text"), ("\n ", "empty text"), (3, "not a string")):
        with pytest.raises(RowError, match=f"t: {reason}"):
            as_text(bad, "t")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", r"empty\.jsonl' is empty \(0 bytes\)"),
        ("blank.jsonl", b"\n  \n\n", r"blank\.jsonl' has no rows \(only whitespace"),
        ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', r"latin1\.jsonl' is not UTF-8 text \(invalid byte 0xe9 at line 1"),
        ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": "b", }\n', r"broken\.jsonl', line 2: not valid JSON"),
        ("cut.jsonl", b'{"prompt": "a", "response_0": "b"\n', r"cut\.jsonl', line 1: not valid JSON"),
        ("scalar.jsonl", b'{"prompt": "a"}\n3\n', r"scalar\.jsonl', line 2: expected a JSON object per line"),
        ("empty.json", b"[]", r"empty\.json' has no rows \(an empty JSON list\)"),
        ("empty.parquet", b"", r"empty\.parquet' is empty \(0 bytes\)"),
    ],
)
def test_unreadable_local_files_name_file_and_row(tmp_path, hf_cache, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_pairs(str(path), **hf_cache)


def test_unreadable_file_in_a_folder_is_named(tmp_path, hf_cache):
    write_jsonl(tmp_path / "data" / "train-0.jsonl", [pku_row()])
    (tmp_path / "data" / "train-1.jsonl").write_bytes(b'{"prompt": "a"}\n{oops}\n')
    with pytest.raises(ValueError, match=r"train-1\.jsonl', line 2: not valid JSON"):
        load_pairs(str(tmp_path / "data"), **hf_cache)


def test_pku_long_fixture_splits_load():
    for split, n in (("train", 728), ("validation", 88), ("test", 88)):
        ds, report = load_pairs("fixture:pku_long", split=split)
        assert len(ds) == n and report.rows_kept == n
    with pytest.raises(ValueError, match=r"split: the fixture 'pku_long' has splits \['train', 'validation', 'test'\]"):
        load_pairs("fixture:pku_long", split="dev")
    with pytest.raises(ValueError, match=r"split: the fixture 'pku_tiny' has splits \['train', 'test'\]"):
        load_pairs("fixture:pku_tiny", split="validation")
