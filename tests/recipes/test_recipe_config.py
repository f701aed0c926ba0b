"""Config validation of the recipe and the memory planner (no processes, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipe_testutils import ROOT, TINY

from recipes.train_safedpo import CONFIG_SCHEMA, load_config, parse_overrides, validate_config

# The train_safedpo.py configs (other YAML files in the folder, e.g. tiny_compare.yaml, have their own schema).
CONFIGS = [ROOT / "recipes" / "configs" / f"{name}.yaml"
           for name in ("tiny_cpu", "llama2_7b", "llama2_13b_8x80gb", "qwen2.5_1.5b", "qwen2.5_7b")]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"learning_rate": 1e-6}, "learning_rate"),  # unknown key (typo of lr)
        ({"lr": "fast"}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"objective": "ppo"}, "objective"),
        ({"selection": "harmless"}, "selection"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"micro_batch_size": 2.5}, "micro_batch_size"),
        ({"resume": "yes"}, "resume"),
        ({"beta": 0}, "beta"),
        ({"delta": -1}, "delta"),
        ({"adam_betas": [0.9]}, "adam_betas"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"reference_mode": "frozen"}, "reference_mode"),
        ({"model_name_or_path": "some/model"}, "model_name_or_path"),  # both model sources set
        ({"model_config": {"hidden_size": 8}}, "model_config.model_type"),  # no model_type
        ({"objective": "sft", "reference_mode": "live"}, "reference_mode"),
    ],
)
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        validate_config({**TINY, **change})


def test_defaults_and_auto_selection():
    cfg = validate_config(dict(TINY))
    assert set(cfg) == set(CONFIG_SCHEMA)
    assert cfg["selection"] == "safedpo"
    assert validate_config({**TINY, "objective": "dpo"})["selection"] == "better"
    assert validate_config({**TINY, "objective": "dpo", "selection": "safer"})["selection"] == "safer"


def test_overrides_parse_as_yaml_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(path, ["lr=1e-4", "resume=true", "eval_split=null", "objective=dpo"])
    assert cfg["lr"] == 1e-4 and cfg["resume"] is True and cfg["eval_split"] is None
    with pytest.raises(ValueError, match="'epochs'"):
        load_config(path, ["epochs=0"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate_and_document_their_launch(path: Path):
    text = path.read_text()
    assert "torchrun" in text.split("\n", 3)[1] or "torchrun" in text.split("\n", 3)[2]
    load_config(path)


def test_plan_memory_13b_fits_under_45gb(capsys):
    from recipes import plan_memory

    cfg = load_config(ROOT / "recipes" / "configs" / "llama2_13b_8x80gb.yaml")
    plan = plan_memory.plan(cfg, gpus=8, gpu_mem_gb=80)
    assert 12.5 < plan["params_b"] < 13.5
    assert plan["tokens_per_gpu_microbatch"] == 8192
    assert plan["fits"] and plan["total_gb"] <= 45.0, plan
    # fp32 master weights + gradients + AdamW: 16 bytes per parameter, sharded 8 ways
    states = sum(v for k, v in plan["parts_gb"].items() if k.split()[0] in ("parameters", "gradients", "optimizer"))
    assert abs(states - 16 * plan["params_b"] * 1e9 / 8 / 2**30) < 0.01
    # the fused head's fp32 grad-weight accumulator + its bf16 copy: 32000 x 5120 x (4 + 2) bytes
    assert plan["parts_gb"]["head grad buffers (fp32 + copy)"] == pytest.approx(32000 * 5120 * 6 / 2**30)
    # root unit (embeddings + head + final norm) unsharded gradients, bf16 + fp32
    assert plan["parts_gb"]["root unit unsharded grads"] == pytest.approx((2 * 32000 * 5120 + 5120) * 6 / 2**30)
    assert plan["parts_gb"]["NCCL buffers"] == 1.0 and plan["parts_gb"]["fragmentation (10% of transients)"] > 0
    assert plan["total_with_margin_gb"] == pytest.approx(1.1 * plan["total_gb"])
    # a live reference and 16K tokens still fit in 55 GB; one GPU does not fit at all
    live16k = plan_memory.plan({**cfg, "reference_mode": "live", "max_length": 4096}, gpus=8, gpu_mem_gb=80)
    assert live16k["total_gb"] > plan["total_gb"] and live16k["parts_gb"]["reference model"] > 0
    assert plan_memory.plan({**cfg, "max_length": 4096}, gpus=8, gpu_mem_gb=80)["total_gb"] <= 55.0
    assert not plan_memory.plan(cfg, gpus=1, gpu_mem_gb=80)["fits"]
    assert plan_memory.main(["--config", str(ROOT / "recipes/configs/llama2_13b_8x80gb.yaml"), "--gpus", "8"]) == 0
    assert "FITS" in capsys.readouterr().out


def test_console_entry_points_build_the_torchrun_command(capsys):
    """safedpo-train: shipped config names resolve, torchrun flags pass through, overrides follow."""
    import sys
    import tomllib

    from safedpo_kernels import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"safedpo-train": "safedpo_kernels.cli:train", "safedpo-plan": "safedpo_kernels.cli:plan"}
    cmd = cli.build_train_command(["tiny_cpu", "--nproc-per-node", "2", "lr=1e-4", "model_config.hidden_size=64"])
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert "--standalone" in cmd
    assert cmd[-5:] == [str(ROOT / "recipes" / "train_safedpo.py"), "--config",
                        str(ROOT / "recipes" / "configs" / "tiny_cpu.yaml"), "lr=1e-4", "model_config.hidden_size=64"]
    multi = cli.build_train_command(["llama2_13b_8x80gb", "--nnodes=2", "--rdzv-endpoint=h:29500", "--nproc_per_node=8"])
    assert "--standalone" not in multi and "--nnodes=2" in multi and "--rdzv-endpoint=h:29500" in multi
    assert multi.index("--nnodes=2") < multi.index(str(ROOT / "recipes" / "train_safedpo.py"))
    assert cli.train(["tiny_cpu", "--nproc-per-node=2", "--dry-run"]) == 0
    assert "torch.distributed.run" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="shipped config"):
        cli.build_train_command(["no_such_config"])
    assert cli.train(["no_such_config"]) == 2 and "shipped config" in capsys.readouterr().err
    assert cli.plan(["llama2_13b_8x80gb", "--gpus", "8", "--gpu-mem", "80"]) == 0


def test_nested_overrides_and_model_config_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(path, ["model_config.hidden_size=64", "peft.r=4", "eval_fraction=0.1"])
    assert cfg["model_config"]["hidden_size"] == 64 and cfg["model_config"]["num_hidden_layers"] == 2
    assert cfg["peft"]["r"] == 4 and cfg["peft"]["lora_alpha"] == 16.0 and cfg["eval_fraction"] == 0.1
    assert load_config(path, ["peft.r=4", "peft=null"])["peft"] is None
    with pytest.raises(ValueError, match=r"'model_config\.hidden_sizee'.*LlamaConfig"):
        load_config(path, ["model_config.hidden_sizee=64"])
    with pytest.raises(ValueError, match=r"'max_length'.*max_position_embeddings \(128\)"):
        load_config(path, ["max_length=129"])
    with pytest.raises(ValueError, match=r"'peft\.rank'"):
        load_config(path, ["peft.rank=4"])
    with pytest.raises(ValueError, match=r"'lr' is not a mapping"):
        parse_overrides(["lr.x=1"], {"lr": 1.0})


def test_plan_measure_on_cpu_matches_the_terms():
    """--measure on CPU: the checkpointed-activation and gradient terms equal the saved-tensor and
    .grad byte counts; the per-layer (no checkpointing) term is a slight over-estimate (conservative:
    within -20 %); the 13B plan with the added terms stays under the 45 GiB target at 8K tokens."""
    from recipes import plan_memory

    cfg = load_config(ROOT / "recipes" / "configs" / "tiny_cpu.yaml")
    m = plan_memory.measure(cfg)
    terms = m["terms"]
    assert m["device"] == "cpu" and m["tokens"] == 2 * cfg["micro_batch_size"] * cfg["max_length"]
    assert terms["activations, checkpointed (layer inputs + final norm)"]["measured_over_predicted"] == pytest.approx(
        1.0, abs=0.01)
    assert terms["gradients (trained parameters, param dtype)"]["measured_over_predicted"] == pytest.approx(1.0)
    assert 0.8 <= terms["activations, one layer (saved for backward)"]["measured_over_predicted"] <= 1.0
    assert "predicted" in plan_memory.format_measure(m)
    lora = plan_memory.plan({**load_config(ROOT / "recipes" / "configs" / "llama2_13b_8x80gb.yaml"),
                             "peft": {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "bias": "none",
                                      "target_modules": ["q_proj", "v_proj"]}}, gpus=8, gpu_mem_gb=80)
    assert 0 < lora["trained_params_b"] < 0.02 and lora["parts_gb"]["optimizer (AdamW fp32 shards)"] < 0.02


def test_progress_bar_count_moves_every_step():
    """The train bar is advanced by hand: its count (and so its rate and ETA) is current after every
    step, and the postfix never redraws a stale count (the old lazy-iteration bar showed 0/156)."""
    from recipes.train_safedpo import _progress

    bar = _progress(10, "train", True, initial=2)
    try:
        for step in range(3, 6):
            bar.set_postfix(loss=f"{step:.4f}", refresh=False)
            bar.update(1)
            assert bar.n == step and f"{step}/10" in str(bar)
    finally:
        bar.close()
    off = _progress(10, "train", False)
    off.update(1), off.set_postfix(loss="x", refresh=False), off.close()  # disabled: a silent no-op
