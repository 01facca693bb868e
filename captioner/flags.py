"""Command-line flags generated from the config dataclasses (config.py): one flag per field, its help
text and default taken from the field, so a config field is documented once.

Defaults are SUPPRESSed: only flags the user gives override a config file; `config_from_args` builds the
dataclass from a base dict plus those flags, with the same type checks as a config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from captioner.config import ConfigError, from_dict, load_json


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _parse_json_arg(text: str):
    """A dict flag takes inline JSON or a path to a JSON file."""
    if text.lower() in ("none", "null"):
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON: {e.msg}") from None
    try:
        return load_json(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _with_default(text: str, default) -> str:
    """Help text with its default appended, unless the text already says it or there is none to show."""
    if "default" in text.lower() or default == "":
        return text
    return f"{text} (default: {'none' if default is None else default})"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, skip=(), only=None, title=None) -> None:
    """One flag per field (or per field in `only`); defaults are SUPPRESSed so only flags given by the user
    override a config."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or dataclasses.is_dataclass(hints[f.name]):
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) is list:  # comma-separated, e.g. --modalities image,audio
            ints = typing.get_args(hint) == (int,)  # e.g. --stop-tokens 13,0
            group.add_argument(_flag(f.name), type=parse_int_list if ints else parse_list, default=argparse.SUPPRESS,
                               metavar="A,B", help=_with_default(f.metadata.get("help", ""),
                                                                 ",".join(map(str, f.default_factory()))))
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = _with_default(f.metadata.get("help", ""), default)
        if base is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif base is dict:
            group.add_argument(_flag(f.name), type=_parse_json_arg, default=argparse.SUPPRESS,
                               metavar="JSON|FILE", help=help_text)
        else:
            group.add_argument(_flag(f.name), type=_parse_optional(base) if optional else base,
                               default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    data = dict(base or {})
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
            data[f.name] = getattr(args, f.name)
    return from_dict(cls, data, source="command line")
