"""``/_aem/status``: the live statistics of the server's process, for people and programs.

:func:`collect` gathers what there is to show — the engine's counters
(``aem.stats()``), the server's own, and when the process has them the
capsule pool's and the vmtable's (looked up defensively: builds without
capsules or a vmtable simply have no such section).  :func:`render_html`
makes a page that refreshes itself (a small script fetches the JSON every
two seconds; without scripts, a meta refresh reloads it), :func:`render_json`
the same data as JSON; :func:`wants_json` reads the ``Accept`` header.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import aem

__all__ = ["PATH", "collect", "render_html", "render_json", "wants_json"]

#: Where the server answers with this page.
PATH = "/_aem/status"


def wants_json(accept: str | None) -> bool:
    """True when ``Accept`` prefers ``application/json`` over ``text/html``."""
    if not accept:
        return False
    best_json = best_html = -1.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "application/json":
            best_json = max(best_json, q)
        elif media in ("text/html", "*/*", "text/*"):
            best_html = max(best_html, q if media == "text/html" else q - 0.001)
    return best_json > 0 and best_json >= best_html


def _stats_of(obj: Any) -> dict[str, Any] | None:
    fn = getattr(obj, "stats", None)
    if not callable(fn):
        return None
    try:
        res = fn()
    except Exception:
        return None
    return dict(res) if isinstance(res, Mapping) else None


def collect(server: Mapping[str, Any] | None = None, pool: object = None) -> dict[str, Any]:
    """The status data: ``engine``, ``server``, ``capsules``, ``vmtable`` sections (when present).

    ``server`` is the HTTP server's own counters; ``pool`` a capsule pool
    whose ``stats()`` to show.  Never raises for a missing optional part.
    """
    engine = dict(aem.stats())
    data: dict[str, Any] = {"pid": os.getpid(), "time": time.time(), "engine": engine}
    if server is not None:
        data["server"] = dict(server)
    capsules = engine.pop("capsules", None)
    if pool is not None:
        capsules = _stats_of(pool) or capsules
    if isinstance(capsules, Mapping):
        data["capsules"] = dict(capsules)
    vmt = engine.pop("vmtable", None)
    if vmt is None:
        getter = getattr(aem, "vmtable", None)
        if callable(getter):
            try:
                vmt = _stats_of(getter())
            except Exception:
                vmt = None
    if isinstance(vmt, Mapping):
        data["vmtable"] = dict(vmt)
    return data


def render_json(data: Mapping[str, Any]) -> bytes:
    """``data`` as UTF-8 JSON (values that JSON lacks are shown with ``str``)."""
    return json.dumps(data, default=str, sort_keys=True).encode()


def _rows(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        for k in sorted(value, key=str):
            _rows(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out.append((prefix, str(value)))


def _table(section: str, values: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    _rows("", values, rows)
    body = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td data-key="{html.escape(k)}">'
                   f"{html.escape(v)}</td></tr>" for k, v in rows)
    return (f'<section id="{section}"><h2>{section}</h2><table>'
            f"<tbody>{body}</tbody></table></section>")


_SCRIPT = """
const SECTIONS = ["engine", "server", "capsules", "vmtable"];
function rows(prefix, v, out) {
  if (v !== null && typeof v === "object") {
    for (const k of Object.keys(v).sort()) rows(prefix ? prefix + "." + k : k, v[k], out);
  } else out.push([prefix, String(v)]);
}
async function refresh() {
  try {
    const r = await fetch(location.pathname,
                          {headers: {"Accept": "application/json"}, cache: "no-store"});
    const data = await r.json();
    let html = "";
    for (const s of SECTIONS) {
      if (!(s in data)) continue;
      const out = []; rows("", data[s], out);
      const esc = t => t.replace(/[&<>"]/g,
        c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
      html += `<section id="${s}"><h2>${s}</h2><table><tbody>` +
        out.map(([k, v]) => `<tr><th scope="row">${esc(k)}</th>` +
                            `<td data-key="${esc(k)}">${esc(v)}</td></tr>`).join("") +
        "</tbody></table></section>";
    }
    document.getElementById("stats").innerHTML = html;
    const u = document.getElementById("updated");
    u.textContent = "live, updated " + new Date(data.time * 1000).toLocaleTimeString();
    u.dataset.state = "live";
  } catch (e) {
    document.getElementById("updated").textContent = "refresh failed: " + e;
  }
}
setInterval(refresh, 2000);
refresh();
"""

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin:1em 0 .3em}
table{border-collapse:collapse;min-width:24em} th{text-align:left;font-weight:normal;color:#555}
th,td{padding:2px 10px;border-bottom:1px solid #eee}
td{font-variant-numeric:tabular-nums;text-align:right}
#updated{color:#777}
"""


def render_html(data: Mapping[str, Any]) -> bytes:
    """A page showing ``data`` in tables, refreshing itself every two seconds."""
    sections = "".join(_table(s, data[s]) for s in ("engine", "server", "capsules", "vmtable")
                       if isinstance(data.get(s), Mapping))
    stamp = time.strftime("%H:%M:%S", time.localtime(float(data.get("time", time.time()))))
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>aem status</title>"
        '<noscript><meta http-equiv="refresh" content="5"></noscript>'
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>aem status — pid {int(data.get('pid', 0))}</h1>"
        f'<p id="updated" data-state="static">rendered {stamp}</p>'
        f'<div id="stats">{sections}</div>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
    return page.encode()
