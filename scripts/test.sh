#!/usr/bin/env bash
# Set up (first run only) and run the test suite. Extra arguments go to pytest.
# Tests marked slow (training resumes, the production model on 1,000 images, calibration
# end to end: minutes each) are skipped unless SEEDNET_SKIP_SLOW=0; .ci/run runs them too.
set -euo pipefail
export SEEDNET_SKIP_SLOW=${SEEDNET_SKIP_SLOW:-1}
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# Debian packages some tests need, installed when we can (else those tests are skipped):
# chromium for the browser tests (/attention, /docs), libb64-0d for perf_analyzer.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
/sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' || missing+=(libb64-0d)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "warning: could not install ${missing[*]}; the tests that need them skip (fail under CI)" >&2
fi
.venv/bin/ruff check seednet registry training service bench tests scripts deploy
exec .venv/bin/python -m pytest -q "$@"
