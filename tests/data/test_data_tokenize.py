"""tokenize_pairs: templates, EOS, labels, the truncation policy, pad-token handling, caching, num_proc."""

from __future__ import annotations

import pytest
from data_testutils import canonical_ds

from safedpo_kernels.data import (
    DEFAULT_TEMPLATE,
    build_prompts,
    load_fixture_tokenizer,
    load_pairs,
    tokenize_pairs,
)

IGNORE = -100


def _pairs(n=3):
    rows = []
    for i in range(n):
        rows.append({"prompt": f"How can I bake bread {i}?",
                     "chosen": "Good question. First mix flour, water, salt and yeast, then knead the dough "
                               "for ten minutes.",
                     "rejected": "I am not sure." if i % 2 else "Just steal some bread.",
                     "chosen_unsafe": False, "rejected_unsafe": bool(i % 2)})
    return canonical_ds(rows)


def _split(tokenizer, ds):
    """Untruncated (prompt ids, chosen ids + eos, rejected ids + eos) per row, tokenized independently."""
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(DEFAULT_TEMPLATE.replace("{prompt}", p))["input_ids"] for p in ds["prompt"]]
    chosen = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in ds["chosen"]]
    rejected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in ds["rejected"]]
    return prompts, chosen, rejected


def test_plain_template_labels_and_eos(fixture_tokenizer):
    tok = fixture_tokenizer
    ds = _pairs()
    out, report = tokenize_pairs(ds, tok, max_length=512)
    assert report.template == DEFAULT_TEMPLATE and (report.total, report.kept, report.dropped) == (3, 3, {})
    prompts, chosen, rejected = _split(tok, ds)
    for i, row in enumerate(out):
        p = prompts[i]
        assert p[0] == tok.bos_token_id and tok.decode(p, skip_special_tokens=True).startswith(
            "BEGINNING OF CONVERSATION: USER: How can I bake bread")
        assert row["prompt_input_ids"] == p
        assert row["chosen_input_ids"] == p + chosen[i] and row["rejected_input_ids"] == p + rejected[i]
        assert row["chosen_input_ids"][-1] == tok.eos_token_id
        assert row["chosen_labels"] == [IGNORE] * len(p) + chosen[i]
        assert row["rejected_labels"] == [IGNORE] * len(p) + rejected[i]
        assert tok.decode(row["chosen_labels"][len(p):], skip_special_tokens=True) == ds[i]["chosen"]
    # passthrough columns
    assert out["chosen_unsafe"] == [False] * 3 and out["rejected_unsafe"] == [False, True, False]
    assert out["prompt"] == ds["prompt"] and out["chosen"] == ds["chosen"]
    assert build_prompts(ds["prompt"], tok) == prompts


def test_custom_and_chat_templates():
    tok = load_fixture_tokenizer()
    ds = _pairs(2)
    out, report = tokenize_pairs(ds, tok, template="USER: {prompt} BOT:")
    assert report.template == "USER: {prompt} BOT:"
    assert out[0]["prompt_input_ids"] == tok("USER: " + ds[0]["prompt"] + " BOT:")["input_ids"]
    with pytest.raises(ValueError, match="'chat'"):
        tokenize_pairs(ds, tok, template="chat")
    with pytest.raises(ValueError, match="placeholder"):
        tokenize_pairs(ds, tok, template="USER: {question}")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    out, report = tokenize_pairs(ds, tok)  # template=None picks the chat template when there is one
    assert report.template == "chat"
    rendered = f"<s>user: {ds[0]['prompt']} assistant:"
    p = tok(rendered, add_special_tokens=False)["input_ids"]
    assert p.count(tok.bos_token_id) == 1  # the template's own BOS, none added on top
    assert out[0]["prompt_input_ids"] == p
    assert out[0]["chosen_labels"] == [IGNORE] * len(p) + tok(ds[0]["chosen"], add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]


