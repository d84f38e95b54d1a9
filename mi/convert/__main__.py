"""`mi-convert` / `python -m mi.convert`: the command-line face of `mi.convert.convert`.

Every refusal exits 2 with exactly one stderr line `mi-convert: error: ...` (no traceback).
"""

from __future__ import annotations

import argparse
import sys

from mi.convert.driver import DTYPE_CHOICES, convert
from mi.convert.sharding import TP_CHOICES
from mi.convert.spec import ConvertError

PROG = "mi-convert"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message on two lines; we print one
        _fail(message)


def _fail(message: str):
    print(f"{PROG}: error: {' '.join(str(message).splitlines())}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Convert a Hugging Face checkpoint or a GGUF file for mi-backend."
    )
    parser.add_argument(
        "--path", required=True, help="Hugging Face model directory, a .gguf file, or a directory holding one"
    )
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument(
        "--tp", type=int, default=1, help=f"tensor-parallel degree, {TP_CHOICES[0]} .. {TP_CHOICES[-1]}"
    )
    parser.add_argument(
        "--dtype", default="auto", help=f"one of {', '.join(DTYPE_CHOICES)}; auto keeps the source dtype"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert(
            args.path, args.out, args.tp, force=args.force, dtype=args.dtype, progress=not args.quiet
        )
    except (ConvertError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"converted {args.path} -> {out} (tp={args.tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
