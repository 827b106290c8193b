#!/usr/bin/env bash
# Install specchat with the embedded demo models into ./.venv, then ask the demo pair one question
# (the 0.5B sibling drafts: the first run then builds no low-bit copy of the target).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$py -m pip install -q -e '.[demo]'
echo "Write a Python function that checks whether a number is prime." \
  | .venv/bin/specchat run --model demo --draft demo-0.5b --max-new-tokens 128 "$@"
