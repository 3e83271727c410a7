#!/usr/bin/env bash
# Installs loraforge, then fine-tunes the embedded default model on the bundled example data and
# prints held-out exact-match accuracy before and after training (computed by loraforge.eval.evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec loraforge train examples/quickstart.yaml "$@"
