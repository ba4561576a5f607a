#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then run the step-throughput benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeedCPUAdam joins the CPU contenders where deepspeed installs (it builds its op on first use).
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8" ||
    echo "bench: deepspeed did not install; DeepSpeedCPUAdam is left out" >&2
fi
.venv/bin/python -m fusedlr bench "$@"
