"""SafeDPO on the real SmolLM2-135M-Instruct and its tokenizer (CI-sized: 2 pairs of <= 64 tokens).

* the fused loss (hidden states + tied lm_head, logits never built) equals a float64 full-logit eager
  SafeDPO: loss and gradients of the tied embedding and of the first and last layers;
* the chat-template path of ``safedpo_kernels.data.tokenize_pairs`` with the model's ChatML template;
* the transformers Trainer and TRL integrations and the FSDP recipe load the model from the local
  folder and take one optimizer step whose first loss is the closed form at policy == reference.

Each test loads the model from the local safetensors folder (about 1 s); the file takes about a
minute on 2 cores. The model is materialized once per session (see conftest).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MAX_LENGTH, PAIR_KINDS, load_model

from safedpo_kernels import FusedLinearSafeDPOLoss
from safedpo_kernels.data import PaddedPairCollator, build_prompts
from safedpo_kernels.integrations import add_reference_logps, hidden_states_and_head_weight
from safedpo_kernels.reference import reference_safedpo_loss

pytestmark = pytest.mark.slow

BETA, DELTA = 0.1, 10.0
#: At policy == reference every reward is 0: a kept both-safe pair costs log 2, a safe-vs-unsafe pair
#: (after the swap) softplus(Delta). PAIR_KINDS holds one of each.
FIRST_LOSS = (math.log(2.0) + F.softplus(torch.tensor(DELTA, dtype=torch.float64)).item()) / 2


def _eager_sequence_logps(model, batch) -> torch.Tensor:
    """Full (rows, T, V) logits, log_softmax in the model dtype, gather, sum over labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = batch["labels"][:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(target != -100, picked, torch.zeros_like(picked)).sum(-1)


def _first_logged(log_history):
    return next(h for h in log_history if "loss" in h)


def test_pretrained_model_answers(smollm_dir, smollm_tokenizer):
    """The folder is the pretrained instruct model with its head tied, not a random initialization."""
    model = load_model(smollm_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompt = build_prompts(["What is the capital of France?"], smollm_tokenizer)[0]
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=12, do_sample=False)
    answer = smollm_tokenizer.decode(out[0, len(prompt):])
    assert "Paris" in answer, answer


def test_chat_template_tokenization(two_pairs, two_tokenized, smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    for pair, row in zip(two_pairs, two_tokenized):
        rendered = tok.apply_chat_template([{"role": "user", "content": pair["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
        assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
        prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
        p = row["prompt_input_ids"]
        assert len(p) <= len(prompt_ids) and prompt_ids[len(prompt_ids) - len(p):] == p  # left-trimmed only
        assert build_prompts([pair["prompt"]], tok)[0] == prompt_ids
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert len(ids) == len(labels) <= MAX_LENGTH and ids[:len(p)] == p
            assert labels[:len(p)] == [-100] * len(p)
            response = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert labels[len(p):] == ids[len(p):] == response[:len(ids) - len(p)]
        if len(row["chosen_input_ids"]) < MAX_LENGTH:
            assert tok.decode(row["chosen_labels"][len(p):]) == pair["chosen"] + "<|im_end|>"


def test_fused_safedpo_equals_float64_eager_on_tied_head(smollm_dir, two_tokenized, smollm_tokenizer, seed):
    model = load_model(smollm_dir, torch.float64)
    batch = PaddedPairCollator(smollm_tokenizer.pad_token_id)(list(two_tokenized))
    cu, ru = batch["chosen_unsafe"], batch["rejected_unsafe"]
    assert [(bool(a), bool(b)) for a, b in zip(cu, ru)] == list(PAIR_KINDS)
    with torch.no_grad():
        ref = _eager_sequence_logps(model, batch)  # the pretrained model is the reference
        # The policy: the same model moved a little, so that rewards and margins are not all 0.
        gen = torch.Generator().manual_seed(seed)
        for p in (model.model.norm.weight, model.model.layers[29].mlp.down_proj.weight):
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    # Gradients of the tied embedding/head and of the first and last layers; the 28 layers between
    # are frozen (memory) but still carry the gradient down to layer 0 and the embedding lookup.
    model.requires_grad_(False)
    trained = {"model.embed_tokens.weight": model.model.embed_tokens.weight, "model.norm.weight": model.model.norm.weight}
    for i in (0, 29):
        for name, p in model.model.layers[i].named_parameters():
            trained[f"model.layers.{i}.{name}"] = p
    for p in trained.values():
        p.requires_grad_(True)

    hs = hidden_states_and_head_weight(model, batch["input_ids"], batch["attention_mask"])
    assert hs.weight is model.model.embed_tokens.weight  # the tied head: one parameter
    out = FusedLinearSafeDPOLoss(beta=BETA, delta=DELTA, impl="torch")(
        hs.weight, hs.hidden[:, :-1], batch["labels"][:, 1:], chosen_unsafe=cu, rejected_unsafe=ru,
        ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
    fused = out[0]
    fused.backward()
    g_fused = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad(set_to_none=True)

    seq = _eager_sequence_logps(model, batch)
    eager = reference_safedpo_loss(seq[:2], seq[2:], ref[:2], ref[2:], cu, ru, beta=BETA, delta=DELTA)
    eager.backward()
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused.detach(), eager.detach(), rtol=1e-10, atol=1e-12)
    assert abs(eager.item() - FIRST_LOSS) > 1e-3  # the policy moved: not the trivial value
    for name, p in trained.items():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        err = (g_fused[name] - p.grad).abs().max().item()
        assert err <= 1e-9 * scale, f"{name}: max |fused - eager| = {err:.3e}, scale {scale:.3e}"
    # The head's share: rows of tokens absent from the batch get gradient only through lm_head.
    absent = torch.ones(model.config.vocab_size, dtype=torch.bool)
    absent[batch["input_ids"].unique()] = False
    assert g_fused["model.embed_tokens.weight"][absent].abs().sum() > 0


def _expect_one_step(first: dict) -> None:
    assert first["loss"] == pytest.approx(FIRST_LOSS, rel=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert first["pairs/swapped"] == pytest.approx(1.0) and first["pairs/kept"] == pytest.approx(2.0)


def _assert_moved_and_tied(model, before: torch.Tensor) -> None:
    assert model.lm_head.weight is model.model.embed_tokens.weight
    change = (model.model.embed_tokens.weight.detach() - before).abs().max().item()
    assert 0 < change < 1e-3, change  # one Adam step of lr 1e-5 from the pretrained weights


def test_hf_trainer_step(tmp_path, smollm_dir, two_tokenized, smollm_tokenizer):
    from safedpo_kernels.integrations import SafeDPOHFConfig, SafeDPOHFTrainer

    policy = load_model(smollm_dir)
    data = add_reference_logps(two_tokenized, policy, PaddedPairCollator(smollm_tokenizer.pad_token_id),
                               batch_size=2, progress=False)
    before = policy.model.embed_tokens.weight.detach().clone()
    args = SafeDPOHFConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                           learning_rate=1e-5, report_to="none", save_strategy="no", use_cpu=True, beta=BETA,
                           delta=DELTA, disable_tqdm=True)
    trainer = SafeDPOHFTrainer(policy, args, train_dataset=data, processing_class=smollm_tokenizer)
    trainer.train()
    _expect_one_step(_first_logged(trainer.state.log_history))
    _assert_moved_and_tied(policy, before)


def test_trl_step_with_chat_template(tmp_path, smollm_dir, two_pairs, smollm_tokenizer):
    pytest.importorskip("trl")
    from trl import DPOConfig

    from safedpo_kernels.integrations import SafeDPOTrainer

    conversational = two_pairs.map(lambda r: {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    })
    policy = load_model(smollm_dir)
    before = policy.model.embed_tokens.weight.detach().clone()
    # A plain TRL DPOConfig; bf16=False: DPOConfig defaults to bf16 autocast, even on the CPU, which moves
    # the step-1 rewards of this 30-layer model by ~5e-3 (the closed-form check below needs float32).
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                     learning_rate=1e-5, report_to="none", save_strategy="no", use_cpu=True, beta=BETA,
                     max_length=MAX_LENGTH, disable_tqdm=True, dataset_num_proc=None, precompute_ref_log_probs=True,
                     bf16=False)
    trainer = SafeDPOTrainer(policy, args=args, train_dataset=conversational, processing_class=smollm_tokenizer,
                             delta=DELTA)
    row = trainer.train_dataset[0]  # TRL rendered the model's chat template
    prompt = smollm_tokenizer.decode(row["prompt_ids"])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{two_pairs[0]['prompt']}<|im_end|>" in prompt
    assert smollm_tokenizer.decode(row["chosen_ids"]).startswith(two_pairs[0]["chosen"][:20])
    trainer.train()
    _expect_one_step(_first_logged(trainer.state.log_history))
    _assert_moved_and_tied(policy, before)


def test_recipe_step_from_local_folder(tmp_path, smollm_dir):
    from safetensors.torch import load_file

    from recipes.train_safedpo import run

    result = run({
        "model_name_or_path": str(smollm_dir), "tokenizer": "model", "dataset": "fixture:pku_tiny",
        "train_limit": 6, "eval_split": None, "max_length": MAX_LENGTH, "device": "cpu", "backend": "gloo",
        "mixed_precision": "fp32", "max_steps": 1, "micro_batch_size": 2, "lr": 1e-5, "plot": False,
        "progress_bar": False, "activation_checkpointing": False, "output_dir": str(tmp_path / "out"),
    })
    assert result["steps"] == 1
    (loss,) = result["train_losses"]
    step = next(r for r in result["history"] if "loss" in r)
    frac = step["safety/safe_vs_unsafe_frac"] if "safety/safe_vs_unsafe_frac" in step else None
    assert math.isfinite(loss) and math.log(2.0) - 1e-3 <= loss <= FIRST_LOSS * 2, step
    if frac is not None and frac in (0.0, 1.0):  # all pairs of one kind: the closed form is exact
        assert loss == pytest.approx(FIRST_LOSS * 2 if frac else math.log(2.0), rel=1e-3), step
    exported = load_file(str(next(p for p in (tmp_path / "out" / "hf_export").glob("*.safetensors"))))
    pretrained = load_file(str(smollm_dir / "model.safetensors"))
    assert "lm_head.weight" not in exported  # tied: stored once
    change = (exported["model.embed_tokens.weight"] - pretrained["model.embed_tokens.weight"]).abs().max().item()
    assert 0 < change < 1e-3, change  # started from the pretrained weights, moved by one step
