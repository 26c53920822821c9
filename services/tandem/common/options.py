"""Command-line flags generated from the frozen config dataclasses, and configs back to argv.

Each option is declared once, as a field of a frozen config dataclass (STYLE.md). `add_flags`
makes its flag, `from_args` builds the config from the parsed flags, and `to_argv` is the
inverse: the flags that parse back to a given config (`tandem up` starts its children with it).
A leaf module: it imports nothing else from the project, so every layer may use it.

Field metadata (every key optional):

- `help`: the flag's help text.
- `flag`: the flag's name without `--` (default: the field's name with `-` for `_`).
- `choices`: the accepted values, a tuple (a registry's names: registries keep their names where
  the config can read them without loading a backend).
- `scale`: the flag counts units of `scale` (`kv_cache_bytes` is `--kv-cache-mib`, scale 2**20).
- `required`: False on a field without a default: its flag may be left out, and the command then
  gives the value to `from_args` (`--model` falls back to the generated tiny model).
- `no_flag`: why the field has no flag (the command gives its value, e.g. a worker's role).

A field whose type is a frozen dataclass (a nested config) is flattened into its fields' flags;
one typed `Config | None` also gets a switch flag (`--autoscale`) that turns it on. On such a
field, `prefix` is put before its fields' flag names (`AutoscalerConfig.prefill`: `--prefill-min`)
and `skip` names nested fields (dotted for deeper ones) that get no flag: values that a launcher
sets per child.

A flag's default is the field's value in its parent's default (a nested field's own default or
factory), so a template's values are its flags' defaults. Two nested fields with the same flag
name share one flag (`tandem up`'s `--max-model-len` sets the workers' and the gateway's); their
defaults must agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_KEYS = frozenset({"help", "flag", "choices", "scale", "required", "no_flag", "prefix", "skip"})
_MISSING: Any = dataclasses.MISSING


@dataclass(frozen=True)
class Option:
    """One field with a flag. `path`: field names from the root config; `default`: the field's
    value in its parent's default (MISSING: none); `kind`: the scalar type a value is parsed as;
    `sequence`: the container of a repeatable flag (`--api-key k1 --api-key k2`); `switch`: the
    flag turns an optional nested config on."""

    path: tuple[str, ...]
    flag: str
    kind: Any
    default: Any
    help: str | None = None
    choices: Any = None
    scale: int = 1
    required: bool = False
    sequence: type | None = None
    switch: bool = False

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def flag_default(self) -> Any:
        """The default as the flag spells it (scaled down; None for a sequence or a missing one)."""
        if self.default is _MISSING or self.sequence is not None:
            return None
        if self.switch:
            return False
        return self.default if self.default is None or self.scale == 1 else self.default // self.scale


def _meta(f: dataclasses.Field[Any]) -> Mapping[str, Any]:
    unknown = set(f.metadata) - _KEYS
    if unknown:
        raise TypeError(f"field {f.name}: unknown option metadata {sorted(unknown)}")
    return f.metadata


def _config_class(kind: Any) -> type | None:
    """`kind` if it is a config (dataclass) class."""
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a config field may be one type or None, got {hint}")
        return args[0], True
    return hint, False


def _default_of(f: dataclasses.Field[Any], parent: Any) -> Any:
    if parent is not None:
        return getattr(parent, f.name)
    if f.default is not _MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory() if factory is not _MISSING else _MISSING


def _nested_default(cls: type, value: Any) -> Any:
    """The instance whose values are a nested config's flag defaults (None: field defaults)."""
    if dataclasses.is_dataclass(value):
        return value
    try:
        return cls()
    except TypeError:
        return None


def options(cls: type, skip: frozenset[str] = frozenset()) -> list[Option]:
    """Every flag of config class `cls` (nested configs flattened), in field order; `skip`:
    dotted field names that get no flag."""
    return list(_walk(cls, None, (), "", skip))


