"""The status page (``GET /``): the ``/status`` document as HTML for a person.

In the spirit of HAProxy's stats page: one table row per upstream under its listener's
row, DOWN in red with the last check's reason, then each cluster's node -> port map.
Self-contained (inline CSS, no script, no asset from the internet: a NAT host may have
no route out), refreshed by a ``<meta>`` tag, one column on a phone. Every value from
the document is escaped: upstream names, node ids and hostnames come from the network.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from typing import Any

from .client import duration, human_bytes

DEFAULT_REFRESH = 5  # seconds; ?refresh=0 turns it off

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:#f6f7f9;color:#1d232b}
header{background:#23344a;color:#fff;padding:10px 14px}
header h1{font-size:18px;margin:0 0 4px}
main{padding:10px 14px}
h2{font-size:16px;margin:18px 0 6px}
.facts span{display:inline-block;margin-right:14px;white-space:nowrap}
.wrap{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;background:#fff;min-width:100%;font-size:13px}
th,td{border:1px solid #d5dae1;padding:3px 6px;text-align:left;white-space:nowrap}
th{background:#e8ecf1;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.listener td{background:#dfe7f1;font-weight:600}
.up{background:#c9ecc9}.down{background:#f6c1c1;font-weight:700}
.unchecked{background:#fbeab0}
.ok{color:#13651b;font-weight:700}.bad{color:#a61b1b;font-weight:700}
#ready{color:#fff;padding:1px 8px;border-radius:3px}#ready.ok{background:#2e7d32}
#ready.bad{background:#c62828}
.muted{color:#66707c}
@media (max-width:600px){body{font-size:15px}table{font-size:14px}}
"""


# A cell's class comes from this table, never from a value's text
_HEALTH_CLASS = {"up": "up", "down": "down", "unknown": "unchecked", "unchecked": "unchecked"}


def esc(value: Any) -> str:
    """Any value as HTML text: ``<script>`` in a node id shows as those characters."""
    return html.escape("" if value is None else str(value), quote=True)


def _cell(value: Any, cls: str = "") -> str:
    return f'<td class="{esc(cls)}">{esc(value)}</td>' if cls else f"<td>{esc(value)}</td>"


def _num(value: Any) -> str:
    return f'<td class="n">{esc(value if value is not None else 0)}</td>'


def _refused(refused: Any) -> str:
    if not isinstance(refused, dict) or not refused:
        return "0"
    return ", ".join(f"{reason} {count}" for reason, count in refused.items())


def head(doc: dict[str, Any], refresh: int) -> str:
    """Everything above the listener table: the process, its readiness and workers."""
    ready = bool(doc.get("ready"))
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    facts = [
        ("version", doc.get("version", "?")),
        ("pid", doc.get("pid", "-")),
        ("uptime", duration(doc.get("uptime_seconds"))),
        ("reloads", doc.get("reloads", 0)),
    ]
    if doc.get("reload_failures"):
        facts.append(("reload failures", doc["reload_failures"]))
    admin = doc.get("admin")
    if isinstance(admin, dict) and admin.get("refused"):
        facts.append(("admin refusals", _refused(admin["refused"])))
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">', meta,
        f"<title>cacheport {esc(doc.get('version', ''))}</title><style>{_CSS}</style>",
        "</head><body><header><h1>cacheport</h1>",
        '<div class="facts">' + "".join(f"<span>{esc(k)}: <b>{esc(v)}</b></span>"
                                        for k, v in facts),
        f'<span id="ready" class="{"ok" if ready else "bad"}">'
        f'{esc("ready" if ready else doc.get("ready_reason", "not ready"))}</span></div>',
        "</header><main>",
    ]
    workers = doc.get("workers")
    if isinstance(workers, list) and workers:
        out.append("<h2>Workers</h2><div class=\"wrap\"><table id=\"workers\"><tr><th>worker"
                   "</th><th>pid</th><th>ready</th></tr>")
        for w in workers:
            w = w if isinstance(w, dict) else {}
            ok = bool(w.get("ready"))
            out.append(f"<tr>{_cell(w.get('worker'))}{_cell(w.get('pid'))}"
                       f"{_cell('ready' if ok else w.get('ready_reason'), 'up' if ok else 'down')}"
                       "</tr>")
        out.append("</table></div>")
    out.append('<h2>Listeners</h2><div class="wrap"><table id="listeners"><tr>'
               "<th>listener / upstream</th><th>address</th><th>health</th><th>last check</th>"
               "<th>active</th><th>connections</th><th>client&rarr;node</th>"
               "<th>node&rarr;client</th><th>refused</th></tr>")
    return "".join(out)


