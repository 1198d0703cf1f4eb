#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# The /attention page is tested in Debian's headless Chromium; install it when we can.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the browser test will skip (fail under CI)" >&2
fi
.venv/bin/ruff check seednet registry training service bench tests scripts
exec .venv/bin/python -m pytest -q "$@"
