#!/usr/bin/env bash
# Install everything, then run the whole test suite (real Orthanc servers, DCMTK, PostgreSQL) in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The venv first on PATH: python3, dicomrouter and anything the tests start come from it.
export PATH="$PWD/.venv/bin:$PATH" TCP_NODELAY=1
exec python -m pytest -q -p no:cacheprovider "$@"
