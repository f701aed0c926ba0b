"""The FSDP2 recipe end to end on CPU: 2 gloo ranks against 1 rank, loss, resume, export.

One 2-rank run (6 steps, checkpoints at 3 and 6) is shared by the tests of this module; the resume
test continues a copy of it from step 3, the gradient test runs 1 rank in-process.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from recipe_testutils import read_metrics, torchrun, write_config

pytestmark = pytest.mark.slow

STEPS = 6
RPO_ALPHA = 0.5  # the NLL (RPO) term on: its step-wide token normalizer is checked across ranks too
TINY_LAYERS = 2
SPEC_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "safety/safe_vs_unsafe_frac", "pairs/kept",
                "pairs/swapped", "pairs/dropped", "lr", "tokens_per_s", "peak_memory_gb", "grad_norm")


@pytest.fixture(scope="module")
def run_2rank(tmp_path_factory):
    """2 ranks x 3 pairs, 6 steps; 'better' selection, so T(D) drops pairs inside the loss (uneven
    kept counts across ranks exercise the global-batch normalization)."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = tmp / "run"
    cfg = write_config(tmp / "cfg.yaml", selection="better", rpo_alpha=RPO_ALPHA, max_steps=STEPS, save_every=3,
                       keep_checkpoints=3, output_dir=str(out), debug_dump_grads=str(tmp / "grads_2rank.pt"))
    stdout = torchrun(cfg)
    return {"tmp": tmp, "out": out, "cfg": cfg, "stdout": stdout, "rows": read_metrics(out / "metrics.jsonl")}


def _train_rows(rows):
    return [r for r in rows if "loss" in r]


def test_gradients_match_single_rank(run_2rank, tmp_path):
    """Full gradients after the first backward: 2 ranks x 3 pairs == 1 rank x (3 + 3 accumulated), with
    the NLL term (rpo_alpha) normalized by the step's winner tokens.

    Same six pairs (DistributedSampler hands rank r the permutation's entries r, r+2, ...; one rank
    takes them in order), same initial weights. The single rank also uses the *live* reference
    (a second sharded copy) instead of precomputed log-probs; at step 0 both equal the policy's.
    Tolerance: both sides are fp32 evaluations of the same sums in different orders (other batch
    shapes and padding, reduction across ranks vs across micro-batches), which moves results by a
    few ulp of the gradient's scale; 1e-5 of each tensor's max-abs is far above that and far below
    the errors of the known wrong patterns (unreduced or doubly-counted head gradients, per-rank
    means: 10-100%).
    """
    from recipes.train_safedpo import run

    cfg = {**_tiny(), "selection": "better", "rpo_alpha": RPO_ALPHA, "max_steps": 1, "micro_batch_size": 3,
           "grad_accum_steps": 2, "reference_mode": "live", "eval_split": None, "export_hf": False, "plot": False,
           "output_dir": str(tmp_path / "one"), "debug_dump_grads": str(tmp_path / "grads_1rank.pt")}
    result = run(cfg)
    assert result["steps"] == 1
    two = torch.load(run_2rank["tmp"] / "grads_2rank.pt", weights_only=True)["grads"]
    dump = torch.load(tmp_path / "grads_1rank.pt", weights_only=True)
    one = dump["grads"]
    kept = [int((~(b["chosen_unsafe"] & b["rejected_unsafe"])).sum()) for b in dump["batches"]]
    assert kept[0] != kept[1], f"kept pairs per micro-batch {kept}: the batch should exercise uneven drops"
    assert sorted(two) == sorted(one)
    assert "lm.model.embed_tokens.weight" in one and "lm.lm_head.weight" not in one  # tied: one parameter
    worst = max(((two[k] - g).abs().max() / g.abs().max()).item() for k, g in one.items())
    print(f"2-rank vs 1-rank: worst max-abs error / scale = {worst:.2e}")
    for name, g1 in one.items():
        g2 = two[name]
        assert g2.shape == g1.shape, name
        scale = g1.abs().max().item()
        assert scale > 0, f"{name}: zero gradient"
        err = (g2 - g1).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max |g2 - g1| = {err:.3e}, scale {scale:.3e}"


def test_loss_decreases_and_metrics_logged(run_2rank):
    rows = run_2rank["rows"]
    train = _train_rows(rows)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        for key in SPEC_METRICS:
            assert key in r and math.isfinite(r[key]), (key, r)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    first, last = evals[0], evals[-1]
    assert last["eval/loss"] < first["eval/loss"] - 1e-3, (first, last)
    assert 0.0 <= last["eval/safe_over_unsafe"] <= 1.0
    assert (run_2rank["out"] / "curves.png").stat().st_size > 10_000
    assert "final evaluation" in run_2rank["stdout"]


