#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite (Triton kernels through the
# CPU interpreter, data, recipe with 2 gloo ranks, benchmarks harness, integrations).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_losses.py -x`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
workers="${PYTEST_WORKERS:-2}"
exec python -m pytest -n "$workers" --dist loadfile -q "$@"
