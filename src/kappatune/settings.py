"""One source of truth for a settings dataclass: its flags, JSON form and key come from its fields.

Each field is declared once, with its help text in the field's metadata (as PEFT's configs do)::

    @dataclass(frozen=True)
    class ProbeSettings:
        tokens: int = setting(2048, help="predicted tokens to use")

and :func:`add_flags` (argparse flags), :func:`from_args` (flags -> settings), :func:`to_json` /
:func:`from_json` (the JSON form) and :func:`settings_key` (a stable digest of every setting that
changes results) are derived from it. Metadata keys, all optional but ``help``:

``help``
    the flag's help; `` (default: X)`` is added unless the text already gives the default.
``flag``
    the flag when it is not ``--field-name`` (``"--lambda"``; a bare name is a positional).
    A boolean is a ``--name`` switch, or ``--no-name`` when it defaults to true.
``dest``
    the argparse destination when it is not the flag's name (``--lambda`` -> ``damping``).
``cli``
    False: no flag (the field is set from Python or JSON only).
``choices``
    the allowed values, or a function returning them (a registry, read when the parser is
    built), or a mapping of the flag's words to the field's values (``{"off": False, ...}``).
``type``, ``nargs``, ``metavar``, ``action``, ``required``
    as argparse's, when the annotation does not say (``tuple[int, ...]`` is ``nargs="+"``).
``flag_default``
    the flag's default when it is not the field's (e.g. None: "decide later").
``parse``
    turns the parsed flag value into the field's value (e.g. ``TYPE=N`` quotas).
``group``, ``exclusive``
    the argparse argument group (by title) and mutually exclusive group (by name) of the flag.
``json``, ``encode``, ``decode``
    the JSON name when it is not the field's, and the value's converters to and from JSON.
``key``, ``why``
    ``key=False`` leaves the field out of :func:`settings_key`; ``why`` (required with it)
    says why the field does not change results. ``key="set"`` puts the field in the key only
    when it differs from its default (a setting added later keeps every earlier key).

Nothing here imports torch: ``kappatune --help`` reads the settings of every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")  # a settings dataclass

_MISSING: Any = dataclasses.MISSING
_KNOWN_META = {
    "help", "flag", "dest", "cli", "choices", "type", "nargs", "metavar", "action", "required",
    "flag_default", "parse", "group", "exclusive", "json", "encode", "decode", "key", "why",
}  # fmt: skip


def setting(default: Any = _MISSING, *, default_factory: Any = _MISSING, **meta: Any) -> Any:
    """``dataclasses.field`` with the setting's metadata (see the module docstring)."""
    unknown = set(meta) - _KNOWN_META
    if unknown:
        raise TypeError(f"unknown setting metadata: {', '.join(sorted(unknown))}")
    if "help" not in meta:
        raise TypeError("a setting needs help text")
    if meta.get("key", True) is False and not meta.get("why"):
        raise TypeError("a setting left out of the key needs a 'why'")
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# --------------------------------------------------------------------------- introspection


def _fields(cls: type[DataclassInstance]) -> tuple[dataclasses.Field[Any], ...]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return dataclasses.fields(cls)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def non_key_fields(cls: type[DataclassInstance]) -> dict[str, str]:
    """Fields that do not change results, with why: everything else is in the key."""
    return {f.name: f.metadata["why"] for f in _fields(cls) if f.metadata.get("key", True) is False}


def cli_fields(cls: type[DataclassInstance]) -> tuple[dataclasses.Field[Any], ...]:
    """The fields that have a flag."""
    return tuple(f for f in _fields(cls) if f.metadata.get("cli", True))


def flag_of(f: dataclasses.Field[Any]) -> str:
    """The flag of a field: ``--name``, ``--no-name`` for a true-by-default switch, or ``flag``."""
    if "flag" in f.metadata:
        return str(f.metadata["flag"])
    name = f.name.replace("_", "-")
    return f"--no-{name}" if _default(f) is True else f"--{name}"


def dest_of(f: dataclasses.Field[Any]) -> str:
    """The argparse destination of a field's flag (what a ``--config`` YAML key names)."""
    return str(f.metadata.get("dest") or flag_of(f).lstrip("-").replace("-", "_"))