def test_resume_continues_exactly(run_2rank, tmp_path):
    """Steps 4..6 after resuming from the step-3 checkpoint == steps 4..6 of the straight run; the newer
    step-6 checkpoint has lost a shard file, so resume warns naming it and falls back to step 3."""
    out = tmp_path / "resumed"
    shutil.copytree(run_2rank["out"], out)
    next((out / "checkpoints" / "step_0000006").glob("*.distcp")).unlink()  # a damaged newest checkpoint
    shutil.rmtree(out / "hf_export")
    (out / "checkpoints" / "step_0000005.tmp").mkdir()  # a crashed save: must be ignored
    stdout = torchrun(run_2rank["cfg"], f"output_dir={out}", "resume=true", "debug_dump_grads=null")
    assert "reference (train): cache hit" in stdout  # same model + data fingerprints: no recompute
    assert "skipping damaged checkpoint" in stdout and "step_0000006" in stdout and "is missing" in stdout
    assert "resumed from" in stdout and "step_0000003" in stdout
    straight = {r["step"]: r["loss"] for r in _train_rows(run_2rank["rows"])}
    resumed = {r["step"]: r["loss"] for r in _train_rows(read_metrics(out / "metrics.jsonl"))}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_refusals_reach_every_rank_without_a_hang(run_2rank, tmp_path):
    """On 2 ranks, rank 0 decides (lock, which checkpoint is intact) and every rank raises the same
    error: a locked output_dir and a folder whose checkpoints are all damaged both fail fast, naming
    the lock / the folders, instead of one rank waiting in a collective until the timeout."""
    import json
    import os
    import socket

    out = tmp_path / "locked"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # a live run
    with pytest.raises(AssertionError, match=r"in use by another run"):
        torchrun(run_2rank["cfg"], f"output_dir={out}", "debug_dump_grads=null", timeout=180)
    # (a rank left waiting would have hit the 180 s timeout: TimeoutExpired, not this error)
    damaged = tmp_path / "damaged"
    shutil.copytree(run_2rank["out"], damaged)
    for ckpt in (damaged / "checkpoints").glob("step_*"):
        (ckpt / ".metadata").unlink()
    with pytest.raises(AssertionError, match=r"no usable checkpoint.*step_0000006.*\.metadata"):
        torchrun(run_2rank["cfg"], f"output_dir={damaged}", "resume=true", "debug_dump_grads=null", timeout=180)


def test_export_round_trip(run_2rank):
    """The safetensors export loads with from_pretrained, stays tied, and equals the final DCP weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    out = run_2rank["out"]
    model = AutoModelForCausalLM.from_pretrained(out / "hf_export")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    dcp_to_torch_save(out / "checkpoints" / "step_0000006", out / "final.pt")
    saved = torch.load(out / "final.pt", weights_only=True)["model"]
    exported = model.state_dict()
    names = [k for k in saved if k.startswith("lm.")]
    assert names
    for key in names:
        assert torch.equal(saved[key], exported[key.removeprefix("lm.")]), key


def test_pretrained_folder_is_loaded_shard_by_shard_on_2_ranks(run_2rank, tmp_path):
    """model_name_or_path = the 2-rank run's safetensors export: each rank reads only its own rows of
    every tensor (rank 0 reads about half the bytes), and the step-0 evaluation of the loaded model equals
    the final evaluation of the run that wrote it (same weights, same 2-rank evaluation code)."""
    export = run_2rank["out"] / "hf_export"
    out = tmp_path / "from_export"
    stdout = torchrun(run_2rank["cfg"], "model_config=null", f"model_name_or_path={export}", f"output_dir={out}",
                      "max_steps=1", "debug_dump_grads=null", "export_hf=false", "plot=false")
    line = next(x for x in stdout.splitlines() if x.startswith("weights: rank 0 read"))
    read, total = (float(v) for v in line.split()[4:7:2])
    assert 0.3 * total < read < 0.7 * total, line
    start = next(r for r in read_metrics(out / "metrics.jsonl") if r["step"] == 0 and "eval/loss" in r)
    final = [r for r in run_2rank["rows"] if "eval/loss" in r][-1]
    for key in ("eval/logps_chosen", "eval/logps_rejected", "eval/safe_over_unsafe_logp"):
        assert start[key] == pytest.approx(final[key], rel=1e-6, abs=1e-6), key


def test_packed_equals_padded_on_2_ranks(run_2rank, tmp_path):
    """packing: true (one padding-free row per micro-batch, per-sequence position_ids, cu_seqlens in
    the loss) on the same pairs as the padded 2-rank run: the same first-step loss and the same full
    gradients (fp32; the attention sees the same tokens, only the batch layout differs)."""
    out = tmp_path / "packed"
    torchrun(run_2rank["cfg"], "packing=true", f"output_dir={out}", "max_steps=1", "eval_split=null",
             "export_hf=false", "plot=false", f"debug_dump_grads={tmp_path / 'grads_packed.pt'}")
    packed = torch.load(tmp_path / "grads_packed.pt", weights_only=True)
    padded = torch.load(run_2rank["tmp"] / "grads_2rank.pt", weights_only=True)
    assert "cu_seqlens" in packed["batches"][0] and packed["batches"][0]["input_ids"].shape[0] == 1
    assert sorted(packed["grads"]) == sorted(padded["grads"])
    for name, g in padded["grads"].items():
        scale = g.abs().max().item()
        err = (packed["grads"][name] - g).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max |packed - padded| = {err:.3e}, scale {scale:.3e}"
    loss_packed = _train_rows(read_metrics(out / "metrics.jsonl"))[0]["loss"]
    loss_padded = _train_rows(run_2rank["rows"])[0]["loss"]
    assert loss_packed == pytest.approx(loss_padded, rel=1e-6)


def test_loss_options_reach_the_loss_in_process(tmp_path):
    """loss_type (IPO), reference_free and rpo_alpha through run(): no reference is computed, the NLL
    metric is logged every step, and an option the loss type does not take is refused naming the key.
    (The values of each loss type against TRL and Liger are the losses module's tests.)"""
    from recipes.train_safedpo import run

    out = tmp_path / "ipo"
    result = run({**_tiny(), "loss_type": "ipo", "reference_free": True, "rpo_alpha": 0.3, "max_steps": 2,
                  "eval_split": None, "export_hf": False, "plot": False, "output_dir": str(out)})
    assert not (out / "reference_cache").exists()
    train = _train_rows(result["history"])
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and r["nll_loss"] > 0 for r in train)
    with pytest.raises(ValueError, match="'label_smoothing'"):
        run({**_tiny(), "loss_type": "hinge", "label_smoothing": 0.1, "output_dir": str(tmp_path / "bad")})


