#!/usr/bin/env bash
# Install everything, then run the whole test suite (real Orthanc servers, DCMTK, PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TCP_NODELAY=1
exec python3 -m pytest -q -p no:cacheprovider "$@"
