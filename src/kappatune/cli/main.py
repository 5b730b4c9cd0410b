"""Entry point: ``kappatune <command> ...``.

Each sub-command lives in ``kappatune.cli.<name>`` and provides ``add_parser(subparsers)``
and ``run(args) -> int``. Command modules import heavy libraries inside ``run`` only, so
``kappatune --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from kappatune.errors import KappaTuneError

COMMANDS = ("demo", "analyze", "select", "train", "bench", "probe", "env")

EPILOG = """examples:
  kappatune demo
  kappatune analyze gemma-3-270m
  kappatune analyze ./my-checkpoint --output spectra.json --plot kappa.png
  kappatune select gemma-3-270m --policy lowest-kappa --budget-params 10% --format peft
  kappatune env
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2, no usage dump
        self.exit(2, f"kappatune: error: {message}\n")


def _version() -> str:
    from kappatune._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kappatune",
        description="Condition-number guided fine-tuning that forgets less.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"kappatune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kappatune.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="kappatune: %(levelname)s: %(message)s",
    )
    from kappatune.cli.quiet import quiet_third_party
    from kappatune.printable import printable

    try:
        with quiet_third_party():  # third-party start-up noise, for this command only
            return int(args.run(args) or 0)
    except KappaTuneError as exc:
        print(f"kappatune: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kappatune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"kappatune: internal error: {type(exc).__name__}: {printable(str(exc))} (rerun with"
            " --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
