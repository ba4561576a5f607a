#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then run the step-throughput benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m fusedlr bench "$@"
