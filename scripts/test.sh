#!/usr/bin/env bash
# Installs loraforge with its test extras, then runs the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
