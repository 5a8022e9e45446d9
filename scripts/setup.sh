#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with every pinned dependency.
#   bash scripts/setup.sh          runtime only (dashboard, CLI)
#   bash scripts/setup.sh --test   plus pytest, Playwright and Debian's headless Chromium (browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
echo "set-up done: .venv ready"