def _tiny():
    from recipe_testutils import TINY

    return dict(TINY)


def test_single_rank_gradients_match_float64_eager(tmp_path):
    """The recipe's fp32 gradients (FSDP2 root, fused head, activation checkpointing, 2 accumulated
    micro-batches, T(D) drops) against an eager float64 model with materialized logits
    (safedpo_kernels.reference) on the same micro-batches and initial weights.

    Tolerance: fp32 forward/backward through 2 layers and a 13k x 32 head differ from float64 by
    ~1e-6 relative to each gradient's scale (measured 6e-7: 24-bit mantissa, short reduction chains);
    1e-5 of each tensor's max-abs leaves room for that and catches any mis-scaling or missing term.
    """
    from recipes.train_safedpo import Recipe, run
    from safedpo_kernels.reference import reference_fused_safedpo

    cfg = {**_tiny(), "selection": "better", "max_steps": 1, "micro_batch_size": 3, "grad_accum_steps": 2,
           "eval_split": None, "export_hf": False, "plot": False, "output_dir": str(tmp_path / "one"),
           "debug_dump_grads": str(tmp_path / "grads.pt")}
    run(cfg)
    dump = torch.load(tmp_path / "grads.pt", weights_only=True)
    recipe = Recipe(cfg)
    recipe._load_tokenizer()
    from recipes.train_safedpo import _build_lm, _model_config

    lm = _build_lm(recipe.cfg, _model_config(recipe.cfg, recipe.tokenizer, "eager"), real=True).double()
    kept = [(~(b["chosen_unsafe"] & b["rejected_unsafe"])).sum() for b in dump["batches"]]
    total_kept = sum(kept)
    assert 0 < total_kept < sum(b["chosen_unsafe"].numel() for b in dump["batches"])  # T(D) dropped a pair
    for batch, n in zip(dump["batches"], kept):
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss, _ = reference_fused_safedpo(
            lm.lm_head.weight, hidden[:, :-1], batch["labels"][:, 1:], batch["chosen_unsafe"],
            batch["rejected_unsafe"], ref_chosen_logps=batch["ref_chosen_logps"].double(),
            ref_rejected_logps=batch["ref_rejected_logps"].double(), beta=cfg.get("beta", 0.1),
            delta=cfg.get("delta", 10.0))
        (loss * n / total_kept).backward()
    expected = {f"lm.{k}": p.grad for k, p in lm.named_parameters()}
    for name, g in dump["grads"].items():
        ref = expected[name]
        scale = ref.abs().max().item()
        err = (g.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max |g - g64| = {err:.3e}, scale {scale:.3e}"


def test_sft_objective_in_process(tmp_path):
    """objective=sft through run(): the held-out NLL per token drops, metrics and export exist."""
    from recipes.train_safedpo import run

    result = run({**_tiny(), "objective": "sft", "max_steps": 4, "lr": 1e-2, "plot": False,
                  "output_dir": str(tmp_path / "sft")})
    evals = [r for r in result["history"] if "eval/nll_per_token" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[-1]["eval/nll_per_token"] < evals[0]["eval/nll_per_token"] - 0.05, evals
    assert "eval/safe_over_unsafe_logp" in result["final_eval"]
    assert all(math.isfinite(x) for x in result["train_losses"]) and len(result["train_losses"]) == 4
    assert (tmp_path / "sft" / "hf_export" / "config.json").exists()


LORA = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj", "gate_proj"]}


def test_lora_two_ranks_equal_one_rank_base_frozen(tmp_path):
    """peft: LoRA adapters under FSDP2. 2 ranks (precomputed reference) vs 1 rank x 2 accumulated
    micro-batches (live reference = the adapter-disabled policy): the same gradients, on the adapters
    only (at step 0 lora_B = 0, so only lora_B has a nonzero gradient). After 2 steps the base weights
    in the checkpoint equal the initial ones bit for bit, the adapters moved, and the export holds the
    merged weights W + (alpha / r) B A."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from recipes.train_safedpo import Recipe, _build_lm, _model_config, run

    out2 = tmp_path / "lora2"
    cfg2 = write_config(tmp_path / "lora.yaml", peft=LORA, selection="better", max_steps=2, eval_split=None,
                        output_dir=str(out2), debug_dump_grads=str(tmp_path / "g2.pt"), plot=False)
    stdout = torchrun(cfg2)
    assert "trained)" in stdout
    one = {**_tiny(), "peft": LORA, "selection": "better", "max_steps": 1, "grad_accum_steps": 2,
           "reference_mode": "live", "eval_split": None, "export_hf": False, "plot": False,
           "output_dir": str(tmp_path / "lora1"), "debug_dump_grads": str(tmp_path / "g1.pt")}
    run(one)
    g2 = torch.load(tmp_path / "g2.pt", weights_only=True)["grads"]
    g1 = torch.load(tmp_path / "g1.pt", weights_only=True)["grads"]
    assert sorted(g1) == sorted(g2) and g1 and all(".lora_A." in k or ".lora_B." in k for k in g1), sorted(g1)[:4]
    assert len(g1) == 2 * 3 * TINY_LAYERS  # A and B of three targets per layer
    scale = max(g.abs().max().item() for g in g1.values())
    assert scale > 0
    for name, g in g1.items():
        if ".lora_A." in name:
            assert g.abs().max().item() == 0.0, name  # B = 0 at step 0
        assert (g2[name] - g).abs().max().item() <= 1e-5 * scale, name
    # base weights unchanged, adapters trained
    recipe = Recipe({**_tiny(), "output_dir": str(tmp_path / "x")})
    recipe._load_tokenizer()
    base = _build_lm(recipe.cfg, _model_config(recipe.cfg, recipe.tokenizer, "sdpa"), real=True).state_dict()
    dcp_to_torch_save(out2 / "checkpoints" / "step_0000002", tmp_path / "final.pt")
    saved = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    adapters = {k: v for k, v in saved.items() if ".lora_" in k}
    assert adapters and all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B." in k)
    checked = 0
    for key, value in base.items():
        name = "lm." + key
        for target in LORA["target_modules"]:
            name = name.replace(f".{target}.", f".{target}.base_layer.")
        if name not in saved and key == "lm_head.weight":  # tied: stored once, as the embedding
            continue
        assert torch.equal(saved[name], value), key
        checked += 1
    assert checked >= len(base) - 1
    merged = AutoModelForCausalLM.from_pretrained(out2 / "hf_export").state_dict()
    pre = "lm.model.layers.0.self_attn.q_proj."
    expected = saved[pre + "base_layer.weight"] + 2.0 * saved[pre + "lora_B.default.weight"] @ saved[pre + "lora_A.default.weight"]
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)


def test_lora_resume_continues_exactly_in_process(tmp_path):
    """A LoRA run (optimizer state on the adapters only) resumes from its step-2 checkpoint and
    reproduces steps 3-4 of the straight run bit for bit."""
    from recipes.train_safedpo import run

    base = {**_tiny(), "peft": LORA, "max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "eval_split": None,
            "export_hf": False, "plot": False}
    straight = run({**base, "output_dir": str(tmp_path / "a")})["train_losses"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    resumed = run({**base, "output_dir": str(tmp_path / "b"), "resume": True})["train_losses"]
    assert len(straight) == len(resumed) == 4 and resumed[2:] == straight[2:], (straight, resumed)
