"""A real fixture batch through a tiny random Llama and FusedLinearSafeDPOLoss: padded batch vs the
eager reference, and packed (cu_seqlens) vs padded per-sequence log-probs."""

from __future__ import annotations

import pytest
import torch

from safedpo_kernels import FusedLinearSafeDPOLoss, linear_logprobs
from safedpo_kernels.data import (
    PackedPairCollator,
    PaddedPairCollator,
    load_pairs,
    select_pairs,
    shift_packed_labels,
    tokenize_pairs,
)
from safedpo_kernels.fused import packed_sequence_logps
from safedpo_kernels.reference import reference_fused_safedpo


@pytest.fixture(scope="module")
def rows(fixture_tokenizer):
    ds, _ = load_pairs("fixture:pku_tiny", split="train", limit=40)
    tok, _ = tokenize_pairs(ds, fixture_tokenizer, max_length=96)
    # a batch with every T(D) case: keep, swap and drop
    picked, seen = [], set()
    for row in tok:
        case = (row["chosen_unsafe"], row["rejected_unsafe"])
        if case not in seen or len(picked) < 6:
            seen.add(case)
            picked.append(row)
        if len(picked) >= 6 and len(seen) == 4:
            break
    assert len(seen) == 4  # keep (safe winner, either loser), swap and drop cases all present
    return picked


@pytest.fixture(scope="module")
def model(fixture_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=len(fixture_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=fixture_tokenizer.pad_token_id, bos_token_id=fixture_tokenizer.bos_token_id,
                      eos_token_id=fixture_tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).double().eval()


def test_padded_fixture_batch_matches_reference(rows, model, fixture_tokenizer, seed):
    batch = PaddedPairCollator(fixture_tokenizer.pad_token_id)(rows)
    B = len(rows)
    assert batch["input_ids"].shape[0] == 2 * B
    ref_c, ref_r = torch.randn(B, dtype=torch.float64) * 5 - 60, torch.randn(B, dtype=torch.float64) * 5 - 60
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    h_fast = hidden[:, :-1].detach().requires_grad_(True)
    h_ref = hidden[:, :-1].detach().requires_grad_(True)
    target = batch["labels"][:, 1:]
    weight = model.lm_head.weight
    loss, _, metrics = FusedLinearSafeDPOLoss(beta=0.1, delta=10.0, impl="torch")(
        weight, h_fast, target, chosen_unsafe=batch["chosen_unsafe"], rejected_unsafe=batch["rejected_unsafe"],
        ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, return_metrics=True)
    ref_loss, ref_metrics = reference_fused_safedpo(
        weight, h_ref, target, batch["chosen_unsafe"], batch["rejected_unsafe"], ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r, beta=0.1, delta=10.0, ignore_index=-100, average_log_prob=False)
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-6, atol=1e-6)
    shared = sorted(set(metrics) & set(ref_metrics))
    assert {"logps/chosen", "logps/rejected", "rewards/margins"} <= set(shared)
    for key in shared:
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key].double(), rtol=1e-6, atol=1e-6)
    # the batch really exercises T(D), and the loss counts what select_pairs would
    cu, ru = batch["chosen_unsafe"], batch["rejected_unsafe"]
    assert metrics["pairs/dropped"].item() == int((cu & ru).sum()) > 0
    assert metrics["pairs/swapped"].item() == int((cu & ~ru).sum()) > 0
    (g,) = torch.autograd.grad(loss, h_fast)
    (g_ref,) = torch.autograd.grad(ref_loss, h_ref)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-6, atol=1e-9)
    # prompt and padding positions get no gradient
    assert g[target == -100].abs().max() == 0


def test_packed_logps_equal_padded(rows, model, fixture_tokenizer):
    padded = PaddedPairCollator(fixture_tokenizer.pad_token_id)(rows)
    packed = PackedPairCollator()(rows)
    weight = model.lm_head.weight
    with torch.no_grad():
        h_pad = model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
        # use_cache=False: transformers only detects packed position_ids (block-diagonal attention) without a cache
        h_pack = model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                             use_cache=False).last_hidden_state
        seq_pad = linear_logprobs(h_pad[:, :-1], weight, padded["labels"][:, 1:], impl="torch").sum(-1)
        target = shift_packed_labels(packed["labels"])
        tok = linear_logprobs(h_pack, weight, target, impl="torch")
        seq_pack = packed_sequence_logps(tok.reshape(-1), target.reshape(-1), packed["cu_seqlens"])
    assert seq_pad.shape == seq_pack.shape == (2 * len(rows),)
    torch.testing.assert_close(seq_pack, seq_pad, rtol=1e-9, atol=1e-9)
    # and through the loss: same loss from both layouts
    flags = {"chosen_unsafe": padded["chosen_unsafe"], "rejected_unsafe": padded["rejected_unsafe"]}
    refs = {"ref_chosen_logps": torch.full((len(rows),), -50.0, dtype=torch.float64),
            "ref_rejected_logps": torch.full((len(rows),), -55.0, dtype=torch.float64)}
    loss_fn = FusedLinearSafeDPOLoss(impl="torch")
    loss_pad, _ = loss_fn(weight, h_pad[:, :-1], padded["labels"][:, 1:], **flags, **refs)
    loss_pack, _ = loss_fn(weight, h_pack, target, **flags, cu_seqlens=packed["cu_seqlens"], **refs)
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-9, atol=1e-9)


def test_selected_pairs_feed_the_loss(fixture_tokenizer, model):
    """select_pairs('safedpo') then the loss: no pair is dropped or swapped again (T is idempotent)."""
    ds, _ = load_pairs("fixture:pku_tiny", split="test", limit=12)
    sel, report = select_pairs(ds, "safedpo")
    tok, _ = tokenize_pairs(sel, fixture_tokenizer, max_length=96)
    batch = PaddedPairCollator(fixture_tokenizer.pad_token_id)(list(tok))
    assert not batch["chosen_unsafe"].any()
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        zeros = torch.zeros(len(tok), dtype=torch.float64)
        _, _, metrics = FusedLinearSafeDPOLoss(impl="torch")(
            model.lm_head.weight, hidden[:, :-1], batch["labels"][:, 1:], chosen_unsafe=batch["chosen_unsafe"],
            rejected_unsafe=batch["rejected_unsafe"], ref_chosen_logps=zeros, ref_rejected_logps=zeros,
            return_metrics=True)
    assert metrics["pairs/dropped"].item() == 0 and metrics["pairs/swapped"].item() == 0
    assert report.rows_out == len(tok)
