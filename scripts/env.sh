# Sourced by scripts/main.sh and scripts/test.sh: make a Python environment with everything installed.
#
# * Uses the active virtual environment if there is one, else creates/uses ./.venv.
# * Installs torch only where it is missing, so a user's CUDA build is kept
#   (torch==2.13.0: on the project's CPU machines pip takes it from a local wheel, no download).
# * Installs triton only where it is missing (3.8.0, the version the CPU interpreter tests use).
# * Then installs this package with its extras (a no-op when already satisfied).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PY=python
stamp=".venv-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[env] installing torch==2.13.0 (none found)"
  $PY -m pip install -q "torch==2.13.0"
fi
if ! $PY -c "import triton" >/dev/null 2>&1; then
  echo "[env] installing triton==3.8.0 (none found)"
  $PY -m pip install -q "triton==3.8.0"
fi
if [ ! -f "$VIRTUAL_ENV/$stamp" ]; then
  echo "[env] installing safedpo-kernels[all] into $VIRTUAL_ENV"
  $PY -m pip install -q -e ".[all]"
  touch "$VIRTUAL_ENV/$stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