def _hints(cls: type[DataclassInstance]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _is_negated(f: dataclasses.Field[Any], tp: object) -> bool:
    return tp is bool and flag_of(f).startswith("--no-") and _default(f) is True


# --------------------------------------------------------------------------- flags


def _choices(f: dataclasses.Field[Any]) -> Any:
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _show(value: object) -> str:
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # 1e-4, not 0.0001 or 1e-04
        mantissa, _, exponent = f"{value:e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return " ".join(_show(v) for v in value)
    return str(value)


def _help(f: dataclasses.Field[Any], tp: object) -> str:
    text = str(f.metadata["help"])
    default = _default(f)
    choices = _choices(f)
    if isinstance(choices, Mapping):
        default = next((k for k, v in choices.items() if v == default), default)
    switch = tp is bool and not isinstance(choices, Mapping)
    hidden = default is None or switch or (isinstance(default, tuple | list) and not default)
    says = "(default" in text or "default:" in text
    if not says and not hidden:
        text += f" (default: {_show(default)})"
    return text.replace("%", "%%")  # argparse formats help with %


def _flag_kwargs(f: dataclasses.Field[Any], tp: Any, defaults: bool) -> dict[str, Any]:
    meta = f.metadata
    kw: dict[str, Any] = {"help": _help(f, tp)}
    if tp is bool and "action" not in meta and "choices" not in meta:
        kw["action"] = "store_true"  # --name, or --no-name for a true default
        kw["default"] = False if defaults else None
        return kw
    if "action" in meta:
        kw["action"] = meta["action"]
    choices = _choices(f)
    if typing.get_origin(tp) is tuple and "type" not in meta and not isinstance(choices, Mapping):
        kw["nargs"] = "+"
        tp = typing.get_args(tp)[0]
    if tp in (int, float, Path):
        kw["type"] = tp
    for name in ("type", "nargs", "metavar", "required"):
        if name in meta:
            kw[name] = meta[name]
    if choices is not None:
        kw["choices"] = tuple(choices)
    default = meta.get("flag_default", _default(f))
    if isinstance(choices, Mapping):
        default = next((k for k, v in choices.items() if v == default), default)
    if kw.get("action") == "append" and default == ():
        default = []
    kw["default"] = default if defaults else None
    return kw


def argument_group(parser: argparse._ActionsContainer, title: str) -> argparse._ArgumentGroup:
    """The parser's argument group called ``title`` (made if there is none)."""
    found = [g for g in parser._action_groups if g.title == title]
    return found[0] if found else parser.add_argument_group(title)


def _group(
    parser: argparse._ActionsContainer,
    title: str | None,
    exclusive: str | None,
    made: dict[str, argparse._MutuallyExclusiveGroup],
) -> argparse._ActionsContainer:
    target = parser if title is None else argument_group(parser, title)
    if exclusive is None:
        return target
    if exclusive not in made:
        made[exclusive] = target.add_mutually_exclusive_group()
    return made[exclusive]


def add_flags(
    parser: argparse._ActionsContainer,
    cls: type[DataclassInstance],
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: bool = True,
) -> None:
    """Add a flag for every field of ``cls`` that has one; ``only`` or ``skip`` (field names)
    add a part of them (the rest elsewhere in the help, or given by another settings class).

    ``defaults=False`` makes every default None, for commands that fill unset flags later (the
    bench's presets); the help still shows the field's default."""
    hints = _hints(cls)
    skipped = set(skip)
    wanted = None if only is None else set(only)
    made: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in cli_fields(cls):
        if f.name in skipped or (wanted is not None and f.name not in wanted):
            continue
        tp = _strip_optional(hints[f.name])
        kw = _flag_kwargs(f, tp, defaults)
        flag = flag_of(f)
        target = _group(parser, f.metadata.get("group"), f.metadata.get("exclusive"), made)
        if flag.startswith("-"):
            target.add_argument(flag, dest=dest_of(f), **kw)
        else:
            kw.setdefault("nargs", "?")
            target.add_argument(flag, **kw)


def _to_field(f: dataclasses.Field[Any], tp: Any, value: Any) -> Any:
    choices = _choices(f)
    if isinstance(choices, Mapping) and value in choices:
        value = choices[value]
    if _is_negated(f, tp):
        value = not value
    if "parse" in f.metadata and value is not None:
        return f.metadata["parse"](value)
    return _tupled(value)


def from_args(cls: type[S], args: argparse.Namespace, **given: Any) -> S:
    """``cls`` from parsed flags; ``given`` sets fields the flags do not (or overrides them).

    A flag whose value is None (not given, no default) leaves the field's default."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in cli_fields(cls):
        dest = dest_of(f)
        if f.name in given or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None and _default(f) is not None:
            continue
        kwargs[f.name] = _to_field(f, _strip_optional(hints[f.name]), value)
    return cls(**kwargs, **given)


def to_args(cls: type[DataclassInstance], settings: DataclassInstance) -> dict[str, Any]:
    """The flag values (by destination) that :func:`from_args` turns into ``settings``."""
    return _as_args(cls, {f.name: getattr(settings, f.name) for f in cli_fields(cls)})


def flag_defaults(cls: type[DataclassInstance]) -> dict[str, Any]:
    """The flag values (by destination) of the fields' defaults, without building ``cls``."""
    return _as_args(cls, {f.name: _default(f) for f in cli_fields(cls)})


def _as_args(cls: type[DataclassInstance], values: Mapping[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for f in cli_fields(cls):
        value = values[f.name]
        choices = _choices(f)
        if isinstance(choices, Mapping):
            value = next(k for k, v in choices.items() if v == value)
        elif _is_negated(f, _strip_optional(hints[f.name])):
            value = not value
        out[dest_of(f)] = list(value) if isinstance(value, tuple) else value
    return out


# --------------------------------------------------------------------------- JSON


def _tupled(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tupled(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """A JSON-able form: tuples as lists, paths as strings, nested settings as objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(settings: DataclassInstance) -> dict[str, Any]:
    """Every field of a settings object, by its JSON name."""
    out: dict[str, Any] = {}
    for f in _fields(type(settings)):
        value = getattr(settings, f.name)
        encode = f.metadata.get("encode")
        out[f.metadata.get("json", f.name)] = encode(value) if encode else _plain(value)
    return out


def _decoded(f: dataclasses.Field[Any], tp: Any, value: Any) -> Any:
    if "decode" in f.metadata:
        return f.metadata["decode"](value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_json(tp, value)
    if tp is Path and value is not None:
        return Path(value)
    return _tupled(value)


def from_json(cls: type[S], data: Mapping[str, Any], what: str | None = None) -> S:
    """``cls`` from :func:`to_json`'s form; missing fields take their defaults, unknown ones
    are refused (one line)."""
    what = what or cls.__name__
    if not isinstance(data, Mapping):
        raise KappaTuneError(f"{what} must be a JSON object, got {type(data).__name__}")
    by_json = {f.metadata.get("json", f.name): f for f in _fields(cls)}
    unknown = sorted(set(map(str, data)) - set(by_json))
    if unknown:
        raise KappaTuneError(
            f"unknown {what} setting(s): {', '.join(unknown)} (known: {', '.join(by_json)})"
        )
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = by_json[name]
        try:
            kwargs[f.name] = _decoded(f, _strip_optional(hints[f.name]), value)
        except (TypeError, ValueError, AttributeError) as exc:
            raise KappaTuneError(f"{what} setting {name!r}: invalid value {value!r}") from exc
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a value of the wrong kind that __post_init__ stumbled on
        raise KappaTuneError(f"invalid {what} settings: {exc}") from None


# --------------------------------------------------------------------------- key


def key_fields(settings: DataclassInstance) -> dict[str, Any]:
    """The settings that change results: every field but :func:`non_key_fields` (nested
    settings by their own key fields)."""
    out: dict[str, Any] = {}
    for f in _fields(type(settings)):
        if f.metadata.get("key", True) is False:
            continue
        value = getattr(settings, f.name)
        if f.metadata.get("key") == "set" and value == _default(f):
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = key_fields(value)
        out[f.name] = value
    return out


def digest(obj: object) -> str:
    """Stable digest of a JSON-able object (keys sorted; other values by ``str``)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def settings_key(settings: DataclassInstance) -> str:
    """A stable digest of the settings that change results (the cache or run key)."""
    return digest({"kind": type(settings).__name__, "settings": key_fields(settings)})


def flags_of(cls: type[DataclassInstance]) -> dict[str, str]:
    """Field name -> flag, for the fields that have one."""
    return {f.name: flag_of(f) for f in cli_fields(cls)}


def check_regexes(**patterns: str | None) -> None:
    """One line naming the flag (``--include``) when a given pattern is not a valid regex."""
    import regex

    for name, pattern in patterns.items():
        if pattern is None:
            continue
        try:
            re.compile(pattern)
            regex.compile(pattern)
        except (re.error, regex.error) as exc:
            raise KappaTuneError(f"invalid --{name} regex {pattern!r}: {exc}") from None


REGEX_TIMEOUT_S = 1.0  # a name is a few dozen characters: any sane pattern takes microseconds


def name_matches(pattern: str, name: str, flag: str) -> bool:
    """``re.search(pattern, name)``, bounded in time: a pattern that backtracks without end
    (``(a+)+$``) ends in one line naming the flag instead of hanging the command."""
    import regex

    try:
        return regex.search(pattern, name, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        raise KappaTuneError(
            f"{flag} regex {pattern!r} took over {REGEX_TIMEOUT_S:g} s on a {len(name)}-character"
            " name (catastrophic backtracking): simplify it"
        ) from None


MAX_SEED = 2**32 - 1  # what numpy, torch and accelerate all accept


def check_seed(seed: int, flag: str = "--seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise KappaTuneError(
            f"{flag} must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed}"
        )


__all__ = [
    "MAX_SEED",
    "add_flags",
    "argument_group",
    "check_regexes",
    "check_seed",
    "cli_fields",
    "dest_of",
    "digest",
    "flag_defaults",
    "flag_of",
    "flags_of",
    "from_args",
    "from_json",
    "key_fields",
    "name_matches",
    "non_key_fields",
    "setting",
    "settings_key",
    "to_args",
    "to_json",
]
