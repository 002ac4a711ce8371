#!/usr/bin/env bash
# The main job on the embedded default: set everything up, then run the quick benchmark (speechtrim bench --quick).
# Extra arguments go to speechtrim bench.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/speechtrim bench --quick "$@"
