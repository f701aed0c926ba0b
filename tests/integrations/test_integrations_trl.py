"""TRL DPOTrainer integration: trains, equals eager SafeDPO (values and gradients), uses less memory."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

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

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from safedpo_kernels.integrations import SafeDPOTrainer  # noqa: E402
from safedpo_kernels.integrations.trl import SafeDPOConfig  # noqa: E402

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "num_tokens")
SAFETY_METRICS = ("safety/safe_vs_unsafe_frac", "pairs/kept", "pairs/swapped", "pairs/dropped")


def _config(tmp_path, cls=DPOConfig, **kw):
    """A plain trl.DPOConfig (the SafeDPO options are trainer keywords), or SafeDPOConfig with cls=."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, beta=BETA,
                max_length=64, disable_tqdm=True, dataset_num_proc=None, bf16=False)
    base.update(kw)
    return cls(**base)


def _first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def _labels(batch):
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def test_trains_with_precomputed_or_live_reference_identically(tmp_path, tiny_pair, pairs, tokenizer):
    policy, ref = tiny_pair
    data = pairs.select(range(8))
    before = policy.lm_head.weight.detach().clone()
    pre = SafeDPOTrainer(policy, args=_config(tmp_path / "pre", precompute_ref_log_probs=True),
                         train_dataset=data, processing_class=tokenizer, delta=DELTA)
    assert pre.ref_model is None and {"ref_chosen_logps", "chosen_unsafe"} <= set(pre.train_dataset.column_names)
    pre.train()
    # SafeDPOConfig carries the same options as fields.
    live = SafeDPOTrainer(copy.deepcopy(ref).requires_grad_(True), ref_model=ref,
                          args=_config(tmp_path / "live", cls=SafeDPOConfig, delta=DELTA),
                          train_dataset=data, processing_class=tokenizer)
    live.train()
    logs_pre = [h for h in pre.state.log_history if "rewards/chosen" in h]
    logs_live = [h for h in live.state.log_history if "rewards/chosen" in h]
    assert len(logs_pre) == len(logs_live) == 2
    for step, (a, b) in enumerate(zip(logs_pre, logs_live)):
        assert set(TRL_METRICS + SAFETY_METRICS) | {"loss"} <= set(a)
        for key in (*TRL_METRICS, *SAFETY_METRICS, "loss"):
            if step == 0 and key == "rewards/accuracies":
                continue  # rewards are 0 up to float32 noise at step 1: their order is noise
            # Precomputed references were batched with other padding: float32 noise only.
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
    assert logs_pre[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert logs_pre[1]["rewards/margins"] > 0
    assert logs_pre[0]["pairs/kept"] + logs_pre[0]["pairs/dropped"] == 4
    assert not torch.equal(before, policy.lm_head.weight)
    metrics = live.evaluate(eval_dataset=data)
    assert {"eval_loss", "eval_rewards/margins", "eval_pairs/kept"} <= set(metrics)


def test_loss_and_gradients_equal_eager_float64(tmp_path, tokenizer, pairs, seed):
    policy = make_llama(len(tokenizer), seed=seed, dtype=torch.float64, tied=True)
    ref = make_llama(len(tokenizer), seed=seed + 1, dtype=torch.float64, tied=True).requires_grad_(False)
    trainer = SafeDPOTrainer(policy, ref_model=ref, args=_config(tmp_path, per_device_train_batch_size=6),
                             train_dataset=pairs, processing_class=tokenizer, delta=DELTA)
    batch = _first_batch(trainer)
    assert batch["chosen_unsafe"].dtype == torch.bool and batch["chosen_unsafe"].shape == (6,)
    policy.train()
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    g_fused = grads_of(policy)
    policy.zero_grad(set_to_none=True)
    eager_batch = {**batch, "labels": _labels(batch)}
    with torch.no_grad():
        r = eager_sequence_logps(ref, batch["input_ids"], batch["attention_mask"], eager_batch["labels"])
    eager, metrics = eager_safedpo(policy, eager_batch, r[:6], r[6:])
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-10, atol=1e-12)
    assert_grads_close(g_fused, grads_of(policy), rtol=1e-8, atol=1e-12)
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert trainer._metrics["train"][key][-1] == pytest.approx(metrics[key].item(), rel=1e-5, abs=1e-6), key


def test_peak_memory_below_eager_logits(tmp_path, tokenizer, pairs):
    policy = make_llama(32000, hidden=16, layers=1, pad_token_id=tokenizer.pad_token_id)
    ref = copy.deepcopy(policy).requires_grad_(False)
    trainer = SafeDPOTrainer(policy, ref_model=ref, args=_config(tmp_path, per_device_train_batch_size=8),
                             train_dataset=pairs, processing_class=tokenizer, delta=DELTA)
    batch = _first_batch(trainer)
    eager_batch = {**batch, "labels": _labels(batch)}
    with torch.no_grad():
        r = eager_sequence_logps(ref, batch["input_ids"], batch["attention_mask"], eager_batch["labels"])
    policy.train()

    def fused():
        trainer.compute_loss(policy, batch).backward()

    def eager():
        eager_safedpo(policy, eager_batch, r[:8], r[8:])[0].backward()

    peaks = {}
    for name, fn in (("fused", fused), ("eager", eager)):
        fn()
        policy.zero_grad(set_to_none=False)
        peaks[name] = peak_alloc_bytes(fn)
        policy.zero_grad(set_to_none=False)
    logits_bytes = batch["input_ids"].numel() * 32000 * 4
    print(f"peak per step (live reference included in fused), V=32000, {tuple(batch['input_ids'].shape)} tokens: "
          f"fused {peaks['fused'] / 2**20:.1f} MiB, eager {peaks['eager'] / 2**20:.1f} MiB, "
          f"one fp32 logits tensor {logits_bytes / 2**20:.1f} MiB")
    assert peaks["eager"] >= 2 * logits_bytes
    assert peaks["fused"] < peaks["eager"] - logits_bytes


