#!/usr/bin/env bash
# Start, inspect, stop or wipe the four local demo Orthanc PACS (see test-pacs/README.md).
# Usage: ./setup_all_pacs.sh start|status|stop|restart|clean
# Ports and peers can be overridden through the environment, e.g.
#   TEST_PACS_1_DICOM_PORT=5242 TEST_PACS_1_HTTP_PORT=9042 ./setup_all_pacs.sh start
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
command="${1:-}"
case "$command" in
    start|status|stop|restart|clean) ;;
    *)
        echo "usage: $0 start|status|stop|restart|clean" >&2
        exit 2
        ;;
esac

dicom_ports="${TEST_PACS_1_DICOM_PORT:-4242},${TEST_PACS_2_DICOM_PORT:-4243},${PROD_PACS_1_DICOM_PORT:-4245},${PROD_PACS_2_DICOM_PORT:-4246}"
http_ports="${TEST_PACS_1_HTTP_PORT:-8042},${TEST_PACS_2_HTTP_PORT:-8043},${PROD_PACS_1_HTTP_PORT:-8045},${PROD_PACS_2_HTTP_PORT:-8046}"

# The checkout's virtual environment (scripts/install.sh) has what dicomrouter.pacsfarm imports.
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi

cd "$here"
exec "$python" -m dicomrouter.pacsfarm "$command" \
    --base-dir "${PACS_DATA_DIR:-$here/test-pacs/data}" \
    --dicom-ports "$dicom_ports" \
    --http-ports "$http_ports" \
    --router-ae "${ROUTER_AE:-DICOMROUTER}" \
    --router-host "${ROUTER_HOST:-127.0.0.1}" \
    --router-port "${ROUTER_PORT:-11112}" \
    --workstation-ae "${WORKSTATION_AE:-WORKSTATION}" \
    --workstation-host "${WORKSTATION_HOST:-127.0.0.1}" \
    --workstation-port "${WORKSTATION_PORT:-11113}"
