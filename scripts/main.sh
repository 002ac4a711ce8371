#!/usr/bin/env bash
# The main job on the embedded default: set everything up, then run it. Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/speechtrim transcribe "$@"
