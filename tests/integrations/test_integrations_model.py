"""The model helpers against eager logits in float64: values and gradients, tied and untied heads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _integration_helpers import eager_sequence_logps, grads_of, assert_grads_close, make_llama
from torch import nn

from safedpo_kernels.integrations import (
    SequenceLogpsModel,
    add_reference_logps,
    causal_lm_sequence_logps,
    forward_hidden_states,
    get_backbone,
    hidden_states_and_head_weight,
    output_head,
    reference_sequence_logps,
)


def _batch(collator, tokenized, start, n):
    return collator([tokenized[i] for i in range(start, start + n)])


@pytest.mark.parametrize("tied", [False, True])
def test_helper_matches_eager_logits_float64(tied, tokenizer, tokenized, collator, seed):
    lm = make_llama(len(tokenizer), tied=tied, seed=seed, dtype=torch.float64)
    batch = _batch(collator, tokenized, 3, 5)  # 5 pairs: an odd row count
    hidden, weight, bias, logit_scale, softcap = hidden_states_and_head_weight(lm, batch["input_ids"],
                                                                               batch["attention_mask"])
    assert (logit_scale, softcap) == (1.0, None)
    assert hidden.shape == (*batch["input_ids"].shape, lm.config.hidden_size) and bias is None
    assert weight is lm.lm_head.weight
    assert (weight is lm.model.embed_tokens.weight) == tied
    fused = causal_lm_sequence_logps(hidden, weight, batch["labels"])
    (fused * torch.linspace(0.5, 1.5, fused.numel(), dtype=fused.dtype)).sum().backward()
    g_fused = grads_of(lm)
    lm.zero_grad(set_to_none=True)
    eager = eager_sequence_logps(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])
    (eager * torch.linspace(0.5, 1.5, eager.numel(), dtype=eager.dtype)).sum().backward()
    torch.testing.assert_close(fused, eager.detach(), rtol=1e-10, atol=1e-9)
    assert_grads_close(g_fused, grads_of(lm), rtol=1e-9, atol=1e-11)


def test_root_forward_capture_equals_backbone_and_builds_one_logit_column(tokenizer, tokenized, collator):
    lm = make_llama(len(tokenizer))
    batch = _batch(collator, tokenized, 0, 3)
    seen = {}
    handle = lm.lm_head.register_forward_hook(lambda m, a, out: seen.setdefault("logits", out.shape))
    hidden = forward_hidden_states(lm, batch["input_ids"], batch["attention_mask"])
    handle.remove()
    assert seen["logits"] == (6, 1, len(tokenizer))  # logits_to_keep=1: never (rows, T, V)
    direct = hidden_states_and_head_weight(lm, batch["input_ids"], batch["attention_mask"]).hidden
    torch.testing.assert_close(hidden, direct, rtol=0, atol=0)


def test_sequence_logps_model_and_precompute_agree(tokenizer, tokenized, collator):
    lm = make_llama(len(tokenizer), dtype=torch.float64)
    wrapper = SequenceLogpsModel(lm)
    assert wrapper._no_split_modules == lm._no_split_modules
    batch = _batch(collator, tokenized, 0, 4)
    seq = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"])
    eager = eager_sequence_logps(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(seq, eager, rtol=1e-10, atol=1e-9)
    rc, rr = reference_sequence_logps(lm, batch)
    assert not rc.requires_grad
    torch.testing.assert_close(torch.cat([rc, rr]), eager.detach(), rtol=1e-10, atol=1e-9)
    lm.train()
    with_refs = add_reference_logps(tokenized.select(range(6)), lm, collator, batch_size=4, progress=False)
    assert lm.training  # mode restored
    again = collator([with_refs[i] for i in range(4)])
    torch.testing.assert_close(again["ref_chosen_logps"], rc.float(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(again["ref_rejected_logps"], rr.float(), rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        wrapper(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="batch_size"):
        add_reference_logps(tokenized, lm, collator, batch_size=0)


def test_bad_models_are_refused(tokenizer):
    with pytest.raises(TypeError, match="decoder backbone"):
        get_backbone(nn.Linear(3, 3))
    lm = make_llama(len(tokenizer))
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_head(lm)
    with pytest.raises(ValueError, match="hidden / labels"):
        causal_lm_sequence_logps(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.slow
def test_ddp_and_fsdp2_gradients_equal_single_process(tmp_path):
    """2 gloo ranks: DDP through the root forward and the FSDP2 SequenceLogpsModel root give the
    single-process gradients (float64); a sharded head outside the root's forward is refused."""
    script = Path(__file__).with_name("_distributed_check.py")
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), port, str(tmp_path / "grads.pt")], capture_output=True,
                         text=True, timeout=240, env=env)
    line = next((x for x in out.stdout.splitlines() if x.startswith("MAXDIFF")), None)
    assert line is not None, out.stdout[-3000:] + out.stderr[-3000:]
    values = dict(kv.split("=") for kv in line.split()[1:])
    assert float(values["ddp"]) < 1e-12 and float(values["fsdp"]) < 1e-12, line


def test_fused_head_runs_outside_autocast(seed):
    """Under bf16 autocast (TRL's default) the head still computes in the weight's dtype, forward and backward."""
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 37, (3, 9))
    labels[:, :4] = -100
    plain = causal_lm_sequence_logps(hidden, weight, labels)
    (g_plain,) = torch.autograd.grad(plain.sum(), weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = causal_lm_sequence_logps(hidden, weight, labels)
    (g_cast,) = torch.autograd.grad(cast.sum(), weight)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
    torch.testing.assert_close(g_cast, g_plain, rtol=0, atol=0)


def test_packed_batches_equal_padded_float64(tokenizer, tokenized, collator):
    """PackedPairCollator batches (position_ids, cu_seqlens, no padding) give the padded log-probs."""
    from safedpo_kernels.data import PackedPairCollator

    lm = make_llama(len(tokenizer), dtype=torch.float64)
    rows = [tokenized[i] for i in range(2, 7)]
    padded, packed = collator(rows), PackedPairCollator()(rows)
    eager = eager_sequence_logps(lm, padded["input_ids"], padded["attention_mask"], padded["labels"])
    wrapper = SequenceLogpsModel(lm)
    seq = wrapper(packed["input_ids"], labels=packed["labels"], position_ids=packed["position_ids"],
                  cu_seqlens=packed["cu_seqlens"])
    torch.testing.assert_close(seq, eager, rtol=1e-10, atol=1e-9)
    rc, rr = reference_sequence_logps(lm, packed)
    torch.testing.assert_close(torch.cat([rc, rr]), eager.detach(), rtol=1e-10, atol=1e-9)
    with pytest.raises(ValueError, match="one packed row"):
        causal_lm_sequence_logps(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                 cu_seqlens=torch.tensor([0, 3]))