def _walk(cls: type, parent: Any, path: tuple[str, ...], prefix: str, skip: frozenset[str]) -> Iterator[Option]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        name = ".".join((*path, f.name))
        if "no_flag" in meta or name in skip:
            continue
        kind, optional = _unwrap(hints[f.name])
        default = _default_of(f, parent)
        config_cls = _config_class(kind)
        if config_cls is not None:
            inner_skip = skip | {f"{name}.{s}" for s in meta.get("skip", ())}
            inner_prefix = prefix + meta.get("prefix", "")
            if optional:  # a switch turns it on; its fields' flags always exist
                flag = "--" + prefix + meta.get("flag", f.name.replace("_", "-"))
                yield Option((*path, f.name), flag, bool, default, meta.get("help"), switch=True)
            nested = _nested_default(config_cls, default)
            yield from _walk(config_cls, nested, (*path, f.name), inner_prefix, inner_skip)
            continue
        flag = "--" + prefix + meta.get("flag", f.name.replace("_", "-"))
        choices = meta.get("choices")
        sequence = None
        if typing.get_origin(kind) is typing.Literal:
            choices = choices or typing.get_args(kind)
            kind = type(typing.get_args(kind)[0])
        elif typing.get_origin(kind) in (frozenset, tuple):
            sequence, kind = typing.get_origin(kind), typing.get_args(kind)[0]
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            choices = choices or tuple(member.value for member in kind)
        required = default is _MISSING and meta.get("required", True)
        yield Option(
            (*path, f.name), flag, kind, default, meta.get("help"), choices, meta.get("scale", 1), required, sequence
        )


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()) -> None:
    """Add a flag for every field of config class `cls` (see the module doc)."""
    for option in options(cls, skip):
        shared = parser._option_string_actions.get(option.flag)
        if shared is not None:
            if shared.dest != option.dest or shared.default != option.flag_default:
                raise ValueError(
                    f"{option.flag} is declared twice with different defaults "
                    f"({shared.default!r}, {option.flag_default!r})"
                )
            continue
        kwargs: dict[str, Any] = {"dest": option.dest, "default": option.flag_default, "help": option.help}
        if option.switch:
            kwargs["action"] = "store_true"
        elif option.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = option.kind if not issubclass(option.kind, enum.Enum) else str
            if option.sequence is not None:
                kwargs["action"] = "append"
            if option.choices is not None:
                kwargs["choices"] = option.choices
            kwargs["required"] = option.required
        parser.add_argument(option.flag, **kwargs)


def from_args(cls: type, args: argparse.Namespace, skip: frozenset[str] = frozenset(), **given: Any) -> Any:
    """The config `cls` from flags parsed by a parser that `add_flags(parser, cls, skip)` built.
    `given`: values of fields (dotted names for nested ones) that the command sets; they win
    over the flags, and fields without a flag need one unless they have a default."""
    unused = set(given)
    built = _build(cls, args, None, (), "", skip, given, unused)
    if unused:
        raise TypeError(f"{cls.__name__} has no field {sorted(unused)}")
    return built


def _direct(cls: type, parent: Any, path: tuple[str, ...], prefix: str, skip: frozenset[str]) -> dict[str, Option]:
    """The options of `cls`'s own fields (a nested config's switch included), by field name."""
    return {o.path[-1]: o for o in _walk(cls, parent, path, prefix, skip) if len(o.path) == len(path) + 1}


