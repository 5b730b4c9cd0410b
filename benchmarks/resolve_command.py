"""Check that benchmark and CLI commands resolve without running them (gpu_check.sh --dry-run).

Each argument is one command line (shell words). ``python SCRIPT ARGS`` and
``python -m kappatune.cli.main ARGS`` are executed up to their argument parsing: the script's
imports run and its parser checks every flag and value, then the command stops before any
work. Any other command must name an executable on PATH. Exit 0 when every command resolves;
otherwise one line per failure and exit 2.
"""

from __future__ import annotations

import argparse
import runpy
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any


class _Parsed(Exception):
    """Raised right after a command's arguments parsed: nothing past parsing runs."""


def _stop_after_parse() -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        original(self, *a, **kw)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign,assignment]


def resolve(words: list[str]) -> str | None:
    """None when the command resolves, else the reason."""
    if not words:
        return "empty command"
    if Path(words[0]).name.startswith("python"):
        if words[1:3] == ["-m", "kappatune.cli.main"]:
            target, argv = "kappatune.cli.main", words[3:]
            run = lambda: runpy.run_module(target, run_name="__main__")  # noqa: E731
        elif len(words) > 1 and words[1].endswith(".py"):
            if not Path(words[1]).is_file():
                return f"no such script: {words[1]}"
            target, argv = words[1], words[2:]
            run = lambda: runpy.run_path(target, run_name="__main__")  # noqa: E731
        else:
            return "only 'python SCRIPT.py ...' and 'python -m kappatune.cli.main ...' are checked"
        sys.argv = [target, *argv]
        try:
            run()
        except _Parsed:
            return None
        except SystemExit as exc:
            return f"exit {exc.code} while parsing its arguments"
        return "ran past its argument parsing"
    return None if shutil.which(words[0]) else f"not on PATH: {words[0]}"


def main() -> int:
    _stop_after_parse()
    failures = 0
    for line in sys.argv[1:]:
        reason = resolve(shlex.split(line))
        if reason:
            failures += 1
            print(f"does not resolve: {line}: {reason}", file=sys.stderr)
    return 2 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
