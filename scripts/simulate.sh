#!/usr/bin/env bash
# Install fedllm into ./.venv and run the default simulation (three hospitals, MedMCQA, DP head on MiniLM features).
# Extra arguments go to `fedllm simulate`, e.g. `bash scripts/simulate.sh --rounds 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/fedllm simulate "$@"
