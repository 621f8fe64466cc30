#!/usr/bin/env bash
# Install fedllm with its test tools into ./.venv and run the whole suite: lint, the default tests, then
# the long multi-process tests (marked "slow"). `.ci/run` calls this same script.
set -euo pipefail
cd "$(dirname "$0")/.."
export FEDLLM_SHARED="${FEDLLM_SHARED:-$(cd .. && pwd)/shared}"
export FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The HTML report test drives a real headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest exits 5 when it collects nothing: that fails this script like any other error.
.venv/bin/python -m pytest -m "not slow" "$@"
.venv/bin/python -m pytest -m slow "$@"
