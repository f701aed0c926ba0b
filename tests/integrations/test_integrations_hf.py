"""transformers.Trainer integration: trains, equals eager SafeDPO (values and gradients), uses less memory."""

from __future__ import annotations

import copy

import pytest
import torch
from _integration_helpers import (
    BETA,
    DELTA,
    assert_grads_close,
    eager_safedpo,
    eager_sequence_logps,
    grads_of,
    make_llama,
    peak_alloc_bytes,
)

from safedpo_kernels.integrations import add_reference_logps
from safedpo_kernels.integrations import SafeDPOHFConfig, SafeDPOHFTrainer

SPEC_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "safety/safe_vs_unsafe_frac", "pairs/kept", "pairs/swapped", "pairs/dropped")


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, beta=BETA, delta=DELTA,
                disable_tqdm=True)
    base.update(kw)
    return SafeDPOHFConfig(**base)


def test_trains_with_precomputed_or_live_reference_identically(tmp_path, tiny_pair, tokenized, collator, tokenizer):
    policy, ref = tiny_pair
    data = tokenized.select(range(8))
    before = policy.lm_head.weight.detach().clone()
    with_refs = add_reference_logps(data, ref, collator, batch_size=4, progress=False)
    pre = SafeDPOHFTrainer(policy, _config(tmp_path / "pre"), train_dataset=with_refs, processing_class=tokenizer)
    pre.train()
    # The live run also checkpoints activations: the captured hidden states must not change.
    live = SafeDPOHFTrainer(copy.deepcopy(ref).requires_grad_(True),
                          _config(tmp_path / "live", activation_checkpointing=True), ref_model=ref,
                          train_dataset=data, processing_class=tokenizer)
    live.train()
    logs_pre = [h for h in pre.state.log_history if "rewards/chosen" in h]
    logs_live = [h for h in live.state.log_history if "rewards/chosen" in h]
    assert len(logs_pre) == len(logs_live) == 2
    for a, b in zip(logs_pre, logs_live):
        assert set(SPEC_METRICS) | {"loss"} <= set(a)
        for key in (*SPEC_METRICS, "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert logs_pre[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert logs_pre[1]["rewards/margins"] > 0  # one step of SafeDPO moved the margins up
    assert not torch.equal(before, policy.lm_head.weight)
    metrics = live.evaluate(eval_dataset=data)
    assert {"eval_loss", "eval_rewards/margins", "eval_pairs/kept"} <= set(metrics)


def test_loss_and_gradients_equal_eager_float64(tmp_path, tokenizer, tokenized, collator, seed):
    policy = make_llama(len(tokenizer), seed=seed, dtype=torch.float64, tied=True)
    ref = make_llama(len(tokenizer), seed=seed + 1, dtype=torch.float64, tied=True).requires_grad_(False)
    trainer = SafeDPOHFTrainer(policy, _config(tmp_path), ref_model=ref, train_dataset=tokenized,
                             processing_class=tokenizer)
    batch = collator([tokenized[i] for i in range(5, 11)])
    assert batch["chosen_unsafe"].any() and batch["rejected_unsafe"].any()
    policy.train()
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    g_fused = grads_of(policy)
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        r = eager_sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])
    eager, metrics = eager_safedpo(policy, batch, r[:6], r[6:])
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-10, atol=1e-12)
    assert_grads_close(g_fused, grads_of(policy), rtol=1e-8, atol=1e-12)
    logged = trainer._safedpo_metrics.pop("train")
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert logged[key] == pytest.approx(metrics[key].item(), rel=1e-5, abs=1e-6), key
    # A padding-free batch (PackedPairCollator) gives the same loss.
    from safedpo_kernels.data import PackedPairCollator

    packed = PackedPairCollator()([tokenized[i] for i in range(5, 11)])
    torch.testing.assert_close(trainer.compute_loss(policy, packed), eager.detach(), rtol=1e-10, atol=1e-12)


