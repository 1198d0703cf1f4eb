#!/usr/bin/env bash
# Plant the named bugs of scripts/mutation_check.py one at a time in a copy of the tree and
# print which the test suite catches (not part of scripts/test.sh: ~15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python scripts/mutation_check.py "$@"
