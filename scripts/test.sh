#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then run the whole test suite. Without arguments it
# first runs the parity tests under each other version of the CPU loops this machine can run
# (FUSEDLR_CPU_ISA, csrc/cpu/cpu_isa.h): a machine of another CPU runs one of them by default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  native=$(.venv/bin/python -c "import fusedlr; print(fusedlr.cpu_isa())")
  for isa in $(.venv/bin/python -c "from fusedlr import _C; print(_C.cpu_isas_supported().replace(',', ''))"); do
    [ "$isa" = "$native" ] && continue
    echo "parity tests with the $isa version of the CPU loops (FUSEDLR_CPU_ISA=$isa)"
    FUSEDLR_CPU_ISA=$isa .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_optimizers.py \
      tests/test_grad_options.py tests/test_amp.py tests/test_review_cases.py tests/test_rounding.py \
      tests/test_mx_state.py
  done
fi
.venv/bin/python -m pytest -q tests "$@"
