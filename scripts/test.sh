#!/usr/bin/env bash
# The README's test command: set up .venv/ if needed, then run the fast test suite
# (tests marked slow are excluded; run them with: .venv/bin/pytest -m slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
exec .venv/bin/python -m pytest "$@"
