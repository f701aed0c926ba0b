"""Shared pieces of the recipe tests: a tiny config and a 2-rank torchrun launcher (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "train_safedpo.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A 2-layer, hidden-32 random Llama on a slice of the offline fixture: a step takes milliseconds, so
# each launch costs mostly interpreter + library start-up.
TINY = {
    "model_config": {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    },
    "tokenizer": "fixture",
    "dataset": "fixture:pku_tiny",
    "train_limit": 48,
    "eval_limit": 24,
    "max_length": 96,
    "device": "cpu",
    "backend": "gloo",
    "mixed_precision": "fp32",
    "objective": "safedpo",
    "seed": 1232,  # first step's 6 pairs include a both-unsafe pair (dropped by T(D)) on one rank only
    "micro_batch_size": 3,
    "lr": 3e-3,
    "warmup_steps": 1,
    "eval_batch_size": 24,
    "progress_bar": False,
}


def write_config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **overrides}, sort_keys=False))
    return path


def torchrun(config: Path, *overrides: str, nproc: int = 2, timeout: float = 240) -> str:
    """Run the recipe under ``torchrun --standalone`` (free port chosen by torchrun); stdout on success."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), "--config", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]
