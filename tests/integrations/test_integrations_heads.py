"""Output heads with a logit transform (Gemma 2 soft-capping, Cohere logit_scale, Granite logits_scaling, ...):
the head description matches each model's own forward, and SafeDPO through the fused path equals the
model's full-logit forward (fp32, values and gradients)."""

from __future__ import annotations

import pytest
import torch
from _integration_helpers import eager_sequence_logps, grads_of
from torch import nn

from safedpo_kernels.integrations import (
    SequenceLogpsModel,
    causal_lm_sequence_logps,
    hidden_states_and_head_weight,
    output_head,
    verify_output_head,
)
from safedpo_kernels.integrations import heads as heads_module
from safedpo_kernels.integrations._common import model_sequence_logps
from safedpo_kernels.reference import reference_safedpo_loss

SMALL = dict(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)

#: model_type -> (config overrides, expected (logit_scale, softcap)). Transforms chosen large enough to matter.
FAMILIES = {
    "llama": ({}, (1.0, None)),
    "gemma2": (dict(final_logit_softcapping=2.0), (1.0, 2.0)),
    "gemma3_text": (dict(final_logit_softcapping=2.0), (1.0, 2.0)),
    "gemma3n_text": (dict(final_logit_softcapping=2.0, num_kv_shared_layers=0,
                          layer_types=["sliding_attention", "full_attention"]), (1.0, 2.0)),
    "gemma4_text": (dict(final_logit_softcapping=2.0), (1.0, 2.0)),
    "vaultgemma": (dict(final_logit_softcapping=2.0), (1.0, 2.0)),
    "nanochat": (dict(final_logit_softcapping=2.0), (1.0, 2.0)),
    "beam": (dict(final_logit_softcapping=2.0), (1.0, 2.0)),
    "recurrent_gemma": (dict(logits_soft_cap=2.0), (1.0, 2.0)),
    "cohere": (dict(logit_scale=4.0), (4.0, None)),
    "cohere2": (dict(logit_scale=4.0), (4.0, None)),
    "cohere2_moe": (dict(logit_scale=4.0), (4.0, None)),
    "granite": (dict(logits_scaling=0.25), (4.0, None)),
    "granitemoe": (dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1), (4.0, None)),
    "granitemoeshared": (dict(logits_scaling=0.25), (4.0, None)),
    "granitemoehybrid": (dict(logits_scaling=0.25, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                              layer_types=["mamba", "attention"]), (4.0, None)),
    "hyperclovax": (dict(logits_scaling=4.0), (4.0, None)),
    "minicpm3": (dict(dim_model_base=128, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8, num_key_value_heads=4), (4.0, None)),  # hidden / (32 / 128)
    "falcon_h1": (dict(lm_head_multiplier=4.0), (4.0, None)),
}


def tiny_lm(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**SMALL, **FAMILIES[model_type][0], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_head_description_matches_the_models_own_forward(model_type):
    """verify_output_head runs the model with its backbone output replaced by probe hidden states
    and compares its logits with the description: each family's transform is read exactly."""
    lm = tiny_lm(model_type)
    head = verify_output_head(lm)
    assert (head.logit_scale, head.softcap) == pytest.approx(FAMILIES[model_type][1])
    assert head.weight is lm.get_output_embeddings().weight


def test_verify_catches_a_wrong_description(monkeypatch):
    lm = tiny_lm("gemma2")
    monkeypatch.setitem(heads_module._HEAD_TRANSFORMS, "Gemma2ForCausalLM", lambda m: (1.0, None))
    with pytest.raises(ValueError, match="differ from the head description"):
        verify_output_head(lm)


def test_unknown_transforms_and_adapted_heads_are_refused():
    lm = tiny_lm("llama")
    lm.config.logit_scale = 2.0  # an unlisted class with a transform field: refused, not guessed
    with pytest.raises(ValueError, match=r"model.config.logit_scale=2.0"):
        output_head(lm)
    lm.config.logit_scale = None

    class ScaledHead(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    lm.lm_head = ScaledHead(32, 301, bias=False)
    with pytest.raises(ValueError, match="ScaledHead with its own forward"):
        output_head(lm)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_lm("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="PEFT adapter"):
        output_head(lora)
    bad = tiny_lm("cohere", logit_scale=float("nan"))
    with pytest.raises(ValueError, match="logit_scale=nan"):
        output_head(bad)


def _batch(seed: int, rows: int = 6, t: int = 13, vocab: int = 301):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # prompt
    b = rows // 2
    flags = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0]])[:b].bool()  # keep, swap, keep, drop
    refs = -torch.rand(2, b, generator=g) * 30
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "chosen_unsafe": flags[:, 0],
            "rejected_unsafe": flags[:, 1], "ref_chosen_logps": refs[0], "ref_rejected_logps": refs[1]}


def _safedpo(seq, batch):
    b = seq.shape[0] // 2
    return reference_safedpo_loss(seq[:b], seq[b:], batch["ref_chosen_logps"].to(seq.dtype),
                                  batch["ref_rejected_logps"].to(seq.dtype), batch["chosen_unsafe"],
                                  batch["rejected_unsafe"], beta=0.1, delta=2.0)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "llama"])
@pytest.mark.parametrize("path", ["own_loop", "trainer_forward", "fsdp_root"])
def test_fused_safedpo_equals_the_models_full_logit_forward_fp32(model_type, path, seed):
    """Loss and every parameter gradient through the fused head equal the model's own logits (fp32, 1e-5)."""
    lm = tiny_lm(model_type, seed=seed)
    with torch.no_grad():  # logits of a few units (not ~0.1 as at init), so each transform matters
        lm.get_output_embeddings().weight.mul_(25.0)
    lm.train()
    batch = _batch(seed)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if path == "own_loop":
        out = hidden_states_and_head_weight(lm, ids, mask)
        seq = causal_lm_sequence_logps(out.hidden, out.weight, labels, bias=out.bias, logit_scale=out.logit_scale,
                                       softcap=out.softcap)
    elif path == "trainer_forward":  # what the Trainer / TRL integrations run
        seq = model_sequence_logps(lm, batch, labels)
    else:
        seq = SequenceLogpsModel(lm)(ids, mask, labels)
    loss = _safedpo(seq, batch)
    loss.backward()
    fused_grads = grads_of(lm)
    lm.zero_grad(set_to_none=True)
    eager_seq = eager_sequence_logps(lm, ids, mask, labels)
    eager = _safedpo(eager_seq, batch)
    eager.backward()
    torch.testing.assert_close(seq, eager_seq.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=1e-6)
    eager_grads = grads_of(lm)
    assert fused_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():  # fp32: 1e-5 relative to each gradient's scale
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
    if model_type != "llama":  # the raw lm_head.weight alone (the old quickstart pattern) is wrong for these
        with torch.no_grad():
            out = hidden_states_and_head_weight(lm, ids, mask)
            raw = causal_lm_sequence_logps(out.hidden, out.weight, labels)
        # on the sequence log-probs (a loss of pairs can land near the true one by chance)
        assert (raw - eager_seq.detach()).abs().max() > 0.05 * eager_seq.detach().abs().max()
