#!/usr/bin/env bash
# Install what dicomrouter needs on a Debian machine, skipping what is already there: Orthanc and DCMTK from
# Debian, the Python packages into a virtual environment inside this checkout (.venv), never into the system's
# Python. Re-runs are quick: pip runs again only when pyproject.toml (or the checkout's place) changed.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$PWD"
venv="$checkout/.venv"

need_apt=()
# The worklist tests load Orthanc's Modality Worklist plugin: Debian ships it in the orthanc package itself.
[ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libModalityWorklists.so ] || need_apt+=(orthanc)
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
# Orthanc's DICOMweb plugin is a DICOMweb client of the router in the DICOMweb tests.
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
# The status page is tested in a real headless browser; promtool checks the alert rules.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/promtool ] || need_apt+=(prometheus)
# Debian's own python3 has no venv/ensurepip without python3-venv (pyenv's and python.org's builds do).
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# Other DICOM implementations the router is tested against (tests/farm/test_third_party_peers.py).
[ -x /usr/bin/gdcmscu ] || need_apt+=(libgdcm-tools)
[ -f /usr/share/java/pixelmed.jar ] || need_apt+=(libpixelmed-java)
[ -x /usr/bin/javac ] || need_apt+=(default-jdk-headless)
[ -x /usr/bin/odil ] || need_apt+=(odil)
{ [ -x /usr/bin/dicom_echo ] && [ -x /usr/bin/send_image ]; } || need_apt+=(ctn)
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

stamp="$venv/.dicomrouter-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $checkout $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$venv/bin/python" -I -c 'import dicomrouter, pytest' 2>/dev/null; then
  exit 0
fi
# A venv made for another place or another python3 is not repaired in place: made anew.
if [ -d "$venv" ] && { [ ! -f "$stamp" ] || [ "$(cut -d' ' -f2- "$stamp")" != "${wanted#* }" ]; }; then
  rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "installing dicomrouter and its Python packages into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "$wanted" > "$stamp"
