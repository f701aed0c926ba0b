#!/usr/bin/env bash
# The main job on its embedded default: SafeDPO with FSDP2 on 2 CPU ranks (gloo), a tiny random
# Llama, the offline PKU-SafeRLHF-style fixture and tokenizer; prints the final held-out evaluation.
# Outputs (metrics.jsonl, curves.png, checkpoints, HF export) go to outputs/tiny_cpu/.
# Extra arguments are config overrides, e.g. `bash scripts/main.sh max_steps=20`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
exec torchrun --standalone --nproc_per_node="${NPROC:-2}" recipes/train_safedpo.py \
  --config recipes/configs/tiny_cpu.yaml "$@"
