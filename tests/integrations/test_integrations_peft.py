"""PEFT (LoRA) in both trainers, and the TRL trainer against TRL's own DPOTrainer: with delta = 0 on
all-safe data SafeDPO is DPO, so loss and adapter gradients must equal TRL's for each loss type."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _integration_helpers import assert_grads_close, grads_of, make_llama

peft = pytest.importorskip("peft")
pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from safedpo_kernels.integrations import SafeDPOHFConfig, SafeDPOHFTrainer, SafeDPOTrainer  # noqa: E402


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def _dpo_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, beta=0.1, max_length=64,
                disable_tqdm=True, dataset_num_proc=None, bf16=False, seed=7)
    base.update(kw)
    return DPOConfig(**base)


def _perturb_adapters(model, seed=0):
    """LoRA B starts at 0 (policy == reference); give both trainers the same non-zero adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _all_safe(pairs, n):
    return pairs.select(range(n)).map(lambda r: {"chosen_unsafe": False, "rejected_unsafe": False})


def _same_batch(trainers, n):
    batches = [t.data_collator([t.train_dataset[i] for i in range(n)]) for t in trainers]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batches[0][key], batches[1][key]), key
    return batches


LOSS_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "ipo": dict(loss_type="ipo"),
    "hinge": dict(loss_type="hinge"),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "apo_zero": dict(loss_type="apo_zero"),
    "bco_pair": dict(loss_type="bco_pair"),
    "rpo_list": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
}


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory, tokenizer, pairs):
    """A TRL user's script, twice: plain DPOConfig + LoRA peft_config, SafeDPOTrainer (delta = 0) and
    TRL's DPOTrainer on the same all-safe rows, with the same non-zero adapters."""
    tmp_path = tmp_path_factory.mktemp("lora")
    data = _all_safe(pairs, 6)
    base = make_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    ours = SafeDPOTrainer(copy.deepcopy(base), None, _dpo_config(tmp_path), train_dataset=data,
                          processing_class=tokenizer, peft_config=_lora(), delta=0.0)
    theirs = DPOTrainer(copy.deepcopy(base), None, _dpo_config(tmp_path), train_dataset=data,
                        processing_class=tokenizer, peft_config=_lora())
    assert ours.ref_model is None and theirs.ref_model is None  # reference = adapters disabled, no copy
    for t in (ours, theirs):
        _perturb_adapters(t.model)
        t.model.train()
    return ours, theirs


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_lora_peft_config_equals_trl_dpo_trainer(case, lora_pair):
    """Loss and every adapter gradient equal TRL's on the same batch (fp32), for each loss type (the
    first case as constructed; the others set the options both trainers read at each step)."""
    from safedpo_kernels.integrations._common import ObjectiveOptions

    ours, theirs = lora_pair
    opts = LOSS_CASES[case]
    types = opts["loss_type"] if isinstance(opts["loss_type"], list) else [opts["loss_type"]]
    ours._objective = ObjectiveOptions(beta=0.1, delta=0.0, loss_types=tuple(types),
                                       loss_weights=opts.get("loss_weights"),
                                       label_smoothing=opts.get("label_smoothing", 0.0))
    theirs.loss_types, theirs.loss_weights = types, opts.get("loss_weights") or [1.0] * len(types)
    theirs.label_smoothing = opts.get("label_smoothing", 0.0)
    b_ours, b_theirs = _same_batch((ours, theirs), 4)
    for t in (ours, theirs):
        t.model.zero_grad(set_to_none=True)
    loss_ours = ours.compute_loss(ours.model, b_ours)
    loss_ours.backward()
    loss_theirs = theirs.compute_loss(theirs.model, b_theirs)
    loss_theirs.backward()
    if case == "sigmoid":
        assert abs(loss_theirs.item() - math.log(2)) > 1e-3  # policy != reference: a real comparison
    torch.testing.assert_close(loss_ours, loss_theirs.detach(), rtol=1e-5, atol=1e-6)
    g_ours, g_theirs = grads_of(ours.model), grads_of(theirs.model)
    assert g_ours and all("lora_" in k for k in g_ours)  # only the adapters get gradients
    assert_grads_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


def test_lora_trains_safedpo_base_frozen_precomputed_equals_live(tmp_path, tokenizer, pairs):
    """Mixed safe/unsafe data, delta = 10: LoRA trains, base weights do not move; the precomputed
    (adapter-disabled) reference gives the live one's first-step metrics."""
    data = pairs.select(range(8))
    base = make_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    runs = {}
    for mode in ("live", "precomputed"):
        cfg = _dpo_config(tmp_path / mode, precompute_ref_log_probs=mode == "precomputed")
        trainer = SafeDPOTrainer(copy.deepcopy(base), None, cfg, train_dataset=data, processing_class=tokenizer,
                                 peft_config=_lora(), delta=10.0)
        frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
        lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        trainer.train()
        for n, p in trainer.model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
        assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)
        runs[mode] = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(runs["live"]) == 2
    first_live, first_pre = runs["live"][0], runs["precomputed"][0]
    assert first_live["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # adapters start at 0: policy == reference
    for key in ("loss", "rewards/chosen", "logps/chosen", "pairs/kept", "pairs/swapped"):
        assert first_pre[key] == pytest.approx(first_live[key], rel=1e-5, abs=1e-6), key
    assert runs["live"][1]["rewards/margins"] > 0


def test_peft_model_reference_is_the_adapter_as_loaded(tmp_path, tokenizer, pairs):
    """A PeftModel with a trained adapter: the reference is TRL's "ref" copy of that adapter (as in
    TRL), so policy == reference at step 0 although the adapter is not zero."""
    model = peft.get_peft_model(make_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id), _lora())
    _perturb_adapters(model)
    trainer = SafeDPOTrainer(model, None, _dpo_config(tmp_path), train_dataset=pairs.select(range(4)),
                             processing_class=tokenizer, delta=10.0)
    assert "ref" in trainer.model.peft_config
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.compute_loss(trainer.model, batch)
    assert trainer._metrics["train"]["rewards/margins"][-1] == pytest.approx(0.0, abs=1e-6)


def test_hf_trainer_trains_a_peft_model(tmp_path, tokenizer, tokenized, collator):
    """SafeDPOHFTrainer + PeftModel: reference = adapters disabled (no ref_model, no columns), only the
    adapters move, and the loss equals SafeDPO on an explicit base-model reference."""
    base = make_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = peft.get_peft_model(copy.deepcopy(base), _lora())
    cfg = SafeDPOHFConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                          learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = SafeDPOHFTrainer(model, cfg, train_dataset=tokenized.select(range(8)), processing_class=tokenizer)
    _perturb_adapters(model)
    batch = collator([tokenized[i] for i in range(4)])
    model.train()
    loss = trainer.compute_loss(model, batch)
    explicit = SafeDPOHFTrainer(model, cfg, ref_model=base, train_dataset=tokenized.select(range(8)),
                                processing_class=tokenizer)
    torch.testing.assert_close(loss, explicit.compute_loss(model, batch), rtol=1e-6, atol=1e-7)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with pytest.warns(UserWarning, match="adapter is not at its initialization"):
        trainer = SafeDPOHFTrainer(model, cfg, train_dataset=tokenized.select(range(8)), processing_class=tokenizer)
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
