"""YAML run configs for a command's flags: ``kappatune train --config run.yaml``.

The YAML is a mapping whose keys are the command's flag names (``batch_size`` or
``batch-size``; ``model`` for the positional model). Each value is checked with the flag's
own type and choices, then becomes the parser's default (``set_defaults``), so flags given on
the command line override the file. An unknown key, a bad value or a file that is not a
mapping is a one-line usage error.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kappatune.errors import KappaTuneError

_NOT_SETTABLE = {"help", "config", "run", "command"}


def load_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is an empty mapping)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KappaTuneError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise KappaTuneError(f"--config {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KappaTuneError(f"--config {path} must hold a mapping of flag names to values")
    return {str(k): v for k, v in data.items()}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTABLE}


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """``value`` checked and converted as the parser would convert the flag's argument."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise KappaTuneError(f"config key {key!r} ({_flag(action)}) takes true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, (list, dict)):
        raise KappaTuneError(f"config key {key!r} ({_flag(action)}) takes one value")
    if isinstance(value, dict) or any(isinstance(v, (list, dict)) or v is None for v in items):
        raise KappaTuneError(f"config key {key!r} ({_flag(action)}) takes plain values")
    out = [_one(action, key, v) for v in items]
    return out if many else out[0]


def _one(action: argparse.Action, key: str, value: Any) -> Any:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    convert = action.type if callable(action.type) else str
    try:
        result = convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise KappaTuneError(
            f"config key {key!r} ({_flag(action)}): invalid value {value!r}"
        ) from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise KappaTuneError(
            f"config key {key!r} ({_flag(action)}): {value!r} is not one of {choices}"
        )
    return result


def config_defaults(
    parser: argparse.ArgumentParser, config: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """The parser defaults that ``config`` (keys: dest or flag names) asks for."""
    actions = _actions(parser)
    out: dict[str, Any] = {}
    for key, value in config.items():
        dest = key.removeprefix("--").replace("-", "_")
        if dest not in actions:
            raise KappaTuneError(
                f"--config {source}: unknown key {key!r} (keys are the flag names, e.g. batch_size)"
            )
        out[dest] = _convert(actions[dest], key, value)
    for group in parser._mutually_exclusive_groups:
        both = [_flag(a) for a in group._group_actions if a.dest in out]
        if len(both) > 1:
            raise KappaTuneError(f"--config {source} sets both {both[0]} and {both[1]}")
    return out


def _pre_parse(args: Sequence[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        known, _ = pre.parse_known_args(list(args))
    except argparse.ArgumentError:
        return None  # the command's own parser reports it
    return known.config  # type: ignore[no-any-return]


def _drop_overridden(
    parser: argparse.ArgumentParser,
    ns: argparse.Namespace,
    given: dict[str, Any],
    saved: dict[str, Any],
) -> None:
    """A flag given on the command line overrides the config's member of its exclusive group."""
    for group in parser._mutually_exclusive_groups:
        members = group._group_actions
        from_cli = [
            a for a in members
            if a.dest not in given and getattr(ns, a.dest, None) != saved[a.dest]
        ]  # fmt: skip
        if from_cli:
            for a in members:
                if a.dest in given and getattr(ns, a.dest, None) is given[a.dest]:
                    setattr(ns, a.dest, saved[a.dest])


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``--config YAML`` flag whose file supplies defaults for its flags."""
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="run config: a YAML mapping of flag names to values (command-line flags override it)",
    )
    original = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        path = _pre_parse(args if args is not None else [])
        if path is None:
            return original(args, namespace)
        actions = _actions(parser)
        try:
            given = config_defaults(parser, load_yaml(Path(path)), path)
        except KappaTuneError as exc:
            parser.error(str(exc))
        saved = {dest: a.default for dest, a in actions.items()}
        for dest in given:
            actions[dest].required = False  # the file gives it
        parser.set_defaults(**given)
        ns, rest = original(args, namespace)
        _drop_overridden(parser, ns, given, saved)
        return ns, rest

    setattr(parser, "parse_known_args", parse_known_args)  # noqa: B010
