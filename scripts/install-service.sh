#!/usr/bin/env bash
# Install dicomrouter as a systemd service on Debian (run as root):
#   - a system user `dicomrouter` (no login, no home of its own),
#   - /opt/dicomrouter: a virtualenv with dicomrouter and its dependencies, linked as /usr/local/bin/dicomrouter,
#   - /etc/dicomrouter/dicomrouter.yaml (root:dicomrouter 0640; from config/dicomrouter.example.yaml if missing),
#   - /var/lib/dicomrouter (dicomrouter 0700): the catalog (SQLite) and the spool,
#   - /etc/systemd/system/dicomrouter.service (config/dicomrouter.service).
# Then: edit the config, `dicomrouter config check`, `systemctl enable --now dicomrouter`.
#
# For tests, everything can go under another root: DICOMROUTER_ROOT=/tmp/x SERVICE_USER=$(id -un)
# PYTHON=... VENV_ARGS=--system-site-packages PIP_ARGS=--no-deps (no user is created then).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${DICOMROUTER_ROOT:-}
SERVICE_USER=${SERVICE_USER:-dicomrouter}
PYTHON=${PYTHON:-/usr/bin/python3}
VENV_ARGS=${VENV_ARGS:-}
PIP_ARGS=${PIP_ARGS:-}
OPT=$ROOT/opt/dicomrouter
ETC=$ROOT/etc/dicomrouter
VAR=$ROOT/var/lib/dicomrouter
BIN=$ROOT/usr/local/bin
UNITS=$ROOT/etc/systemd/system

if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  echo "creating the system user $SERVICE_USER" >&2
  useradd --system --home-dir /var/lib/dicomrouter --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi
GROUP=$(id -gn "$SERVICE_USER")

install -d -m 0755 "$OPT" "$BIN" "$UNITS"
install -d -m 0750 -o root -g "$GROUP" "$ETC"
install -d -m 0700 -o "$SERVICE_USER" -g "$GROUP" "$VAR" "$VAR/spool"

echo "installing dicomrouter into $OPT" >&2
# shellcheck disable=SC2086  # the ARGS are lists of options
"$PYTHON" -m venv $VENV_ARGS "$OPT"
# shellcheck disable=SC2086
"$OPT/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS ".[postgres]"
ln -sfn "$OPT/bin/dicomrouter" "$BIN/dicomrouter"

if [ ! -e "$ETC/dicomrouter.yaml" ]; then
  sed -e "s#^  catalog: sqlite:///var/catalog.db#  catalog: sqlite:///$VAR/catalog.db#" \
      -e "s#^  spool: var/spool #  spool: $VAR/spool #" \
      config/dicomrouter.example.yaml > "$ETC/dicomrouter.yaml"
  echo "wrote $ETC/dicomrouter.yaml from the example: edit it" >&2
fi
chown root:"$GROUP" "$ETC/dicomrouter.yaml"
chmod 0640 "$ETC/dicomrouter.yaml"

sed -e "s#/usr/local/bin/dicomrouter#$BIN/dicomrouter#g" \
    -e "s#/etc/dicomrouter#$ETC#g" \
    -e "s#/var/lib/dicomrouter#$VAR#g" \
    -e "s#^User=dicomrouter#User=$SERVICE_USER#" \
    -e "s#^Group=dicomrouter#Group=$GROUP#" \
    config/dicomrouter.service > "$UNITS/dicomrouter.service"
chmod 0644 "$UNITS/dicomrouter.service"

if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
cat >&2 <<DONE
installed. Next:
  1. edit $ETC/dicomrouter.yaml (servers, clients, router.http), then: dicomrouter --config $ETC/dicomrouter.yaml config check
  2. systemctl enable --now dicomrouter;  systemctl reload dicomrouter after edits;  journalctl -u dicomrouter
DONE
