#!/usr/bin/env bash
# Sets up .venv if needed, checks formatting and lint (ruff), then runs the whole test suite.
# Extra arguments go to pytest (e.g. -m "not e2e" for the fast tiers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
ruff format --check --quiet .
ruff check --quiet .
exec python -m pytest -q "$@"
