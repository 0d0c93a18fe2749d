"""DICOMweb (PS3.18) under /dicom-web on the router's HTTP port: QIDO-RS over the C-FIND federation,
WADO-RS by C-GET from the server the retrieve plan picks, STOW-RS through the C-STORE receive path."""

from __future__ import annotations

import socket

from dicomrouter.config import HttpSettings

PREFIX = "/dicom-web"


def dicomweb_url(http: HttpSettings) -> str:
    """The DICOMweb root clients are given (a wildcard listen address named by this host's name)."""
    scheme = "https" if http.tls is not None else "http"
    host = socket.gethostname() if http.host in ("0.0.0.0", "::", "") else http.host
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{http.port}{PREFIX}"