def test_truncation_policy(fixture_tokenizer):
    tok = fixture_tokenizer
    ds = _pairs(1)
    (p,), (c,), (r,) = _split(tok, ds)
    longest = max(len(c), len(r))
    assert len(p) > 8 and len(c) > len(r) > 3

    def run(**kw):
        out, report = tokenize_pairs(ds, tok, **kw)
        return (out[0] if len(out) else None), report

    # 1. fits: untouched
    row, rep = run(max_length=len(p) + longest)
    assert row["prompt_input_ids"] == p and (rep.prompt_truncated, rep.response_truncated) == (0, 0)
    # 2. prompt trimmed from the LEFT just enough; responses intact (no prompt floor)
    row, rep = run(max_length=len(p) + longest - 3, min_prompt_length=0)
    assert row["prompt_input_ids"] == p[3:] and row["chosen_input_ids"] == p[3:] + c
    assert (rep.prompt_truncated, rep.response_truncated) == (1, 0)
    # 3. prompt floor (max_length // 2 by default), then responses trimmed from the RIGHT (EOS lost)
    L = 16
    row, rep = run(max_length=L)
    assert row["prompt_input_ids"] == p[-(L // 2):]
    assert row["chosen_input_ids"] == p[-(L // 2):] + c[: L - L // 2]
    assert row["chosen_labels"] == [IGNORE] * (L // 2) + c[: L - L // 2]
    assert row["rejected_input_ids"] == p[-(L // 2):] + r[: L - L // 2]
    assert len(row["chosen_input_ids"]) == L and row["chosen_input_ids"][-1] != tok.eos_token_id
    assert (rep.prompt_truncated, rep.response_truncated, rep.max_sequence_length) == (1, 1, L)
    # explicit floor
    row, _ = run(max_length=L, min_prompt_length=3)
    assert row["prompt_input_ids"] == p[-3:] and row["chosen_labels"][3:] == c[: L - 3]
    # 4. max_prompt_length caps the prompt first, even when the pair would fit
    row, rep = run(max_length=512, max_prompt_length=4)
    assert row["prompt_input_ids"] == p[-4:] and row["chosen_input_ids"] == p[-4:] + c
    assert (rep.prompt_truncated, rep.response_truncated) == (1, 0)
    # 5. no response token left -> dropped and counted
    row, rep = run(max_length=8, min_prompt_length=8)
    assert row is None and (rep.total, rep.kept) == (1, 0) and rep.dropped == {"no response token left": 1}


def test_fixture_fits_96_tokens(fixture_tokenizer):
    ds, _ = load_pairs("fixture:pku_tiny", split="train")
    out, report = tokenize_pairs(ds, fixture_tokenizer, max_length=96)
    assert report.kept == 480 and report.prompt_truncated == report.response_truncated == 0
    assert report.max_sequence_length <= 96 and 30 <= report.mean_sequence_length <= 64


def test_pad_token_is_set_and_reported():
    tok = load_fixture_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    with pytest.warns(UserWarning, match="pad token"):
        _, report = tokenize_pairs(_pairs(1), tok)
    assert tok.pad_token_id == tok.eos_token_id and "no pad token" in report.notes[0]


def test_bad_arguments(fixture_tokenizer):
    ds = _pairs(1)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pairs(ds, fixture_tokenizer, max_length=1)
    with pytest.raises(ValueError, match="num_proc"):
        tokenize_pairs(ds, fixture_tokenizer, num_proc=0)
    with pytest.raises(ValueError, match="ignore_index: 5 is a token id"):
        tokenize_pairs(ds, fixture_tokenizer, ignore_index=5)
    with pytest.raises(ValueError, match="min_prompt_length"):
        tokenize_pairs(ds, fixture_tokenizer, max_length=8, min_prompt_length=9)
    with pytest.raises(ValueError, match=r"missing canonical columns \['rejected_unsafe'\]"):
        tokenize_pairs(ds.remove_columns("rejected_unsafe"), fixture_tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        tokenize_pairs(ds, "gpt2")
    with pytest.raises(ValueError, match="empty"):
        tokenize_pairs(ds.select([]), fixture_tokenizer)
    tok = load_fixture_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_pairs(ds, tok)


def test_cached_and_parallel(fixture_tokenizer, tmp_path):
    ds, _ = load_pairs("fixture:pku_tiny", split="test", cache_dir=str(tmp_path / "hf"))
    first, _ = tokenize_pairs(ds, fixture_tokenizer, max_length=64)
    again, _ = tokenize_pairs(ds, fixture_tokenizer, max_length=64)
    # file-backed input: Dataset.map writes a cache file and the second call reuses it
    names = [f["filename"] for f in first.cache_files]
    assert names and [f["filename"] for f in again.cache_files] == names
    other, _ = tokenize_pairs(ds, fixture_tokenizer, max_length=48)
    assert other.cache_files[0]["filename"] != first.cache_files[0]["filename"]
    # an in-memory copy has no cache to hit, so this really runs 2 worker processes
    import datasets

    in_memory = datasets.Dataset.from_list(ds.to_list())
    parallel, report = tokenize_pairs(in_memory, fixture_tokenizer, max_length=64, num_proc=2)
    assert not parallel.cache_files and report.kept == len(ds)
    assert parallel.to_list() == first.to_list()


def test_reference_logps_pass_through(fixture_tokenizer):
    ds = _pairs(2).add_column("ref_chosen_logps", [-1.0, -2.0]).add_column("ref_rejected_logps", [-3.0, -4.0])
    out, _ = tokenize_pairs(ds, fixture_tokenizer)
    assert out["ref_chosen_logps"] == [-1.0, -2.0] and out["ref_rejected_logps"] == [-3.0, -4.0]
    assert out["chosen_is_safer"] == ds["chosen_is_safer"]
