"""`mi-bench` / `python -m mi.bench`: see `mi.bench` and docs/benchmarks.md."""

from __future__ import annotations

import signal
import sys


def _interrupt_on_sigterm(signum, frame):
    # SIGTERM's default ends the process on the spot; as KeyboardInterrupt, the `finally` blocks
    # that stop the servers mi-bench started (mi/bench/servers.py) run first.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from mi.bench.cli import parse_args
    from mi.bench.commands import BenchError, cmd_offline, cmd_roofline, cmd_serve

    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    if args.command == "compare":
        from mi.bench.compare import cmd_compare

        command = cmd_compare
    else:
        command = {"serve": cmd_serve, "offline": cmd_offline, "roofline": cmd_roofline}[args.command]
    try:
        return command(args)
    except BenchError as exc:
        print(f"mi-bench {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
