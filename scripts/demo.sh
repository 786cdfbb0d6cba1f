#!/usr/bin/env bash
# The README's main-job command: set up .venv/ if needed, then run the end-to-end demo
# (dense ViT -> pruning fine-tune -> accuracy, GMACs and speed table -> save and export).
# Arguments are passed to scripts/demo.py, e.g. --data /path/to/imagefolder.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
exec .venv/bin/python scripts/demo.py "$@"