def _build(
    cls: type,
    args: argparse.Namespace,
    parent: Any,
    path: tuple[str, ...],
    prefix: str,
    skip: frozenset[str],
    given: Mapping[str, Any],
    unused: set[str],
) -> Any:
    hints = typing.get_type_hints(cls)
    direct = _direct(cls, parent, path, prefix, skip)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        name = ".".join((*path, f.name))
        kind, optional = _unwrap(hints[f.name])
        config_cls = _config_class(kind)
        if name in given:
            unused.discard(name)
            kwargs[f.name] = given[name]
        elif config_cls is not None and "no_flag" not in meta and name not in skip:
            switch = direct.get(f.name)
            if optional and switch is not None and not getattr(args, switch.dest):
                kwargs[f.name] = None
                continue
            inner_skip = skip | {f"{name}.{s}" for s in meta.get("skip", ())}
            nested = _nested_default(config_cls, _default_of(f, parent))
            inner_prefix = prefix + meta.get("prefix", "")
            kwargs[f.name] = _build(config_cls, args, nested, (*path, f.name), inner_prefix, inner_skip, given, unused)
        elif f.name in direct:
            kwargs[f.name] = _value(direct[f.name], getattr(args, direct[f.name].dest))
        else:
            default = _default_of(f, parent)
            if default is _MISSING:
                raise TypeError(f"{cls.__name__}.{f.name} has no flag here: give it to from_args")
            kwargs[f.name] = default
    return cls(**kwargs)


def _value(option: Option, raw: Any) -> Any:
    if option.sequence is not None:
        return option.sequence(raw or ())
    if raw is None:
        if option.default is _MISSING:
            raise ValueError(f"{option.flag} is required")
        return None
    if isinstance(option.kind, type) and issubclass(option.kind, enum.Enum):
        return option.kind(raw)
    return raw * option.scale if option.scale != 1 else raw


def to_argv(config: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    """Flags that `from_args` turns back into `config`: every field that differs from its
    flag's default, and every field without a default. A flag that two fields share is written
    once (ValueError if their values differ). Fields without a flag are the caller's."""
    argv: list[str] = []
    written: dict[str, list[str]] = {}
    for option, value in _values(type(config), config, None, (), "", skip):
        if option.switch:
            words = [option.flag] if value is not None else []
        elif value == option.default and not option.required:
            continue
        else:
            words = _words(option, value)
        if option.flag in written:
            if written[option.flag] != words:
                raise ValueError(f"{option.flag} would take two values: {written[option.flag]} and {words}")
            continue
        written[option.flag] = words
        argv += words
    return argv


def _values(
    cls: type, config: Any, parent: Any, path: tuple[str, ...], prefix: str, skip: frozenset[str]
) -> Iterator[tuple[Option, Any]]:
    """(option, the value of its field in `config`) for every flag of `cls`, defaults taken from
    `parent` as `_walk` takes them."""
    hints = typing.get_type_hints(cls)
    for field_name, option in _direct(cls, parent, path, prefix, skip).items():
        yield option, getattr(config, field_name)
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        name = ".".join((*path, f.name))
        config_cls = _config_class(_unwrap(hints[f.name])[0])
        if config_cls is None or "no_flag" in meta or name in skip:
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        inner_skip = skip | {f"{name}.{s}" for s in meta.get("skip", ())}
        nested = _nested_default(config_cls, _default_of(f, parent))
        yield from _values(config_cls, value, nested, (*path, f.name), prefix + meta.get("prefix", ""), inner_skip)


def _words(option: Option, value: Any) -> list[str]:
    if option.sequence is not None:
        items = sorted(value) if option.sequence is frozenset else value  # a tuple keeps its order
        return [word for item in items for word in (option.flag, str(item))]
    if value is None:
        raise ValueError(f"{option.flag} cannot say None (its default is {option.default!r})")
    if option.kind is bool:
        return [option.flag if value else "--no-" + option.flag[2:]]
    if isinstance(value, enum.Enum):
        return [option.flag, str(value.value)]
    if option.scale != 1:
        if value % option.scale:
            raise ValueError(f"{option.flag} counts units of {option.scale}; {value} is not a multiple")
        value //= option.scale
    return [option.flag, str(value)]


def parse(cls: type, argv: list[str], skip: frozenset[str] = frozenset(), **given: Any) -> Any:
    """The config `cls` from flags alone (`from_args` over a parser of `cls`'s flags only)."""
    parser = argparse.ArgumentParser(prog=cls.__name__, exit_on_error=False)
    add_flags(parser, cls, skip)
    return from_args(cls, parser.parse_args(argv), skip, **given)
