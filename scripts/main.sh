#!/usr/bin/env bash
# The main job on its embedded default: installs what it needs, then runs it.
set -euo pipefail
. "$(dirname "$0")/env.sh"
exec python -m benchmarks.logprobs_memory "$@"
