#!/usr/bin/env bash
# Set up (first run only) and start the service on the registry's production model.
# GPU when present, else CPU. Settings: SEEDNET_* environment variables (README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m service
