#!/usr/bin/env bash
# One-command setup for a fresh machine that has only Python 3.11.
# Idempotent: a second run checks a stamp and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.hiradix-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh scripts/cpu-requirements.txt | sha256sum | cut -c1-16)

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server (apt-get)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

echo "[setup] creating $VENV and installing CPU torch, sglang (no deps) and hiradix[dev]"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip >/dev/null
# CPU build of torch first, so that nothing later pulls a CUDA build.
$PIP install "torch==2.13.0"
$PIP install -r scripts/cpu-requirements.txt
$PIP install --no-deps "sglang==0.5.23"
$PIP install -e ".[dev]"
echo "$want" > "$STAMP"
echo "[setup] done"
