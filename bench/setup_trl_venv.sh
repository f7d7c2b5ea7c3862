#!/usr/bin/env bash
# Creates bench/.venv-trl: the seed project's PPO engine (TRL 0.13 + transformers 4.48)
# on the same CPU torch as minirlaif, for the side-by-side speed benchmark.
# Usage: bash bench/setup_trl_venv.sh   (re-running reuses an existing venv)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-trl"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

pip_install() {  # quiet, but shows pip's stderr (minus this machine's harmless index warnings) on failure
    local log; log="$(mktemp)"
    if ! "$VENV/bin/python" -m pip install --quiet "$@" 2>"$log"; then cat "$log" >&2; rm -f "$log"; exit 1; fi
    grep -v "is ignored: it is neither" "$log" >&2 || true; rm -f "$log"
}

# torch first, pinned: the CPU wheel lies on local disk; an unpinned torch would pull CUDA.
pip_install torch==2.13.0
# Seed pins (trl 0.13, transformers 4.48) and the accelerate/datasets releases of that time.
pip_install torch==2.13.0 trl==0.13.0 "transformers==4.48.*" accelerate==1.2.1 datasets==3.2.0

"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl, accelerate, datasets, tokenizers
from trl import PPOConfig, PPOTrainer  # noqa: F401  (import check)
print("torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__,
      "| accelerate", accelerate.__version__, "| datasets", datasets.__version__,
      "| tokenizers", tokenizers.__version__)
EOF
