#!/usr/bin/env bash
# Install, start the four test PACS, and run the router on them (embedded SQLite catalog).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" TCP_NODELAY=1
./setup_all_pacs.sh start
# The file's catalog and spool are beside it: var/catalog.db and var/spool.
[ -f var/dicomrouter.yaml ] || python scripts/setup_pacs_config.py --output var/dicomrouter.yaml
dicomrouter --config var/dicomrouter.yaml db upgrade
dicomrouter --config var/dicomrouter.yaml health || true
exec dicomrouter --config var/dicomrouter.yaml serve
