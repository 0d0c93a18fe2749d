"""The status page at `/` (role `admin`): one self-refreshing HTML page, no script, no CDN.

Rendered on the server from the same facts as the JSON API, so it works on any phone browser
and with no internet; the browser reloads it every few seconds (meta refresh).
"""

from __future__ import annotations

import asyncio
import html
import os
import socket
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from dicomrouter.http.api import read_queue, read_servers
from dicomrouter.http.auth import require_role
from dicomrouter.http.deps import HttpDeps
from dicomrouter.http.health import readiness_problems
from dicomrouter.status import age, event_dict

REFRESH_S = 5
RECENT_EVENTS = (
    400  # newest audit rows read to show recent associations, refusals and queue actions
)
SHOWN = 12
REFUSALS = ("rejected", "refused", "unauthorized", "forbidden")

STYLE = """
:root{--ok:#17803d;--bad:#b42318;--warn:#b54708;--mute:#667085;--line:#e4e7ec}
*{box-sizing:border-box}body{font:15px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#101828;background:#f9fafb}
header{padding:12px 16px;background:#101828;color:#fff;display:flex;flex-wrap:wrap;gap:4px 16px;align-items:baseline}
header h1{font-size:18px;margin:0}header .meta{color:#d0d5dd;font-size:13px}
main{padding:8px 12px;max-width:1200px;margin:auto}section{margin:12px 0}h2{font-size:16px;margin:8px 4px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:10px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card h3{font-size:15px;margin:0 0 6px;display:flex;justify-content:space-between;gap:8px}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:2px 10px;margin:0;font-size:14px}.card dt{color:var(--mute)}.card dd{margin:0;overflow-wrap:anywhere}
.badge{font-size:12px;border-radius:10px;padding:1px 8px;color:#fff;white-space:nowrap}
.up{background:var(--ok)}.down{background:var(--bad)}.unknown{background:var(--mute)}.paused{background:var(--warn)}
.card.alert{border-color:var(--bad);border-width:2px;background:#fef3f2}.num-bad{color:var(--bad);font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}td,th{border-bottom:1px solid var(--line);padding:4px 6px;text-align:left;vertical-align:top}
.scroll{overflow-x:auto;border:1px solid var(--line);border-radius:8px}
.ready{color:#a6f4c5}.notready{color:#fda29b;font-weight:600}svg{width:100%;height:90px;background:#fff;border:1px solid var(--line);border-radius:8px}
.legend{font-size:12px;color:var(--mute)}.rx{fill:#2e90fa;color:#2e90fa}.tx{fill:#12b76a;color:#12b76a}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _age(iso: str | None, now: datetime) -> str:
    return age(datetime.fromisoformat(iso), now) or "-" if iso else "-"


def _local(iso: str | None) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S") if iso else "-"


def read_page_facts(deps: HttpDeps) -> dict[str, Any]:
    """Blocking: everything the page shows."""
    events: list[dict] = []
    try:
        events = [event_dict(e) for e in reversed(deps.catalog.audit_events(limit=RECENT_EVENTS))]
    except Exception:
        pass
    return {
        "servers": read_servers(deps),
        "queue": {q["destination"]: q for q in read_queue(deps)},
        "problems": readiness_problems(deps),
        "events": events,
        "throughput": deps.metrics.throughput.last_hour() if deps.metrics is not None else [],
    }


def _server_card(server: dict, queue: dict | None, now: datetime) -> str:
    health = server["health"]
    queue = queue or {}
    if queue.get("suspended_at"):
        badge = '<span class="badge paused">suspended</span>'
    elif health is None:
        badge = '<span class="badge unknown">unknown</span>'
    elif health["status"] == "up":
        badge = '<span class="badge up">up</span>'
    else:
        badge = f'<span class="badge down">unreachable {_age(health["since"], now)}</span>'
    down = health is not None and health["status"] != "up"
    waiting = (queue.get("pending") or 0) + (queue.get("sending") or 0)
    oldest = queue.get("oldest") if waiting else None
    dead = queue.get("dead") or 0
    last_error = queue.get("last_error") or (health or {}).get("last_error")
    rows = [
        (
            "environment",
            f"{_e(server['environment'])}{' · primary' if server['primary'] else ''}"
            f"{'' if server['active'] else ' · inactive'}",
        ),
        ("address", _e(f"{server['ae_title']} @ {server['host']}:{server['port']}")),
        ("studies held", _e(server["studies"] if server["studies"] is not None else "?")),
        (
            "queue",
            f'<span class="{"num-bad" if waiting else ""}" data-testid="waiting">{waiting}</span> waiting'
            f" ({queue.get('sending') or 0} sending)",
        ),
        ("oldest pending", f'<span data-testid="oldest">{_age(oldest, now)}</span>'),
        (
            "dead letters",
            f'<span class="{"num-bad" if dead else ""}" data-testid="dead">{dead}</span>',
        ),
    ]
    if queue.get("suspended_at"):
        rows.append(
            (
                "suspended",
                _e(f"since {_local(queue['suspended_at'])} by {queue.get('suspended_by') or '?'}"),
            )
        )
    if last_error and (down or waiting or dead):
        rows.append(("last error", _e(last_error[:300])))
    if health is not None and health.get("response_ms") is not None and not down:
        rows.append(("echo", f"{health['response_ms']} ms"))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    name = _e(server["name"])
    return (
        f'<div class="card{" alert" if down else ""}" data-server="{name}" data-status="'
        f'{"suspended" if queue.get("suspended_at") else (health or {}).get("status", "unknown")}">'
        f"<h3><span>{name}</span>{badge}</h3><dl>{body}</dl></div>"
    )


def _throughput_svg(minutes: list[dict]) -> str:
    if not minutes:
        return ""
    peak = max([1] + [max(m["received"], m["forwarded"]) for m in minutes])
    width = 100 / len(minutes)
    bars = []
    for index, minute in enumerate(minutes):
        for offset, key, css in ((0.0, "received", "rx"), (0.5, "forwarded", "tx")):
            height = 86 * minute[key] / peak
            if height:
                bars.append(
                    f'<rect class="{css}" x="{(index + offset) * width:.2f}%" y="{88 - height:.1f}" '
                    f'width="{width / 2:.2f}%" height="{height:.1f}"/>'
                )
    received = sum(m["received"] for m in minutes)
    forwarded = sum(m["forwarded"] for m in minutes)
    return (
        f'<svg role="img" aria-label="instances per minute">{"".join(bars)}</svg>'
        f'<div class="legend"><span class="rx">■</span> received {received} · '
        f'<span class="tx">■</span> forwarded {forwarded} in the last hour (peak {peak}/min)</div>'
    )


def _events_table(events: list[dict], columns: tuple[str, ...]) -> str:
    if not events:
        return '<p class="legend">none</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = []
    for event in events:
        cells = {
            "time": _local(event["at"]),
            "operation": event["operation"],
            "outcome": event["outcome"],
            "calling AE": event["calling_ae"],
            "address": event["address"],
            "servers": ", ".join(event["servers"]),
            "detail": (event["detail"] or "")[:160],
            "by": event["node"],
        }
        rows.append("<tr>" + "".join(f"<td>{_e(cells[c])}</td>" for c in columns) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def render_page(facts: dict[str, Any], ae_title: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    problems = facts["problems"]
    readiness = (
        '<span class="ready">ready</span>'
        if not problems
        else '<span class="notready">NOT READY: '
        + _e("; ".join(f"{k}: {v}" for k, v in problems.items()))
        + "</span>"
    )
    cards = "".join(_server_card(s, facts["queue"].get(s["name"]), now) for s in facts["servers"])
    events = facts["events"]
    associations = [e for e in events if e["operation"] == "association"][:SHOWN]
    refusals = [e for e in events if e["outcome"] in REFUSALS][:SHOWN]
    actions = [e for e in events if e["operation"] == "queue"][:SHOWN]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>{_e(ae_title)} · dicomrouter</title><style>{STYLE}</style></head>
<body><header><h1>{_e(ae_title)}</h1><span class="meta">{_e(socket.gethostname())} pid {os.getpid()} ·
{now.astimezone().strftime("%Y-%m-%d %H:%M:%S")} · {readiness} · refreshes every {REFRESH_S} s</span></header>
<main>
<section><h2>Servers and forwarding</h2><div class="cards" id="servers">{cards}</div></section>
<section><h2>Throughput, last hour</h2>{_throughput_svg(facts["throughput"])}</section>
<section><h2>Queue actions</h2>{_events_table(actions, ("time", "outcome", "servers", "detail", "by"))}</section>
<section><h2>Recent associations</h2>{_events_table(associations, ("time", "outcome", "calling AE", "address", "detail"))}</section>
<section><h2>Recent refusals</h2>{_events_table(refusals, ("time", "operation", "outcome", "calling AE", "address", "detail"))}</section>
</main></body></html>
"""


def add_routes(app: web.Application, deps: HttpDeps) -> None:
    async def page(request: web.Request) -> web.Response:
        require_role(request, "admin")
        facts = await asyncio.to_thread(read_page_facts, deps)
        return web.Response(
            text=render_page(facts, deps.holder.current.router.ae_title),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    app.router.add_get("/", page)
