"""The ``smartfrz-fast`` console script.

    smartfrz-fast demo [demo options]   # train with and without freezing, compare (see --help)
    smartfrz-fast profile [options]     # where the time goes, and what freezing can save
    smartfrz-fast info [--check]        # what is built and available (ops, kernels, devices)
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartfrz-fast",
        description="smartfrz_fast: progressive layer freezing for PyTorch training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="train a small CNN on the CPU with and without freezing and compare "
             "(options: smartfrz-fast demo --help)",
        add_help=False,  # --help goes to the demo's own parser
    )
    sub.add_parser(
        "profile",
        help="per-unit time and memory, the saving ceiling of each frozen prefix, and the "
             "engine's overhead (options: smartfrz-fast profile --help)",
        add_help=False,  # --help goes to the profiler's own parser
    )
    sub.add_parser("info", help="show the installed build: ops, kernels and devices; --check runs each op "
                                "against its reference (options: smartfrz-fast info --help)", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Everything after the command belongs to that module's parser, --help included.
    if argv and argv[0] in ("demo", "profile", "info"):
        import importlib

        module = importlib.import_module(f".{argv[0]}", __package__)
        return int(module.main(argv[1:], prog=f"smartfrz-fast {argv[0]}") or 0)
    parser.parse_args(argv)  # --help, or an unknown command: argparse says so and exits
    parser.print_help(sys.stderr)  # no command given
    return 2


if __name__ == "__main__":
    sys.exit(main())
