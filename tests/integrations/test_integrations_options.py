"""Trainer options: reference-free SafeDPO in both trainers (no reference model, reference log-probs 0)
equals the functional loss on eager log-probs; TRL's prompt_template gives tokenize_pairs' prompts."""

from __future__ import annotations

import pytest
import torch
from _integration_helpers import eager_sequence_logps, make_llama

from safedpo_kernels import safedpo_loss
from safedpo_kernels.integrations import SafeDPOHFConfig, SafeDPOHFTrainer


def _eager_reference_free(policy, batch, labels, rpo_alpha=0.0):
    seq = eager_sequence_logps(policy, batch["input_ids"], batch["attention_mask"], labels)
    b = seq.shape[0] // 2
    counts = (labels[:, 1:] != -100).sum(-1)
    return safedpo_loss(seq[:b], seq[b:], None, None, batch["chosen_unsafe"], batch["rejected_unsafe"], beta=0.1,
                        delta=3.0, rpo_alpha=rpo_alpha, chosen_token_counts=counts[:b], rejected_token_counts=counts[b:])


def test_hf_trainer_reference_free(tmp_path, tokenizer, tokenized, collator):
    policy = make_llama(len(tokenizer), dtype=torch.float64)
    cfg = SafeDPOHFConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.1, delta=3.0,
                          reference_free=True, rpo_alpha=0.5)
    trainer = SafeDPOHFTrainer(policy, cfg, train_dataset=tokenized, processing_class=tokenizer)
    batch = collator([tokenized[i] for i in range(2, 8)])
    assert batch["chosen_unsafe"].any() and batch["rejected_unsafe"].any()
    torch.testing.assert_close(trainer.compute_loss(policy, batch),
                               _eager_reference_free(policy, batch, batch["labels"], rpo_alpha=0.5),
                               rtol=1e-10, atol=1e-12)


def test_trl_trainer_reference_free_and_prompt_template(tmp_path, tokenizer, pairs, tokenized):
    pytest.importorskip("trl")
    from trl import DPOConfig

    from safedpo_kernels.data import DEFAULT_TEMPLATE
    from safedpo_kernels.integrations import SafeDPOTrainer

    policy = make_llama(len(tokenizer), dtype=torch.float64, pad_token_id=tokenizer.pad_token_id)
    cfg = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.1, max_length=64, bf16=False,
                    dataset_num_proc=None, per_device_train_batch_size=6)
    trainer = SafeDPOTrainer(policy, None, cfg, train_dataset=pairs.select(range(8)), processing_class=tokenizer,
                             delta=3.0, reference_free=True, prompt_template=DEFAULT_TEMPLATE)
    assert trainer.ref_model is None  # no reference model was loaded
    # The template of tokenize_pairs / SafeDPOHFTrainer: the same prompt token ids.
    for i in range(8):
        assert trainer.train_dataset[i]["prompt_ids"] == tokenized[i]["prompt_input_ids"], i
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2, 8)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    policy.train()
    torch.testing.assert_close(trainer.compute_loss(policy, batch), _eager_reference_free(policy, batch, labels),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="ref_model: given with reference_free=True"):
        SafeDPOTrainer(policy, make_llama(len(tokenizer)), cfg, train_dataset=pairs, processing_class=tokenizer,
                       reference_free=True)


def test_token_counts_of_packed_and_padded_batches_agree(tokenized, collator):
    """The NLL normalizer (scored tokens per response) is the same for both collators' layouts."""
    from safedpo_kernels.data import PackedPairCollator
    from safedpo_kernels.integrations._common import label_token_counts

    rows = [tokenized[i] for i in range(3, 9)]
    padded, packed = collator(rows), PackedPairCollator()(rows)
    counts = label_token_counts(padded["labels"], None, -100)
    assert counts.min() > 0
    assert torch.equal(label_token_counts(packed["labels"], packed["cu_seqlens"], -100), counts)
