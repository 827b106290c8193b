#!/usr/bin/env bash
# Install specchat with its test and demo extras into ./.venv, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
# torch first, the CPU build, so that nothing pulls a multi-GB CUDA build.
$py -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$py -m pip install -q -e '.[test,demo]'
set +e
$py -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
