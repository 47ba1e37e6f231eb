#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh book   set up .venv, execute every chapter (cpu profile), build the site into _build/html
#   bash run.sh test   set up .venv, run the test suite
# PROFILE=gpu bash run.sh book executes the GPU profile instead (needs a GPU and hub access).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  if ! "$py" -c "import torch" 2>/dev/null; then
    # The CPU build; a bare `torch` would pull a multi-GB CUDA build.
    "$py" -m pip install -q "torch==2.13.0"
  fi
  "$py" -m pip install -q -r requirements.txt
  "$py" -m pip install -q --no-deps -e .
  "$py" -m ipykernel install --sys-prefix --name python3 >/dev/null
}

case "${1:-}" in
  book)
    setup
    HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} "$VENV/bin/python" -m sinkutils.book --profile "${PROFILE:-cpu}"
    ;;
  test)
    setup
    shift
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh book | test [pytest args]" >&2
    exit 2
    ;;
esac