def test_peak_memory_below_eager_logits(tmp_path, tokenizer, tokenized, collator):
    """V = 32000 with a tiny hidden size: the per-step peak is dominated by what the loss allocates."""
    policy = make_llama(32000, hidden=16, layers=1)
    rows = add_reference_logps(tokenized.select(range(8)), policy, collator, batch_size=8, progress=False)
    trainer = SafeDPOHFTrainer(policy, _config(tmp_path), train_dataset=rows, processing_class=tokenizer)
    batch = collator(list(rows))
    policy.train()

    def fused():
        trainer.compute_loss(policy, batch).backward()

    def eager():
        eager_safedpo(policy, batch, batch["ref_chosen_logps"], batch["ref_rejected_logps"])[0].backward()

    peaks = {}
    for name, fn in (("fused", fused), ("eager", eager)):
        fn()  # warm-up: gradients allocated once, lazy inits done
        policy.zero_grad(set_to_none=False)
        peaks[name] = peak_alloc_bytes(fn)
        policy.zero_grad(set_to_none=False)
    logits_bytes = batch["input_ids"].numel() * 32000 * 4
    print(f"peak per step, V=32000, {batch['input_ids'].shape} tokens: fused {peaks['fused'] / 2**20:.1f} MiB, "
          f"eager {peaks['eager'] / 2**20:.1f} MiB, one fp32 logits tensor {logits_bytes / 2**20:.1f} MiB")
    assert peaks["eager"] >= 2 * logits_bytes  # the eager path holds logits and their log-softmax
    assert peaks["fused"] < peaks["eager"] - logits_bytes


def test_bad_arguments(tmp_path, tiny_pair, tokenized, tokenizer, collator, pairs):
    policy, ref = tiny_pair
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="takes a SafeDPOHFConfig, got transformers.training_args.TrainingArguments"):
        SafeDPOHFTrainer(policy, TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    trl = pytest.importorskip("trl")
    with pytest.raises(TypeError, match="For TRL's DPOConfig use safedpo_kernels.integrations.SafeDPOTrainer"):
        SafeDPOHFTrainer(policy, trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    with pytest.raises(ValueError, match="beta"):
        _config(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        _config(tmp_path, loss_type="aot")
    with pytest.raises(ValueError, match="label_smoothing"):
        _config(tmp_path, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="rpo_alpha"):
        _config(tmp_path, rpo_alpha=-1.0)
    with pytest.raises(ValueError, match="ref_model: expected a separate"):
        SafeDPOHFTrainer(policy, _config(tmp_path), ref_model=policy, train_dataset=tokenized)
    # Everything that can be checked is checked at construction, not at the first step.
    with pytest.raises(ValueError, match="train_dataset: no reference"):
        SafeDPOHFTrainer(policy, _config(tmp_path), train_dataset=tokenized, processing_class=tokenizer)
    with pytest.raises(ValueError, match="train_dataset: expected tokenized pairs"):
        SafeDPOHFTrainer(policy, _config(tmp_path), ref_model=ref, train_dataset=pairs, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"eval_dataset: missing unsafe-flag columns \['chosen_unsafe'\]"):
        SafeDPOHFTrainer(policy, _config(tmp_path), ref_model=ref, train_dataset=tokenized,
                         eval_dataset=tokenized.remove_columns(["chosen_unsafe"]), processing_class=tokenizer)
    gemma_like = make_llama(len(tokenizer))
    gemma_like.config.final_logit_softcapping = 30.0  # a transform on an unlisted class: refused up front
    with pytest.raises(ValueError, match="model: model.config.final_logit_softcapping"):
        SafeDPOHFTrainer(gemma_like, _config(tmp_path), ref_model=ref, train_dataset=tokenized,
                         processing_class=tokenizer)
    with pytest.raises(ImportError, match="renamed SafeDPOHFTrainer"):
        from safedpo_kernels.integrations.hf import SafeDPOTrainer  # noqa: F401
    trainer = SafeDPOHFTrainer(policy, _config(tmp_path, reference_free=True), train_dataset=tokenized,
                               processing_class=tokenizer)
    batch = collator([tokenized[i] for i in range(2)])
    del batch["chosen_unsafe"]
    with pytest.raises(ValueError, match="chosen_unsafe"):
        trainer.compute_loss(policy, batch)
