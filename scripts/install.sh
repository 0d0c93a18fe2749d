#!/usr/bin/env bash
# Install what dicomrouter needs on a Debian machine, skipping what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# The worklist tests load Orthanc's Modality Worklist plugin: Debian ships it in the orthanc package itself.
[ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libModalityWorklists.so ] || need_apt+=(orthanc)
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
# Orthanc's DICOMweb plugin is a DICOMweb client of the router in the DICOMweb tests.
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
# The status page is tested in a real headless browser; promtool checks the alert rules.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/promtool ] || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian package may start its own Orthanc on 4242/8042; the demo farm needs those ports.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
  systemctl stop orthanc || true
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
