#!/usr/bin/env bash
# Create/refresh the project virtualenv at <repo>/.venv and install diffinv_pl
# (editable, with the `dev` extra) against the pinned lock:
#
#     .venv/bin/pip install -c requirements/constraints.txt -e ".[dev]"
#
# Idempotent: an existing .venv is reused (never recreated, pip/setuptools are
# not upgraded); when everything is already installed the pip step is a quick
# no-op apart from re-registering the editable install (~5 s).
#
# Environment:
#   PYTHON=python3.11     interpreter used to create a *new* .venv (default: python3)
#
# Works from any working directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"

log() { printf '[setup_env] %s\n' "$*" >&2; }

if [[ -x "$VPY" ]]; then
    log "reusing existing $VENV ($("$VPY" -V 2>&1))"
else
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        log "ERROR: interpreter '$PYTHON' not found (set PYTHON=...)"
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
        log "ERROR: $("$PYTHON" -V 2>&1) is too old; diffinv_pl needs Python >= 3.10"
        exit 1
    fi
    log "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

log "installing: pip install -c requirements/constraints.txt -e .[dev]"
"$VPY" -m pip install -c requirements/constraints.txt -e ".[dev]"
log "done"