def listener_rows(lst: dict[str, Any]) -> str:
    """One listener's row and one row per upstream below it."""
    accepting = lst.get("accepting", True)
    up_total = sum(int(u.get("bytes_upstream") or 0) for u in lst.get("upstreams", []))
    down_total = sum(int(u.get("bytes_downstream") or 0) for u in lst.get("upstreams", []))
    state = "" if accepting else " (not accepting)"
    kind = f"{lst.get('protocol', '?')}, relay {lst.get('relay', '?')}"
    rows = [
        f'<tr class="listener" data-listener="{esc(lst.get("name"))}">'
        f"{_cell(lst.get('name'))}"
        f"{_cell(str(lst.get('listen', '?')) + state)}"
        f"{_cell(kind)}"
        f"<td></td>{_num(lst.get('active'))}{_num(lst.get('accepted'))}"
        f"{_num(human_bytes(up_total))}{_num(human_bytes(down_total))}"
        f"{_cell(_refused(lst.get('refused')))}</tr>"
    ]
    for up in lst.get("upstreams", []):
        health = str(up.get("health", "?"))
        last = up.get("last_check")
        checked = "-"
        if isinstance(last, dict):
            verdict = "ok" if last.get("ok") else f"failed: {last.get('reason') or '?'}"
            when = str(last.get("at") or "")[11:23]
            checked = f"{verdict} at {when}" if when else verdict
        role = str(up.get("role", ""))
        label = role if role in ("backup", "former", "replica", "fallback") else "upstream"
        if up.get("in_use"):
            label += " (in use)"
        rows.append(
            f'<tr class="upstream">{_cell(label, "muted")}{_cell(up.get("address"))}'
            f'{_cell(health.upper(), _HEALTH_CLASS.get(health.lower(), ""))}{_cell(checked)}'
            f"{_num(up.get('active'))}{_num(up.get('connections'))}"
            f"{_num(human_bytes(int(up.get('bytes_upstream') or 0)))}"
            f"{_num(human_bytes(int(up.get('bytes_downstream') or 0)))}<td></td></tr>")
    return "".join(rows)


def cluster_section(cluster: dict[str, Any]) -> str:
    """A cluster's facts and its node -> port table."""
    facts = [("engine", cluster.get("engine")), ("seed", cluster.get("seed")),
             ("announce", cluster.get("announce")), ("ports", cluster.get("ports"))]
    for key in ("seed_port", "primary_port", "reader_port"):
        if cluster.get(key):
            facts.append((key.replace("_", " "), cluster[key]))
    out = [f'<h2>Cluster {esc(cluster.get("name"))}</h2><div class="facts">'
           + "".join(f"<span>{esc(k)}: <b>{esc(v)}</b></span>" for k, v in facts) + "</div>"]
    if cluster.get("last_error"):
        out.append(f'<p class="bad">last error: {esc(cluster["last_error"])}</p>')
    out.append('<div class="wrap"><table class="cluster" '
               f'data-cluster="{esc(cluster.get("name"))}"><tr><th>node</th><th>address</th>'
               "<th>role</th><th>slots</th><th>port</th><th>active</th></tr>")
    for node in cluster.get("nodes", []):
        if not isinstance(node, dict):
            continue
        slots = ",".join(f"{r[0]}-{r[1]}" if r[0] != r[1] else str(r[0])
                         for r in node.get("slots") or [] if isinstance(r, list) and len(r) == 2)
        port = node.get("port")
        listening = bool(node.get("listening"))
        failed = node.get("health") == "failed"
        name = node.get("hostname") or node.get("id", "?")
        role = str(node.get("role") or "-") + (" (failed)" if failed else "")
        out.append(
            f"<tr>{_cell(name)}{_cell(node.get('address'))}"
            f"{_cell(role, 'down' if failed else '')}"
            f"{_cell(slots or '-')}"
            f"{_cell(port if port else '-', 'port' if listening else 'port down')}"
            f"{_num(node.get('connections'))}</tr>")
    out.append("</table></div>")
    if cluster.get("unassigned"):
        out.append(f"<p class=\"bad\">no port (range full): "
                   f"{esc(', '.join(map(str, cluster['unassigned'])))}</p>")
    return "".join(out)


async def render_parts(doc: dict[str, Any], refresh: int,
                       pause: Callable[[], Awaitable[None]]) -> list[bytes]:
    """The page in pieces, ``await pause()`` after each listener (see ``status.Slicer``)."""
    parts = [head(doc, refresh)]
    for lst in doc.get("listeners", []):
        if isinstance(lst, dict):
            parts.append(listener_rows(lst))
            await pause()
    parts.append("</table></div>")
    for cluster in doc.get("clusters") or []:
        if isinstance(cluster, dict):
            parts.append(cluster_section(cluster))
            await pause()
    parts.append('<p class="muted">JSON: <a href="status">/status</a> &middot; '
                 '<a href="metrics">/metrics</a></p></main></body></html>\n')
    return [p.encode() for p in parts]
