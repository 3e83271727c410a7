#!/usr/bin/env bash
# Runs the whole suite against the newest releases of every dependency (torch stays at 2.13.0, see
# README), in a new venv, as CI would (CI=true: a missing test reference fails). When it passes it writes
# constraints.latest.txt; `mv constraints.latest.txt constraints.txt` moves CI and the README's commands
# forward to those versions.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
PYTHON="$work/venv/bin/python" LORAFORGE_CONSTRAINTS=none bash scripts/setup.sh test
CI=true "$work/venv/bin/python" -m pytest -q "$@"
{ sed -n '1,2p' constraints.txt
  "$work/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^loraforge' \
    | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > constraints.latest.txt
echo "all tests passed on the newest releases; constraints.latest.txt lists them:"
diff constraints.txt constraints.latest.txt || true
