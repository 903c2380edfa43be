"""The `minifca` command line: the parser (its sub-commands are `minifca.commands`) and the error handling
every command shares (a MinifcaError or a bad path is one line on stderr and exit status 2)."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .commands import register_all
from .errors import MinifcaError


def build_parser():
    parser = argparse.ArgumentParser(prog="minifca", description=(
        "BERT inference without torch (NumPy reference, Numba core, numba.cuda) and FCA: fine- and "
        "coarse-granularity hybrid self-attention that shortens the sequence layer by layer."))
    parser.add_argument("--version", action="version", version=f"minifca {__version__}")
    register_all(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except MinifcaError as e:
        print(f"minifca: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `minifca ... | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # an --out that is a file, a path that is a folder, no permission, a full disk
        print(f"minifca: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minifca: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
