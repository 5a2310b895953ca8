"""The ``aem`` command: ``aem demo``, ``aem stats``, ``aem bench``, ``aem serve``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(duration=args.duration)


def _cmd_stats(args: argparse.Namespace) -> int:
    import aem

    print(json.dumps(aem.stats(), indent=2, sort_keys=True))
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``aem`` command."""
    parser = argparse.ArgumentParser(prog="aem", description="aem: an asynchronous event mechanism for Linux")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="show events (timer, socket, signal, user event) "
                                    "interrupting a busy main thread")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C or SIGTERM)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("stats", help="print the statistics of a fresh engine as JSON")
    p.set_defaults(fn=_cmd_stats)

    p = sub.add_parser("bench", help="run benchmarks side by side with their anchors")
    p.add_argument("suites", nargs="*", help="suites to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds: checks that suites run")
    p.add_argument("--out", default="bench-results", help="directory for results.json, results.md and plots")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("serve", help="AEMhttpd: serve the files of a directory over HTTP/1.1")
    p.add_argument("--root", default=".", help="directory to serve (default: the current one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--workers", type=int, default=1,
                   help="single-threaded engines in capsules sharing the port (SO_REUSEPORT)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--status", action="store_true",
                   help="answer /_aem/status with the process's live statistics (off by default: "
                        "anyone who reaches the server can read them)")
    p.set_defaults(fn=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aem`` command."""
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
