#!/usr/bin/env bash
# The project's test command: set up what is missing, then run the whole suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
