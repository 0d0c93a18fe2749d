#!/usr/bin/env python3
"""Point a real web viewer (OHIF v2's embeddable build, or OHIF v3's app) at the router and look.

Two Orthancs on free ports hold three studies of 256 x 256 CT/MR images with a visible gradient (one
on each PACS, one RLE-compressed on both); `dicomrouter serve` fronts them with `router.http`,
`cors_origins` and a VIEWER client with an HTTP token. A page on another origin serves OHIF
configured for the router's DICOMweb root; headless chromium opens the study list and each study
and saves screenshots. Printed: the studies the list showed, whether each image was drawn (pixel
statistics of the viewport canvas) and how fast, every request the viewer made to the router with
its status, and every request that failed (CORS included) or that the router answered with an error.

OHIF is not part of the repository; fetch it once with npm and give its folder:

    mkdir -p /tmp/ohif && cd /tmp/ohif && npm pack @ohif/viewer@4.12.51 && tar xzf ohif-viewer-*.tgz
    .venv/bin/python scripts/viewer_check.py --ohif /tmp/ohif/package --out /tmp/viewer.png

`npm pack @ohif/app` (v3, about 200 MB unpacked) works the same way. OHIF v2 gets the token as
`requestOptions.auth` and as its signed-in user's access token; v3 in its viewer URL (`?token=`),
its study list reached from there.

Exit status 0 when the list shows every study and every study shows its image, 1 otherwise.
Everything started is stopped at the end (`--keep` waits for Enter first, to look by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from aiohttp import web
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomrouter.pacsfarm import OrthancFarm, free_ports, start_free_farm  # noqa: E402
from tests.support.router_process import RouterProcess, wait_for_port  # noqa: E402

ROUTER_AE, VIEWER_AE, TOKEN = "DICOMROUTER", "VIEWER", "viewer-check-token"
CHROMIUM = "/usr/bin/chromium"
SIZE = 256
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
RLE = RLELossless


# ------------------------------------------------------------------ the studies


def gradient_instance(study: dict, series_uid: str, series_number: int, number: int) -> Dataset:
    """A 256 x 256 16-bit slice: a diagonal gradient, a bright disc moving with the slice, a dark square."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = (x + y) * 4  # 0 .. 2040: the gradient
    disc = (x - 96 - 8 * number) ** 2 + (y - 128) ** 2 < 40**2
    pixels[disc] = 3000
    pixels[160:200, 170:210] = 0
    ds = Dataset()
    sop_class = CT if study["modality"] == "CT" else MR
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study["date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber, ds.Modality = study["accession"], study["modality"]
    ds.Manufacturer, ds.ReferringPhysicianName = "dicomrouter viewer check", "Referrer^Rita"
    ds.StudyDescription, ds.SeriesDescription = study["description"], f"Series {series_number}"
    ds.PatientName, ds.PatientID = study["patient_name"], study["patient_id"]
    ds.PatientBirthDate, ds.PatientSex = "19650412", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study["uid"], series_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, number
    ds.ImagePositionPatient = [-128.0, -128.0, 5.0 * number]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation, ds.SliceThickness = 5.0 * number, 5.0
    ds.PixelSpacing = [1.0, 1.0]
    ds.FrameOfReferenceUID = study["frame_of_reference"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 500, 3000
    ds.PixelData = np.clip(pixels, 0, 4095).astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def part10(ds: Dataset) -> bytes:
    import io

    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def upload_studies(farm: OrthancFarm, slices: int) -> list[dict]:
    """One study on each PACS and one on both; returns their descriptions."""
    today = datetime.date.today().strftime("%Y%m%d")
    plans = [
        ("CHECK^ALPHA", "VC001", "CT", "CT chest (Test PACS 1)", [0], (2, slices), None),
        ("CHECK^BETA", "VC002", "MR", "MR head (Test PACS 2)", [1], (1, 4), None),
        ("CHECK^GAMMA", "VC003", "CT", "CT abdomen (both PACS)", [0, 1], (1, 3), RLE),
    ]
    studies = []
    for name, patient_id, modality, description, holders, (series_count, images), syntax in plans:
        study = {
            "uid": generate_uid(),
            "patient_name": name,
            "patient_id": patient_id,
            "modality": modality,
            "description": description,
            "accession": f"A{patient_id}",
            "date": today,
            "frame_of_reference": generate_uid(),
            "holders": [farm[i].spec.name for i in holders],
            "instances": series_count * images,
            "series": series_count,
            "syntax": "RLE Lossless" if syntax else "Explicit VR Little Endian",
        }
        for series_number in range(1, series_count + 1):
            series_uid = generate_uid()
            for number in range(1, images + 1):
                ds = gradient_instance(study, series_uid, series_number, number)
                if syntax:
                    ds.compress(syntax)
                data = part10(ds)
                for index in holders:
                    farm[index].upload(data)
        studies.append(study)
    return studies


# ------------------------------------------------------------------ the router


def write_router_config(
    folder: Path, farm: OrthancFarm, dicom_port: int, http_port: int, cors_origin: str | None
) -> Path:
    servers = []
    for index, server in enumerate(farm):
        spec = server.spec
        servers.append(
            f"""  - name: {spec.name}
    ae_title: {spec.ae_title}
    host: 127.0.0.1
    port: {spec.dicom_port}
    environment: test
    active: true
    primary: {"true" if index == 0 else "false"}
    move_routing:
      {ROUTER_AE}: {ROUTER_AE}
"""
        )
    cors = f"    cors_origins: [{cors_origin}]\n" if cors_origin else ""
    token_sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    text = f"""router:
  ae_title: {ROUTER_AE}
  host: 127.0.0.1
  port: {dicom_port}
  catalog: sqlite:///var/catalog.db
  spool: var/spool
  http:
    host: 127.0.0.1
    port: {http_port}
{cors}servers:
{"".join(servers)}clients:
  - ae_title: {VIEWER_AE}
    roles: [test_read]
    http_token_sha256: {token_sha}
"""
    path = folder / "dicomrouter.yaml"
    path.write_text(text, encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "dicomrouter", "--config", str(path), "db", "upgrade"],
        check=True,
        capture_output=True,
    )
    return path


# ------------------------------------------------------------------ the viewer page

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>OHIF against dicomrouter</title></head>
<body style="margin:0"><div id="root"></div>
<script src="/app-config.js"></script>
<script src="/index.umd.js" crossorigin></script>
<script>
  // OHIF v2 sends requestOptions.auth with searches and metadata, but its image loader sends only
  // the signed-in (OIDC) user's access token: the router's token stands in for it (Bearer).
  window.store.dispatch({type: 'redux-oidc/USER_FOUND', payload: {access_token: window.routerToken}});
  window.OHIFViewer.installViewer(window.config, 'root', function () {});
</script>
</body></html>
"""


def app_config(dicomweb_root: str) -> str:
    server = {
        "name": "dicomrouter",
        "qidoRoot": dicomweb_root,
        "wadoRoot": dicomweb_root,
        "wadoUriRoot": dicomweb_root,
        "qidoSupportsIncludeField": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "requestOptions": {"auth": f"{VIEWER_AE}:{TOKEN}"},
    }
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "extensions": [],
        "servers": {"dicomWeb": [server]},
        # OHIF's default: the images of the series on screen are fetched ahead of scrolling.
        "studyPrefetcher": {
            "enabled": True,
            "order": "closest",
            "displaySetCount": 1,
            "preventCache": False,
            "prefetchDisplaySetsTimeout": 300,
            "maxNumPrefetchRequests": 100,
            "displayProgress": False,
            "includeActiveDisplaySet": True,
        },
    }
    return (
        f"window.config = {json.dumps(config, indent=2)};\n"
        f"window.routerToken = {json.dumps(TOKEN)};\n"
    )


def app_config_v3(dicomweb_root: str) -> str:
    """OHIF v3's config: one DICOMweb data source, the router. Its token comes in the viewer's URL."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomrouter",
        "configuration": {
            "friendlyName": "dicomrouter",
            "name": "dicomrouter",
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "wadoUriRoot": dicomweb_root,
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "defaultDataSourceName": "dicomrouter",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def find_bundle(folder: Path) -> tuple[Path, str]:
    """OHIF's dist folder under `folder` (a package folder, its dist, or an npm project) and
    which OHIF it is: v2 (@ohif/viewer, index.umd.js) or v3 (@ohif/app, index.html)."""
    for candidate in (
        folder,
        folder / "dist",
        folder / "package" / "dist",
        folder / "node_modules" / "@ohif" / "viewer" / "dist",
        folder / "node_modules" / "@ohif" / "app" / "dist",
    ):
        if (candidate / "index.umd.js").is_file():
            return candidate, "v2"
        if (candidate / "index.html").is_file() and (candidate / "app-config.js").is_file():
            return candidate, "v3"
    raise SystemExit(
        f"no OHIF under {folder}: `npm pack @ohif/viewer@4.12.51` (v2) or "
        "`npm pack @ohif/app` (v3) and untar it there"
    )


async def start_page_server(
    dist: Path, version: str, dicomweb_root: str, port: int
) -> web.AppRunner:
    """OHIF's page on its own origin: every path the viewer routes (/, /viewer/...) gets the page."""
    config = app_config(dicomweb_root) if version == "v2" else app_config_v3(dicomweb_root)

    async def page(request: web.Request) -> web.StreamResponse:
        name = request.path.lstrip("/")
        if name == "app-config.js":
            return web.Response(text=config, content_type="text/javascript")
        target = (dist / name).resolve()
        if name and target.is_file() and target.is_relative_to(dist.resolve()):
            return web.FileResponse(target)
        if version == "v3":
            return web.FileResponse(dist / "index.html")
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


# ------------------------------------------------------------------ chromium over CDP


@dataclass
class Request:
    url: str
    method: str
    resource_type: str = ""
    status: int | None = None
    failure: str | None = None
    finished: float | None = None  # time.monotonic() when its body had arrived
    accept: str | None = None
    response_type: str | None = None


@dataclass
class Browser:
    """Headless chromium driven over the DevTools protocol (aiohttp's websocket client)."""

    process: subprocess.Popen
    session: aiohttp.ClientSession
    socket: aiohttp.ClientWebSocketResponse
    requests: dict[str, Request] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    _next_id: int = 0
    _pending: dict[int, asyncio.Future] = field(default_factory=dict)
    _reader: asyncio.Task | None = None

    @classmethod
    async def launch(cls, profile: Path, width: int, height: int) -> Browser:
        process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        port = None
        while time.monotonic() < deadline and port is None:
            line = await asyncio.to_thread(process.stderr.readline)
            if not line and process.poll() is not None:
                raise SystemExit(f"chromium exited with {process.returncode}")
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                port = int(match.group(1))
        if port is None:
            process.kill()
            raise SystemExit("chromium did not open its DevTools port")
        # Keep draining chromium's stderr so it never blocks on a full pipe.
        asyncio.get_running_loop().run_in_executor(None, process.stderr.read)
        session = aiohttp.ClientSession()
        async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            targets = await reply.json()
        page = next(t for t in targets if t["type"] == "page")
        socket = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        browser = cls(process, session, socket)
        browser._reader = asyncio.create_task(browser._read())
        for domain in ("Network", "Page", "Runtime", "Log"):
            await browser.call(f"{domain}.enable")
        return browser

    async def call(self, method: str, **params) -> dict:
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.socket.send_json({"id": self._next_id, "method": method, "params": params})
        return await asyncio.wait_for(future, 60)

    async def _read(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future and not future.done():
                    if "error" in data:
                        future.set_exception(RuntimeError(str(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
            else:
                self._event(data["method"], data.get("params", {}))

    def _event(self, method: str, params: dict) -> None:
        if method == "Network.requestWillBeSent":
            request = params["request"]
            headers = {k.lower(): v for k, v in request.get("headers", {}).items()}
            self.requests[params["requestId"]] = Request(
                request["url"],
                request["method"],
                params.get("type", ""),
                accept=headers.get("accept"),
            )
        elif method == "Network.responseReceived":
            entry = self.requests.get(params["requestId"])
            if entry:
                entry.status = params["response"]["status"]
                entry.response_type = params["response"].get("mimeType")
        elif method == "Network.loadingFinished":
            entry = self.requests.get(params["requestId"])
            if entry:
                entry.finished = time.monotonic()
        elif method == "Network.loadingFailed":
            entry = self.requests.get(params["requestId"])
            if entry:
                cors = params.get("corsErrorStatus", {}).get("corsError")
                entry.failure = " ".join(
                    filter(None, [params.get("errorText"), cors, params.get("blockedReason")])
                )
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"console.{params['type']}: {text[:300]}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {str(text)[:300]}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            self.console.append(
                f"log.{entry['level']}: {entry['text'][:300]} {entry.get('url', '')}"
            )

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float):
        """Evaluate `expression` until it is truthy (the page changing is the event); its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        return value

    async def screenshot(self, path: Path) -> None:
        result = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        await self.socket.close()
        await self.session.close()
        if self._reader:
            self._reader.cancel()
        self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, 15)
        except subprocess.TimeoutExpired:
            self.process.kill()


# The viewport's canvas: how much of it is image (not black), and how varied.
CANVAS_STATS = """(() => {
  const canvas = document.querySelector('.viewport-element canvas, canvas.cornerstone-canvas');
  if (!canvas || !canvas.width) return null;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0, min = 255, max = 0; const levels = new Set();
  for (let i = 0; i < data.length; i += 4) {
    const v = data[i]; if (v > 0) lit++; if (v < min) min = v; if (v > max) max = v; levels.add(v);
  }
  return {width: canvas.width, height: canvas.height, lit: lit / (data.length / 4), min, max,
          levels: levels.size};
})()"""


# ------------------------------------------------------------------ the check


def summarize(browser: Browser, router_origin: str) -> tuple[list[str], list[str]]:
    """Lines for each router request pattern (method, path shape, Accept, statuses), and the failures."""
    patterns: dict[tuple[str, str, str], list[str]] = {}
    failures = []
    for request in browser.requests.values():
        if not request.url.startswith(router_origin):
            if request.failure and not request.url.startswith("data:"):
                failures.append(f"{request.method} {request.url[:120]}: {request.failure}")
            continue
        parts = urlsplit(request.url)
        shape = re.sub(r"/\d+(\.\d+)+", "/{uid}", parts.path)
        query = "&".join(sorted(k.split("=")[0] for k in parts.query.split("&") if k))
        key = (request.method, shape + (f"?{query}" if query else ""), request.accept or "")
        outcome = request.failure or str(request.status)
        patterns.setdefault(key, []).append(outcome)
        if request.failure or (request.status or 0) >= 400:
            failures.append(f"{request.method} {request.url[:160]}: {outcome}")
    lines = []
    for (method, shape, accept), outcomes in sorted(patterns.items()):
        counts = ", ".join(f"{o} x{outcomes.count(o)}" for o in sorted(set(outcomes)))
        lines.append(f"{method} {shape}  [Accept: {accept or '-'}]  -> {counts}")
    return lines, failures


def viewer_url(page_origin: str, version: str, study_uid: str) -> str:
    if version == "v2":
        return f"{page_origin}/viewer/{study_uid}"
    # OHIF v3 takes a token on its viewer route and sends it as Bearer with every request.
    return f"{page_origin}/viewer?StudyInstanceUIDs={study_uid}&token={TOKEN}"


async def open_study(browser: Browser, url: str, study: dict, png: Path) -> bool:
    """Open `study` in the viewer; True when its first image is drawn (a varied, lit canvas)."""
    started = time.monotonic()
    await browser.navigate(url)
    drawn = (
        f"(() => {{ const s = {CANVAS_STATS}; return s && s.lit > 0.2 && s.levels > 16 && s; }})()"
    )
    stats = await browser.wait_for(drawn, 60) or await browser.evaluate(CANVAS_STATS)
    seconds = time.monotonic() - started  # to within the 0.25 s the page is polled at
    await browser.wait_for(
        "document.querySelectorAll('.ThumbnailEntryContainer canvas, .ImageThumbnail canvas, "
        'img[src^="data:image"], img[src^="blob:"]\').length > 0',
        10,
    )
    await browser.screenshot(png)
    rendered = bool(stats and stats.get("lit", 0) > 0.2 and stats.get("levels", 0) > 16)
    print(
        f"viewer, {study['patient_name']} ({study['description']}, {study['syntax']}): "
        f"{f'image rendered in {seconds:.1f} s' if rendered else 'NO image'}; canvas {stats}; "
        f"screenshot {png}"
    )
    shown = await browser.evaluate(
        "Array.from(document.querySelectorAll('.ViewportOverlay, .ThumbnailEntryContainer'))"
        ".map(e => e.innerText.replace(/\\s+/g, ' ').trim()).filter(t => t).slice(0, 6)"
    )
    for text in shown or []:
        print(f"  shown: {text[:150]}")
    return rendered


async def report_prefetch(browser: Browser, study: dict, started: float) -> None:
    """How long until the viewer had every image of the series on screen (OHIF prefetches them)."""
    # The series on screen, and one thumbnail of each other series.
    wanted = study["instances"] // study["series"] + study["series"] - 1
    deadline = time.monotonic() + 30 + wanted  # generous: each frame is one C-GET
    while True:
        done = sorted(
            r.finished
            for r in browser.requests.values()
            if r.method == "GET" and study["uid"] in r.url and "/frames/" in r.url
            if r.status == 200 and r.finished is not None
        )
        if len(done) >= wanted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    if done:
        seconds = done[-1] - started
        print(
            f"  prefetch: {len(done)} of {wanted} frames (the series on screen, other series' "
            f"thumbnails) {seconds:.1f} s after opening the study ({len(done) / seconds:.1f}/s)"
        )


async def show_study_list(browser: Browser, studies: list[dict], png: Path) -> bool:
    """The study list now on screen: True when it names every study (federated QIDO)."""
    names = [s["patient_name"] for s in studies]
    shown = "document.body.innerText"
    listed_js = (
        f"{json.dumps(names)}.filter(name => {shown}.includes(name)"
        f" || {shown}.includes(name.replace('^', ', ')))"
    )
    await browser.wait_for(f"{listed_js}.length === {len(names)}", 45)
    listed = await browser.evaluate(listed_js) or []
    await browser.screenshot(png)
    print(f"study list: {len(listed)} of {len(names)} studies shown: {listed}; screenshot {png}")
    rows = await browser.evaluate(
        "Array.from(document.querySelectorAll('tr, .studylistStudy')).map(r => r.innerText"
        ".replace(/\\s+/g, ' ').trim()).filter(t => t).slice(0, 8)"
    )
    for row in rows or []:
        print(f"  row: {row[:150]}")
    return len(listed) == len(names)


async def run_browser(
    args,
    dist: Path,
    version: str,
    dicomweb_root: str,
    studies: list[dict],
    folder: Path,
    page_port: int,
) -> bool:
    runner = await start_page_server(dist, version, dicomweb_root, page_port)
    page_origin = f"http://127.0.0.1:{page_port}"
    router_origin = dicomweb_root.split("/dicom-web")[0]
    browser = await Browser.launch(folder / "chromium-profile", 1400, 900)
    list_png = args.out.with_name(args.out.stem + "-studylist.png")
    ok = True
    try:
        print(f"OHIF {version} page: {page_origin}/  (DICOMweb root {dicomweb_root})")
        if version == "v2":
            await browser.navigate(f"{page_origin}/")
            ok &= await show_study_list(browser, studies, list_png)
        for index, study in enumerate(studies):
            png = args.out if index == 0 else args.out.with_name(f"{args.out.stem}-{index + 1}.png")
            started = time.monotonic()
            url = viewer_url(page_origin, version, study["uid"])
            ok &= await open_study(browser, url, study, png)
            if index == 0:
                await report_prefetch(browser, study, started)
        if version == "v3":
            # Its study list has no token of its own: reach it from the viewer, in the app.
            await browser.evaluate(
                "window.history.pushState({}, '', '/');"
                " window.dispatchEvent(new PopStateEvent('popstate'))"
            )
            ok &= await show_study_list(browser, studies, list_png)
    finally:
        patterns, failures = summarize(browser, router_origin)
        print("requests to the router (method, path shape, Accept -> outcomes):")
        for line in patterns:
            print(f"  {line}")
        print("failed requests:" if failures else "failed requests: none")
        for line in failures[:40]:
            print(f"  {line}")
        if browser.console:
            print("console errors and warnings:")
            for line in dict.fromkeys(browser.console):
                print(f"  {line}")
        if failures:
            ok = False
        if args.keep:
            await asyncio.to_thread(input, f"page at {page_origin}/ -- Enter to stop ")
        await browser.close()
        await runner.cleanup()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ohif", type=Path, required=True, help="folder holding OHIF's index.umd.js"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("viewer-check.png"), help="screenshot (PNG)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the farm and router files here")
    parser.add_argument("--no-cors", action="store_true", help="leave router.http.cors_origins out")
    parser.add_argument("--keep", action="store_true", help="wait for Enter before stopping")
    parser.add_argument(
        "--slices", type=int, default=5, help="images in each series of the first study (5)"
    )
    args = parser.parse_args()
    dist, version = find_bundle(args.ohif)
    args.out = args.out.resolve()
    folder = Path(tempfile.mkdtemp(prefix="viewer-check-", dir=args.workdir))
    dicom_port, http_port = free_ports(2)
    farm = start_free_farm(
        folder / "farm", ("test", "test"), [(ROUTER_AE, "127.0.0.1", dicom_port)]
    )
    router = None
    try:
        studies = upload_studies(farm, args.slices)
        for study in studies:
            print(
                f"study {study['patient_name']} {study['description']}: {study['instances']} "
                f"instances ({study['syntax']}) on {', '.join(study['holders'])}"
            )
        page_port = free_ports(1)[0]  # the viewer's origin, which the router lets in (CORS)
        page_origin = f"http://127.0.0.1:{page_port}"
        config = write_router_config(
            folder, farm, dicom_port, http_port, None if args.no_cors else page_origin
        )
        router = RouterProcess(config, dicom_port, log_path=folder / "router.log")
        router.start()
        wait_for_port(http_port)
        root = f"http://127.0.0.1:{http_port}/dicom-web"
        ok = asyncio.run(run_browser(args, dist, version, root, studies, folder, page_port))
        problems = [
            line
            for line in router.log_text().splitlines()
            if '"level": "error"' in line or '"level": "warning"' in line or "http_refused" in line
        ]
        if problems:
            print("router log (warnings, errors, refusals):")
            for line in problems[-20:]:
                print(f"  {line[:400]}")
        print(f"router log: {router.log_path}")
        print("RESULT:", "viewer works" if ok else "viewer does NOT fully work")
        return 0 if ok else 1
    finally:
        if router is not None:
            router.stop()
        farm.stop_all()
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
