"""The ``aem`` command: ``aem demo``, ``aem stats``, ``aem bench``, ``aem serve``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(duration=args.duration)


#: Where AEMhttpd publishes its statistics (aem.http.status.PATH; not imported: the
#: command must start fast and work against any server).
STATUS_PATH = "/_aem/status"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The statistics a running AEMhttpd publishes: its status page at ``url`` as JSON.

    ``url`` is the server's address (``http://127.0.0.1:8080``) or the status
    page's own.  Raises ``ValueError`` with a sentence for the user when the
    server cannot be reached or publishes no statistics.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// address (e.g. http://127.0.0.1:8080)")
    path = parts.path.rstrip("/")
    if not path.endswith(STATUS_PATH):
        path += STATUS_PATH
    target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    request = urllib.request.Request(target, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ValueError(f"{target} answered 404: that server does not publish its statistics "
                             "(start it with its status page on: aem serve --status)") from None
        raise ValueError(f"{target} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"cannot reach {target}: {reason} (is aem serve running there?)") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError(f"{target} did not answer with JSON: is it an aem server?") from None
    if not isinstance(data, dict) or "engine" not in data:
        raise ValueError(f"{target} answered JSON without an 'engine' section: not an aem status page")
    return data


def format_status(data: dict[str, Any]) -> str:
    """The status data as aligned ``section.key  value`` lines, one section after another."""
    lines: list[str] = [f"pid {data.get('pid', '?')}"]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}.{k}" if prefix else str(k), value[k])
        else:
            rows.append((prefix, value))

    for section in ("engine", "server", "capsules", "vmtable"):
        if section not in data:
            continue
        rows: list[tuple[str, Any]] = []
        walk(section, data[section])
        width = max((len(k) for k, _ in rows), default=0)
        lines.append("")
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    try:
        data = fetch_status(args.url, timeout=args.timeout)
    except ValueError as e:
        print(f"aem stats: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else format_status(data))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    try:
        bench.run(args.suites, quick=args.quick, out_dir=args.out)
    except ValueError as e:
        print(f"aem bench: {e}", file=sys.stderr)
        return 2
    print(f"results written to {args.out}/ (results.json, results.md, plots)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    import aem
    import aem.http

    if args.app is not None:
        return _serve_app(args)
    args.root = args.root or "."
    if not os.path.isdir(args.root):
        print(f"aem serve: --root {args.root!r} is not a directory", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("aem serve: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        from aem.http.workers import serve_workers

        return serve_workers(args.root, args.host, args.port, args.workers, quiet=args.quiet,
                             status_page=args.status)
    try:
        reason = aem.http.serve(args.root, host=args.host, port=args.port, quiet=args.quiet,
                                status_page=args.status)
    except OSError as e:
        print(f"aem serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print(f"aem serve: stopped ({reason})", file=sys.stderr)
    return 0


def _serve_app(args: argparse.Namespace) -> int:
    from aem.http.appserver import AppConfig, serve_app

    cfg = AppConfig(app=args.app, interface=args.interface, workers=args.workers, root=args.root,
                    host=args.host, port=args.port, uds=args.uds, reload=args.reload,
                    reload_dirs=args.reload_dir or [], log_level=args.log_level,
                    access_log=args.access_log and not args.quiet,
                    graceful_timeout=args.graceful_timeout, limit_concurrency=args.limit_concurrency,
                    timeout_keep_alive=args.timeout_keep_alive, timeout=args.timeout,
                    root_path=args.root_path, lifespan=args.lifespan, status=args.status,
                    max_body=args.max_body, burst=args.burst, burst_after=args.burst_after,
                    ws_ping_interval=args.ws_ping_interval or None,
                    ws_ping_timeout=args.ws_ping_timeout or None)
    try:
        return serve_app(cfg)
    except ValueError as e:
        print(f"aem serve: {e}", file=sys.stderr)
        return 2


def _add_app_options(p: argparse.ArgumentParser) -> None:
    """The options of ``aem serve module:app`` (see docs/apps.md)."""
    p.add_argument("app", nargs="?", default=None,
                   help="module:app — an ASGI, WSGI or aem app to serve (default: only static files)")
    p.add_argument("--interface", default="auto", choices=["auto", "asgi", "wsgi", "aem"],
                   help="the app's interface (default: detected)")
    p.add_argument("--uds", default=None, help="listen on this Unix socket instead of host:port")
    p.add_argument("--reload", action="store_true", help="restart when a .py file changes (development)")
    p.add_argument("--reload-dir", action="append", default=None,
                   help="directory to watch with --reload (default: the current one; repeatable)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stdout (default: on)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds requests in progress may take to finish after SIGTERM")
    p.add_argument("--limit-concurrency", type=int, default=None,
                   help="app calls in progress beyond which requests get 503")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (apps)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a WSGI worker may keep the front waiting (for its response head, then "
                        "for each chunk); then it is killed and replaced, the client gets 504")
    p.add_argument("--burst", type=int, default=None,
                   help="WSGI: up to this many temporary workers when requests wait behind a slow "
                        "handler (default: as many as --workers; 0: none)")
    p.add_argument("--burst-after", type=float, default=0.02,
                   help="WSGI: seconds a worker is busy with one request, while others wait, before "
                        "a temporary worker starts (default: 0.02)")
    p.add_argument("--root-path", default="",
                   help="the ASGI root_path / WSGI SCRIPT_NAME the app is mounted at")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="the largest request body an app is given, in bytes (larger: 413)")
    p.add_argument("--lifespan", default="auto", choices=["auto", "on", "off"],
                   help="ASGI lifespan events (default: auto)")
    p.add_argument("--ws-ping-interval", type=float, default=20.0,
                   help="ASGI WebSockets: seconds between keepalive pings (0: none; default: 20)")
    p.add_argument("--ws-ping-timeout", type=float, default=20.0,
                   help="ASGI WebSockets: seconds a ping's pong may take, then the connection closes "
                        "(0: wait forever; default: 20)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``aem`` command."""
    parser = argparse.ArgumentParser(prog="aem", description="aem: an asynchronous event mechanism for Linux")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="show events (timer, socket, signal, user event) "
                                    "interrupting a busy main thread")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C or SIGTERM)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("stats", help="show a running AEMhttpd's statistics (its status page)",
                       description="Fetch the statistics a running aem server publishes on its "
                                   f"status page ({STATUS_PATH}) and print them.")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="the server's address (default http://127.0.0.1:8080)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    p.set_defaults(fn=_cmd_stats)

    from .bench import SUITES, describe

    width = max(len(n) for n, _ in describe())
    p = sub.add_parser("bench", help="run benchmarks side by side with their anchors",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Measure aem beside its anchors, in one run (interleaved rounds, "
                                   "medians); needs the bench extra: pip install 'aem[bench]'.",
                       epilog="suites:\n" + "\n".join(f"  {n:<{width}}  {d.replace('``', '')}"
                                                       for n, d in describe()))
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"suites to run (default: {' '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds: checks that suites run")
    p.add_argument("--out", default="bench-results", help="directory for results.json, results.md and plots")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("serve", help="AEMhttpd: serve static files, or an ASGI, WSGI or aem app "
                                     "(module:app), over HTTP/1.1")
    p.add_argument("--root", default=None,
                   help="directory of static files (default: the current one; with an app: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--workers", type=int, default=1,
                   help="single-threaded engines in capsules sharing the port (SO_REUSEPORT)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--status", action="store_true",
                   help="answer /_aem/status with the process's live statistics (off by default: "
                        "anyone who reaches the server can read them)")
    _add_app_options(p)
    p.set_defaults(fn=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aem`` command."""
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
