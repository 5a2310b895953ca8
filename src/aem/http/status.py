"""``/_aem/status``: the live statistics of the server's process, for people and programs.

:func:`collect` gathers what there is to show — the engine's counters
(``aem.stats()``), the server's own, and when the process has them the
capsule pool's and the vmtable's (looked up defensively: builds without
capsules or a vmtable simply have no such section).  :func:`render_html`
makes a page that refreshes itself (a small script fetches the page again
every two seconds and swaps its tables; without scripts, a meta refresh
reloads it): rows in natural order (numbers inside names by value), values
rounded (:func:`format_value`: ``yes``/``no`` for booleans, thousands
separators), and a sentence instead of an empty table (:data:`EMPTY`).
:func:`render_json` gives the same data as JSON, at ``?format=json`` or for
``Accept: application/json`` (:func:`wants_json`).

The page tells whoever sees it about the process, so who sees it is the
server's option: ``HTTPServer(status_page="loopback")`` (the default: clients
on this machine), ``True`` (everyone), ``False`` (no one); ``aem serve``
shows it only with ``--status``.  For whoever does not see it, the path is an
ordinary one (a file there is served).
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import aem

__all__ = ["EMPTY", "PATH", "SECTIONS", "collect", "format_value", "json_parts", "render_html",
           "render_json", "wants_json"]

#: Where the server answers with this page.
PATH = "/_aem/status"


def wants_json(accept: str | None, query: str = "") -> bool:
    """True for ``?format=json``, or when ``Accept`` prefers ``application/json`` over HTML."""
    if query:
        for part in query.split("&"):
            if part == "format=json":
                return True
            if part.startswith("format="):
                return False
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
        # the process's vmtable if there is one: looking must not make it (64 MiB)
        existing = getattr(getattr(aem, "vmtable", None), "existing", None)
        if callable(existing):
            try:
                vmt = _stats_of(existing())
            except Exception:
                vmt = None
    if isinstance(vmt, Mapping):
        data["vmtable"] = dict(vmt)
    return data


def render_json(data: Mapping[str, Any]) -> bytes:
    """``data`` as UTF-8 JSON (values that JSON lacks are shown with ``str``)."""
    return json.dumps(data, default=str, sort_keys=True).encode()


_SERVER_MARK = "\x00aem:server"
_TIME_MARK = "\x00aem:time"


def json_parts(data: Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """:func:`render_json` of ``data`` cut around its ``server`` and ``time`` values.

    ``head + <server JSON> + mid + <time JSON> + tail`` is ``render_json`` of
    ``data`` with those two values in place: the server's native path keeps the
    three parts (a snapshot of what only Python knows: engine, capsules,
    vmtable) and renders the two values itself at each request
    (``src/aem/_core/http_status.c``).  ``data`` must have a ``server`` section.
    """
    if "server" not in data:
        raise ValueError("json_parts: the data have no 'server' section")
    marked = dict(data)
    marked["server"], marked["time"] = _SERVER_MARK, _TIME_MARK
    text = render_json(marked)
    head, _, rest = text.partition(json.dumps(_SERVER_MARK).encode())
    mid, _, tail = rest.partition(json.dumps(_TIME_MARK).encode())
    return head, mid, tail


#: Shown in place of a section's table when the process has nothing to show there.
EMPTY: dict[str, str] = {
    "engine": "The engine has no counters yet.",
    "server": "The server has no counters yet.",
    "capsules": "No capsule pool in this process: capsules start with the first EVF_CAPSULE "
                "handler or with aem serve --workers.",
    "vmtable": "No vmtable in this process: it appears once a vmtable is created.",
}
SECTIONS = ("engine", "server", "capsules", "vmtable")


def _natural(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the numbers inside names by value (``size.64`` before ``size.512``)."""
    return tuple((0, int(t)) if t.isdecimal() and t.isascii() else (1, t)
                 for t in re.split(r"(\d+)", key) if t)


def format_value(value: Any) -> str:
    """A value as the page shows it: ``yes``/``no``, integers with thousands separators,
    other numbers rounded to three significant digits (at most one decimal from 100 up)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.3g}"
    if value is None:
        return "—"
    return str(value)


def _rows(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        if not value and prefix:
            out.append((prefix, "none yet"))
        for k in sorted(value, key=lambda k: _natural(str(k))):
            _rows(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out.append((prefix, format_value(value)))


def _table(section: str, values: Any) -> str:
    rows: list[tuple[str, str]] = []
    if isinstance(values, Mapping):
        _rows("", values, rows)
    if not rows:
        return (f'<section id="{section}"><h2>{section}</h2>'
                f'<p class="empty">{html.escape(EMPTY[section])}</p></section>')
    body = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td data-key="{html.escape(k)}">'
                   f"{html.escape(v)}</td></tr>" for k, v in rows)
    return (f'<section id="{section}"><h2>{section}</h2><table>'
            f"<tbody>{body}</tbody></table></section>")


# The page refreshes its tables from the page itself (rendered by the server, so values
# look the same before and after a refresh); the JSON is for programs.
_SCRIPT = """
async function refresh() {
  try {
    const r = await fetch(location.pathname + "?format=html", {cache: "no-store"});
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    document.getElementById("stats").replaceWith(doc.getElementById("stats"));
    const u = document.getElementById("updated");
    u.textContent = "live, updated " + new Date().toLocaleTimeString();
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
.empty{color:#777;font-style:italic}
#updated{color:#777}
"""


def render_html(data: Mapping[str, Any]) -> bytes:
    """A page showing ``data`` in tables, refreshing itself every two seconds."""
    sections = "".join(_table(s, data.get(s)) for s in SECTIONS)
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