def test_bad_arguments(tmp_path, tiny_pair, pairs, tokenizer, tokenized):
    policy, ref = tiny_pair
    kw = dict(train_dataset=pairs, processing_class=tokenizer)
    with pytest.raises(ValueError, match="args.ld_alpha"):
        SafeDPOTrainer(policy, ref, _config(tmp_path, ld_alpha=0.5), **kw)
    with pytest.raises(ValueError, match="loss_type"):
        SafeDPOTrainer(policy, ref, _config(tmp_path, loss_type="aot"), **kw)
    with pytest.raises(ValueError, match="delta"):
        SafeDPOTrainer(policy, ref, _config(tmp_path), delta=-1.0, **kw)
    with pytest.raises(ValueError, match="delta: the trainer keyword"):
        SafeDPOTrainer(policy, ref, _config(tmp_path, cls=SafeDPOConfig, delta=3.0), delta=4.0, **kw)
    with pytest.raises(ValueError, match=r"train_dataset: missing unsafe-flag columns \['chosen_unsafe'\]"):
        SafeDPOTrainer(policy, ref, _config(tmp_path), train_dataset=pairs.remove_columns(["chosen_unsafe"]),
                       processing_class=tokenizer)
    values = [int(v) for v in pairs["chosen_unsafe"]]
    values[3] = 2
    bad_flags = pairs.remove_columns(["chosen_unsafe"]).add_column("chosen_unsafe", values)
    with pytest.raises(ValueError, match="chosen_unsafe: not a bool or 0/1"):
        SafeDPOTrainer(policy, ref, _config(tmp_path), train_dataset=bad_flags, processing_class=tokenizer)
    with pytest.raises(ValueError, match="tokenize_pairs output"):
        SafeDPOTrainer(policy, ref, _config(tmp_path), train_dataset=tokenized.remove_columns(
            ["prompt", "chosen", "rejected"]), processing_class=tokenizer)
    with pytest.raises(ValueError, match="ref_model: no reference"):
        SafeDPOTrainer(policy, None, _config(tmp_path), **kw)
    with pytest.raises(ValueError, match="prompt_template"):
        SafeDPOTrainer(policy, ref, _config(tmp_path), prompt_template="no placeholder", **kw)
    gemma_like = make_llama(len(tokenizer))
    gemma_like.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="model: model.config.final_logit_softcapping"):
        SafeDPOTrainer(gemma_like, ref, _config(tmp_path), **kw)
    from transformers import TrainingArguments

    from safedpo_kernels.integrations import SafeDPOHFConfig

    with pytest.raises(TypeError, match="SafeDPOHFConfig is the config of SafeDPOHFTrainer"):
        SafeDPOTrainer(policy, ref, SafeDPOHFConfig(output_dir=str(tmp_path), report_to="none"), **kw)
    with pytest.raises(TypeError, match="takes a trl.DPOConfig"):
        SafeDPOTrainer(policy, ref, TrainingArguments(output_dir=str(tmp_path), report_to="none"), **kw)
    # The HF Trainer call pasted into the TRL class (config second = ref_model slot) fails clearly too.
    with pytest.raises(TypeError, match="ref_model: expected a frozen reference model .* got DPOConfig"):
        SafeDPOTrainer(policy, _config(tmp_path), **kw)


def test_optional_dependency_message():
    """Without TRL the package imports, and the TRL module says what to install; no heavy imports."""
    code = (
        "import sys\n"
        "sys.modules['trl'] = None\n"
        "import safedpo_kernels, safedpo_kernels.integrations\n"
        "heavy = [m for m in ('transformers', 'datasets', 'trl', 'liger_kernel') if sys.modules.get(m)]\n"
        "assert not heavy, heavy\n"
        "try:\n"
        "    import safedpo_kernels.integrations.trl\n"
        "except ImportError as e:\n"
        "    print('MSG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MSG" in out.stdout and "pip install safedpo-kernels[trl]" in out.stdout, out.stdout + out.stderr


def test_trains_under_trl_default_bf16_autocast(tmp_path, tiny_pair, pairs, tokenizer):
    """TRL defaults to bf16=True (autocast): the fused head runs outside autocast and training works."""
    policy, ref = tiny_pair
    trainer = SafeDPOTrainer(policy, ref_model=ref, args=_config(tmp_path, bf16=True, max_steps=1),
                             train_dataset=pairs.select(range(4)), processing_class=tokenizer, delta=DELTA)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "rewards/chosen" in h)
    assert math.isfinite(log["loss"]) and 0 < log["loss"] < 20
    assert log["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
